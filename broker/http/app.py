"""The ingress application, served by granian over RSGI.

A thin dispatcher: the publish hot paths go straight to RSGI handlers
(:mod:`broker.http.publish`); everything else (health, version, the OpenAPI document, later
the registry APIs) is a FastAPI app reached through a small RSGI-to-ASGI bridge. Errors from
either side answer ``{"error_code", "message"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
from typing import Any

import nats.errors
import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from granian._granian import RSGIProtocolClosed, RSGIProtocolError
from starlette.exceptions import HTTPException as StarletteHTTPException

import broker
from broker._process import die_with_parent, tune_gc
from broker.auth import PUBLIC_PATHS, TENANT_HEADER, Authenticator, bind, required_scopes
from broker.errors import (
    BrokerError,
    Forbidden,
    NotFound,
    PublishTimeout,
    RequestTimeout,
    SchemaRegistryError,
    Unauthenticated,
    Unavailable,
)
from broker.http._asgi_bridge import call_asgi
from broker.http._rsgi import (
    DISCARDED_UNKNOWN_BYTES,
    HTTPProtocol,
    Scope,
    StreamTransport,
    check_headers,
    discard_body,
    respond_error,
    respond_json,
)
from broker.http.agents import agents_router
from broker.http.models import ErrorBody, Health, ReadinessBody, VersionBody
from broker.http.openapi import add_publish_paths, add_security
from broker.http.publish import publish_batch, publish_one
from broker.http.replay import replay_router
from broker.http.route import route_one
from broker.http.schema_registry import MEDIA_TYPE as REGISTRY_MEDIA_TYPE
from broker.http.schema_registry import PREFIX as REGISTRY_PREFIX
from broker.http.schema_registry import RegistryJSON, schema_registry_router
from broker.http.state import IngressState, git_revision
from broker.http.ui import ops_router
from broker.natsconn import LogThrottle, connect_options
from broker.publisher import Publisher, map_nats_error
from broker.sensitive import redact_text
from broker.settings import Settings, get_settings
from broker.telemetry import metrics
from broker.telemetry.http import Entry, StatusRecorder, instrument

log = structlog.get_logger(__name__)

_PUBLISH_PREFIX = "/v1/publish/"
_ROUTE_PREFIX = "/v1/route/"
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (404, 422, 503)
}


def _in_registry(request: Request) -> bool:
    return request.url.path.startswith(REGISTRY_PREFIX + "/")


def _registry_code(status: int, *, timeout: bool) -> int:
    """Confluent's integer code for a broker error met on a schema registry path."""
    if status >= 500:
        return 50002 if timeout else 50001
    return status


