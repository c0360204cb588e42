"""Operations endpoints: ``/metrics``, ``/v1/status`` and the ``/ui`` status page.

``/metrics`` is the Prometheus text of every process of the broker (see
:mod:`broker.telemetry.metrics`). ``/v1/status`` is :func:`broker.telemetry.status.collect`
as JSON, cached (encoded) for a second so that any number of open pages cost JetStream and
this process the same.
``/ui`` is one static HTML file with its script and styles inline (no CDN, no build step):
it polls ``/v1/status`` and draws streams, consumers and lag, agents and their live load,
the DLQ and the latest routing decisions with their candidates' scores and a trace link.
None of these are in the OpenAPI document: they are for operators, not API clients.
"""

from __future__ import annotations

import asyncio
import time
from functools import lru_cache
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, Header, Query
from fastapi.responses import HTMLResponse, Response

import broker
from broker.envelope import Tenant
from broker.errors import Unauthenticated, Unavailable
from broker.http.state import IngressState, git_revision
from broker.telemetry import metrics
from broker.telemetry.endpoint import scrape_allowed
from broker.telemetry.status import BuildInfo, collect

_CACHE_SECONDS = 1.0
#: A read of the status from JetStream gives up after this long (503), and is not tried
#: again for ``_FAILURE_SECONDS``; a request waits ``_WAIT_SECONDS`` at most, its turn
#: behind a read of another document included.
_READ_SECONDS = 3.0
_FAILURE_SECONDS = 1.0
_WAIT_SECONDS = 5.0
_UI_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@lru_cache(maxsize=1)
def ui_page() -> bytes:
    """The status page, shipped inside the package (``broker/http/static/ui.html``)."""
    return resources.files("broker.http").joinpath("static/ui.html").read_bytes()


class _StatusCache:
    """One status document per second, however many pages poll it; one read of JetStream at
    a time, shared by the requests that ask for the same document while it runs."""

    def __init__(self) -> None:
        self.at = 0.0
        self.key: tuple[str, int] = ("", 0)
        self.body: bytes | None = None
        self.lock = asyncio.Lock()
        self.failed_at = -_FAILURE_SECONDS  # when a read last failed (monotonic)
        self.running: dict[tuple[str, int], asyncio.Future[bytes]] = {}

    def fresh(self, key: tuple[str, int], now: float) -> bytes | None:
        if self.body is not None and self.key == key and now - self.at < _CACHE_SECONDS:
            return self.body
        return None


def _retrieved(future: asyncio.Future[bytes]) -> None:
    """Take a shared read's error, whoever awaited it (all may have stopped waiting)."""
    if not future.cancelled():
        future.exception()


def _json(document: dict[str, Any]) -> bytes:
    """The status document as JSON. orjson writes a float JSON cannot carry (infinity, NaN)
    as ``null`` where Starlette's ``JSONResponse`` raised: one agent's absurd heartbeat must
    not turn every reader's status into a 500."""
    return orjson.dumps(document)


def ops_router(state: IngressState) -> APIRouter:
    router = APIRouter(tags=["operations"], include_in_schema=False)
    cache = _StatusCache()
    # With tenants, a page shows its own tenant's dead letters only: projections' dead
    # letters (``dlq.<STREAM>.…``) point at any tenant's messages.
    authenticating = state.settings.auth_configured

    async def status_document(recent: int) -> bytes:
        """The status document, from the cache or a read shared with other requests: 503
        at once while NATS is not connected or a read failed within the last second, and
        after :data:`_WAIT_SECONDS` at most (a stalled NATS answers each read only at its
        own timeout, and requests queued behind one another waited 5 s more each)."""
        key = (state.tenant, recent)
        now = time.monotonic()
        if (body := cache.fresh(key, now)) is not None:
            return body
        if now - cache.failed_at < _FAILURE_SECONDS:
            raise Unavailable("the status could not be read a moment ago; try again shortly")
        if not state.publisher.nc.is_connected:  # 503 until NATS is connected, too
            raise Unavailable("NATS is not connected")
        running = cache.running.get(key)
        if running is None:
            running = cache.running[key] = asyncio.ensure_future(read(key))
            running.add_done_callback(_retrieved)
            running.add_done_callback(lambda _: cache.running.pop(key, None))
        try:
            async with asyncio.timeout(_WAIT_SECONDS):
                return await asyncio.shield(running)
        except TimeoutError:
            raise Unavailable(
                f"the status was not read within {_WAIT_SECONDS:g} s (NATS slow or busy)"
            ) from None

    async def read(key: tuple[Tenant, int]) -> bytes:
        tenant, recent = key
        async with cache.lock:  # one read of JetStream at a time
            now = time.monotonic()
            if (body := cache.fresh(key, now)) is not None:
                return body
            try:
                async with asyncio.timeout(_READ_SECONDS):
                    body = await read_status(tenant, recent)
            except BaseException:
                cache.failed_at = time.monotonic()
                raise
            cache.body, cache.at, cache.key = body, now, key
            return body

    async def read_status(tenant: Tenant, recent: int) -> bytes:
        build = BuildInfo(
            version=broker.__version__,
            git_revision=git_revision(),
            nats_server_version=state.publisher.server_version,
            tenant=tenant,
        )
        snapshot = state.registry.snapshot
        result = await collect(
            state.publisher.nc,
            build=build,
            registered=snapshot.agents(tenant),
            recent=recent,
            trace_url=state.settings.trace_url,
            all_dead_letters=not authenticating,
        )
        return _json(result.to_dict())

    secret = state.settings.metrics_token
    token = secret.get_secret_value() if secret is not None else None

    @router.get("/metrics")
    async def prometheus_metrics(authorization: str | None = Header(None)) -> Response:
        """Prometheus text exposition of every broker process (with ``BROKER_METRICS_TOKEN``
        set, to scrapes that present it)."""
        if not scrape_allowed(token, authorization):
            raise Unauthenticated("/metrics needs Authorization: Bearer <BROKER_METRICS_TOKEN>")
        metrics.flush()  # this process's latest counts first (on the loop's thread)
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    @router.get("/v1/status")
    async def broker_status(recent: int = Query(20, ge=1, le=200)) -> Response:
        """Streams, consumers and lag, agents and load, the DLQ's and the routes' tails."""
        body = await status_document(recent)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})

    @router.get("/ui", response_class=HTMLResponse)
    async def status_page() -> HTMLResponse:
        """The status page (works offline: no external resources)."""
        return HTMLResponse(ui_page(), headers=_UI_HEADERS)

    return router
