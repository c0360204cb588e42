"""Request telemetry at the RSGI edge: one server span and two metric updates per request.

:func:`instrument` wraps the ingress's request handler. It names the request by its route
template (bounded label values: never a raw path), continues the client's trace context
(``traceparent``/``tracestate``, or CloudEvents' ``ce-traceparent``) in a server span that
the handler's appends are children of, and records the answered status and duration. With
metrics and tracing both off it calls the handler and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from broker.http._rsgi import HTTPProtocol, Scope, StreamTransport
from broker.sensitive import redact_text, text_may_hold_card
from broker.telemetry import metrics, tracing
from broker.telemetry.metrics import OTHER_METHOD

#: Status recorded for a request that ended without a response (the client went away).
NO_RESPONSE = 499

#: Exact paths and their labels; operations endpoints are measured but never traced.
_EXACT = {
    "/v1/publish": "/v1/publish",
    "/v1/publish/": "/v1/publish",
    "/v1/agents": "/v1/agents",
    "/healthz": "/healthz",
    "/readyz": "/readyz",
    "/version": "/version",
    "/metrics": "/metrics",
    "/ui": "/ui",
    "/v1/status": "/v1/status",
    "/openapi.json": "/openapi.json",
    "/docs": "/docs",
}
_PREFIXES = (
    ("/v1/publish/", "/v1/publish/{subject}"),
    ("/v1/route/", "/v1/route/{subject}"),
    ("/v1/agents/", "/v1/agents/{name}"),
    ("/v1/streams/", "/v1/streams/{stream}/messages"),
    ("/registry", "/registry"),
)
_UNTRACED = frozenset(
    {"/healthz", "/readyz", "/version", "/metrics", "/ui", "/v1/status", "/openapi.json", "/docs"}
)
OTHER = "other"

#: A request handler: it answers on the protocol object and returns the status it answered
#: with (0 when it answered nothing, e.g. the client went away first).
Handler = Callable[[Scope, HTTPProtocol], Awaitable[int]]
#: What granian calls per request.
Entry = Callable[[Scope, HTTPProtocol], Awaitable[None]]


_span_names: dict[tuple[str, str], str] = {}

#: The longest ``url.path`` a span records (a longer path is cut to this many characters).
URL_PATH_CHARS = 256
#: How many paths :data:`_clean_paths` holds before it starts again from empty.
CLEAN_PATHS_MAX = 4096
#: Recent request paths of at most :data:`URL_PATH_CHARS` characters known to hold no card
#: number: a sampled request's ``url.path`` is then the path itself, without the card scan
#: (a translate, a substring test and a generator: about as much as the request's two spans
#: in a tight loop, and far more when sampling is sparse and that code is cold). Paths that
#: may hold one are never kept, so that no number stays in memory.
_clean_paths: set[str] = set()


def _span_name(method: str, route: str) -> str:
    name = _span_names[(method, route)] = f"{method} {route}"
    return name


def route_of(path: str) -> str:
    """The route template that labels ``path`` in metrics and span names."""
    exact = _EXACT.get(path)
    if exact is not None:
        return exact
    for prefix, route in _PREFIXES:
        if path.startswith(prefix):
            return route
    return OTHER


class StatusRecorder:
    """The RSGI protocol object, remembering the status answered on it: for a
    :data:`Handler` that hands the protocol to code that does not return its status (the
    ASGI bridge, streamed answers). The hottest path (a single publish) returns its status
    instead, which saves this object and a frame per call through it."""

    __slots__ = ("_proto", "status")

    def __init__(self, proto: HTTPProtocol) -> None:
        self._proto = proto
        self.status = 0

    # Plain methods handing back the protocol's own coroutines: no extra frame per call.
    def __call__(self) -> Coroutine[Any, Any, bytes]:
        return self._proto()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._proto.__aiter__()

    def client_disconnect(self) -> Coroutine[Any, Any, None]:
        return self._proto.client_disconnect()

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self._proto.response_bytes(status, headers, body)

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> StreamTransport:
        self.status = status
        return self._proto.response_stream(status, headers)


def instrument(handler: Handler) -> Entry:
    """``handler`` wrapped to run each request inside its server span and count it by the
    status it returns (a handler that raises answered nothing: :data:`NO_RESPONSE`).

    The wrapper is the RSGI entry point itself (granian calls it), so telemetry adds no
    coroutine of its own to a request: inside a loaded worker every frame on the request's
    path costs several times what it does in a tight loop."""

    async def observed(scope: Scope, proto: HTTPProtocol) -> None:
        tracing_on = tracing.enabled()
        if not (tracing_on or metrics.enabled()):
            await handler(scope, proto)
            return
        started = time.perf_counter()
        path = scope.path  # read once: each read of the scope's path makes a new str
        route = route_of(path)
        status = 0
        try:
            if tracing_on and route not in _UNTRACED:
                timing = tracing.edge_timing(route, scope.headers)
                if timing is None:  # not sampled: nothing more to do
                    status = await handler(scope, proto)
                else:  # inline, not a coroutine of its own: see above
                    error: BaseException | None = None
                    try:
                        status = await handler(scope, proto)
                    except BaseException as e:
                        error = e
                        raise
                    finally:
                        _answered(timing, scope, path, route, status, error=error)
            else:
                status = await handler(scope, proto)
        finally:
            # The method as received: the metric bounds its label values when it is flushed.
            metrics.observe_request(
                route, scope.method, status or NO_RESPONSE, time.perf_counter() - started
            )

    return observed


def url_path(path: str) -> str:
    """A request's ``url.path`` attribute: ``path`` cut to :data:`URL_PATH_CHARS`
    characters, with card numbers masked before the cut (as in the logs)."""
    if path in _clean_paths:
        return path
    if text_may_hold_card(path):
        return redact_text(path).value[:URL_PATH_CHARS]
    if len(path) > URL_PATH_CHARS:
        return path[:URL_PATH_CHARS]
    if len(_clean_paths) >= CLEAN_PATHS_MAX:
        _clean_paths.clear()
    _clean_paths.add(path)
    return path


def _answered(
    timing: tracing.Timing,
    scope: Scope,
    path: str,
    route: str,
    status: int,
    *,
    error: BaseException | None,
) -> None:
    """End a request's server span: named ``METHOD route``, the semantic conventions' request
    attributes and the answered status; failed on a 5xx or an exception."""
    method = scope.method
    if method not in metrics.METHODS:
        method = OTHER_METHOD
    status = status or NO_RESPONSE
    tracing.end_timing(
        timing,
        (
            "http.request.method",
            method,
            "http.route",
            route,
            "url.path",
            url_path(path),
            "network.protocol.version",
            scope.http_version,
            "http.response.status_code",
            status,
        ),
        error=error,
        failed=status >= 500,
        name=_span_names.get((method, route)) or _span_name(method, route),
    )