def _meta_app(state: IngressState) -> FastAPI:
    app = FastAPI(
        title="agent-broker",
        version=broker.__version__,
        description=(
            "An event-sourced agent broker on NATS JetStream. Every message is appended to a "
            "stream before it is acknowledged; everything else is a projection."
        ),
        docs_url="/docs",
        redoc_url=None,
    )

    app.include_router(agents_router(state))
    app.include_router(replay_router(state))
    app.include_router(schema_registry_router(state))
    app.include_router(ops_router(state))

    @app.exception_handler(BrokerError)
    async def _broker_error(request: Request, exc: BrokerError) -> JSONResponse:
        headers = dict(exc.headers)  # e.g. a 401's WWW-Authenticate
        if exc.retryable:
            headers["Retry-After"] = str(state.settings.retry_after_seconds)
        body = exc.to_dict()
        if not _in_registry(request):
            return JSONResponse(body, status_code=exc.status, headers=headers)
        if not isinstance(exc, SchemaRegistryError):
            body["error_code"] = _registry_code(exc.status, timeout=isinstance(exc, PublishTimeout))
        return RegistryJSON(body, status_code=exc.status, headers=headers)

    @app.exception_handler(nats.errors.Error)
    async def _nats_error(request: Request, exc: nats.errors.Error) -> JSONResponse:
        """NATS away or refusing (agents, replay, schema registry): 503 and friends, as
        ``/v1/publish`` answers, not a bare 500."""
        error = map_nats_error(exc)
        if isinstance(error, PublishTimeout) and request.method in ("GET", "HEAD"):
            error = Unavailable("NATS did not answer in time")  # a read: nothing was written
        return await _broker_error(request, error)

    @app.exception_handler(Exception)
    async def _crashed(request: Request, exc: Exception) -> JSONResponse:
        """A bug, not bad input: answered in the API's shape (Starlette's own answer is plain
        text, sent before the ingress could step in). Starlette raises it on afterwards, and
        the ingress logs it with its traceback (``request_crashed``)."""
        return await _broker_error(request, BrokerError("internal error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if _in_registry(request):  # an unknown path, a method, a body that is no JSON
            body = {"error_code": exc.status_code, "message": str(exc.detail)}
            return RegistryJSON(body, status_code=exc.status_code, headers=headers)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error_code": code, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        message = fields or "invalid request"
        if _in_registry(request):  # Confluent's clients expect an integer code
            return RegistryJSON({"error_code": 422, "message": message}, status_code=422)
        return JSONResponse({"error_code": "unprocessable", "message": message}, status_code=422)

    @app.get("/healthz", tags=["operations"], response_model=Health)
    async def healthz() -> Health:
        """The process is alive (says nothing about NATS)."""
        return Health()

    @app.get(
        "/readyz",
        tags=["operations"],
        response_model=ReadinessBody,
        responses={503: {"model": ReadinessBody}},
    )
    async def readyz() -> JSONResponse:
        """Ready to take writes: NATS connected and answering, every broker stream present,
        the registry caught up; answered within half a second. ``routers_live`` says
        whether any router is running, without making the ingress unready."""
        r = await state.readiness.check()
        body = ReadinessBody(
            ready=r.ready,
            nats_connected=r.nats_connected,
            missing_streams=r.missing_streams,
            registry_ready=r.registry_ready,
            routers_live=r.routers_live,
            error_code=r.error_code,
            message=r.message,
        )
        document = body.model_dump(exclude={"error_code", "message"} if r.ready else None)
        return JSONResponse(document, status_code=200 if r.ready else 503)

    @app.get("/version", tags=["operations"], response_model=VersionBody)
    async def version() -> VersionBody:
        """Package version, git revision and the NATS server version."""
        nats_version = None
        if state.publisher.connected:
            nats_version = state.publisher.server_version
        return VersionBody(
            version=broker.__version__,
            git_revision=git_revision(),
            nats_server_version=nats_version,
            python=platform.python_version(),
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = add_security(add_publish_paths(document), PUBLIC_PATHS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


#: ``request_failed`` lines let through: one per error text every 10 s.
_failures = LogThrottle(10.0)


def _loggable(path: str) -> str:
    """A request path for the log: card numbers masked first, then cut to 100 characters
    (cut first, a number the cut split kept its leading digits in clear)."""
    return redact_text(path).value[:100]


class _NoBody:
    """A stream answer's transport for a HEAD request: what is sent goes nowhere."""

    async def send_bytes(self, data: bytes) -> None:
        return None


class _Bodiless(StatusRecorder):
    """The protocol object of a HEAD request: every answer without its body. granian sends
    the body it is given; over HTTP/2 a HEAD answer with DATA frames is a protocol error to
    the client, which then sees no answer at all."""

    __slots__ = ()

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().response_bytes(status, headers, b"")

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> StreamTransport:
        super().response_bytes(status, headers, b"")
        return _NoBody()


class BrokerApp:
    """The RSGI application granian serves (``broker.http.app:create_app``, factory mode)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        servers = (self.settings.nats_url or "nats://127.0.0.1:4222").split(",")
        name = f"broker-ingress-{os.getpid()}"
        self.publisher = Publisher(
            servers,
            name=name,
            publish_timeout=self.settings.publish_timeout,
            connect_timeout=self.settings.nats_connect_timeout,
            connect_options=connect_options(self.settings, name=name),
        )
        self.auth = Authenticator.from_settings(self.settings)
        self.state = IngressState(self.settings, self.publisher)
        self.meta = _meta_app(self.state)
        self._entry = instrument(self._serve)  # the request's span and metrics

    @property
    def __rsgi__(self) -> Entry:
        """What granian calls per request (it looks the attribute up once, on this object)."""
        return self._entry

    async def _serve(self, scope: Scope, proto: HTTPProtocol) -> int:
        """Answer one request; the status answered with (0: none, the client went away)."""
        path = scope.path
        if scope.method == "HEAD":
            proto = _Bodiless(proto)
        try:
            headers = scope.headers
            check_headers(headers)  # before anything reads one: unreadable is not absent
            if (needed := required_scopes(scope.method, path)) is not None:
                principal = self.auth.authenticate(headers)
                principal.require(needed)
                bind(principal, principal.tenant(headers.get(TENANT_HEADER)))
            subject = path[len(_PUBLISH_PREFIX) :] if path.startswith(_PUBLISH_PREFIX) else ""
            if subject and scope.method == "POST":  # the hottest path: a coroutine less
                return await publish_one(self.state, scope, proto, subject)
            if path.startswith("/v1/publish"):
                return await self._publish(scope, proto, path)
            recorder = StatusRecorder(proto)
            if path.startswith(_ROUTE_PREFIX):
                await self._route(scope, recorder, path)
            else:
                await call_asgi(
                    self.meta, scope, recorder, body_limit=self.settings.max_api_body_bytes
                )
            return recorder.status
        except (Unauthenticated, Forbidden) as e:
            log.info("request_refused", error_code=e.error_code, path=_loggable(path))
            await discard_body(proto, scope.headers, DISCARDED_UNKNOWN_BYTES)
            self._refuse(proto, path, e, e.status * 100 + 1)
            return e.status
        except BrokerError as e:
            # One line per error every 10 s, with how many were held back: while NATS is
            # away or its store is full every publish fails alike (thousands a second).
            if e.status >= 500 and (held := _failures.admit(e.message)) is not None:
                log.warning(
                    "request_failed", error_code=e.error_code, message=e.message, repeated=held
                )
            code = _registry_code(e.status, timeout=isinstance(e, PublishTimeout))
            if not isinstance(e, RequestTimeout):  # a body too slow to arrive is not awaited
                await discard_body(proto, scope.headers)
            self._refuse(proto, path, e, code)
            return e.status
        except (RSGIProtocolClosed, RSGIProtocolError):
            log.info("client_disconnected", path=_loggable(path))
            return 0
        except Exception:
            # A bug, not bad input: log it with its traceback and answer in the API's shape.
            log.exception("request_crashed", path=_loggable(path), method=scope.method)
            crashed = BrokerError("internal error")
            with contextlib.suppress(RSGIProtocolError, RuntimeError):
                respond_error(proto, crashed, retry_after=self.settings.retry_after_seconds)
            return crashed.status

    def _refuse(self, proto: HTTPProtocol, path: str, error: BrokerError, code: int) -> None:
        """Answer an error met before a handler took the request: on a schema registry path
        with the integer ``code`` Confluent's clients expect, elsewhere as everywhere."""
        if path.startswith(REGISTRY_PREFIX + "/"):
            body = {"error_code": code, "message": error.message}
            answer = [("content-type", REGISTRY_MEDIA_TYPE), *error.headers]
            if error.retryable:
                answer.append(("retry-after", str(self.settings.retry_after_seconds)))
            proto.response_bytes(error.status, answer, orjson.dumps(body))
        else:
            respond_error(proto, error, retry_after=self.settings.retry_after_seconds)

    async def _publish(self, scope: Scope, proto: HTTPProtocol, path: str) -> int:
        """``/v1/publish...`` but a single ``POST`` (:meth:`_serve` awaits that one itself)."""
        if scope.method != "POST":
            respond_json(
                proto,
                405,
                {"error_code": "method_not_allowed", "message": "publish takes POST"},
                [("allow", "POST")],
            )
            return 405
        if path in {"/v1/publish", "/v1/publish/"}:
            recorder = StatusRecorder(proto)  # a streamed batch answers before it ends
            await publish_batch(self.state, scope, recorder)
            return recorder.status
        raise NotFound(f"no such path {path[:100]!r}")

    async def _route(self, scope: Scope, proto: HTTPProtocol, path: str) -> None:
        if scope.method != "POST":
            respond_json(
                proto,
                405,
                {"error_code": "method_not_allowed", "message": "route takes POST"},
                [("allow", "POST")],
            )
            return
        await route_one(self.state, scope, proto, path[len(_ROUTE_PREFIX) :])

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Workers stop on their supervisor's SIGTERM only. When granian runs in a terminal's
        # process group, Ctrl-C would also reach every worker directly, and a worker handling
        # two stop signals at once was seen to deadlock in granian's shutdown.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.run_until_complete(self.startup())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.shutdown())

    async def startup(self) -> None:
        """Die with the parent (no orphaned workers) and start connecting to NATS."""
        die_with_parent(signal.SIGTERM)
        self.publisher.on_connected(self._start_registry)
        self.publisher.on_connected(self._record_build_info)
        self.publisher.on_reconnected(self._record_build_info)  # maybe another version now
        self.publisher.on_connected(self._tune_gc)  # last: after what start-up builds
        # Connect in the background and return at once: a worker busy in its start-up hook
        # was seen to miss granian's stop signal. Until NATS answers, /readyz says so and
        # publishes get 503.
        self.publisher.start()
        log.info("ingress_worker_started", pid=os.getpid())

    async def _start_registry(self) -> None:
        await self.state.registry.start(self.publisher.js)

    async def _record_build_info(self) -> None:
        metrics.build_info(broker.__version__, git_revision(), self.publisher.server_version)

    async def _tune_gc(self) -> None:
        log.debug("gc_tuned", frozen=tune_gc())

    async def shutdown(self) -> None:
        await self.publisher.close()
        from broker.telemetry import shutdown as flush_telemetry

        flush_telemetry()  # export the spans still buffered
        log.info("ingress_worker_stopped", pid=os.getpid())


def create_app() -> BrokerApp:
    """Application factory for granian (``broker.http.app:create_app``, factory mode)."""
    from broker.logs import configure_logging
    from broker.telemetry import setup

    configure_logging()
    setup("ingress")
    return BrokerApp()
