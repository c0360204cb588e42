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
from broker.errors import Unauthenticated
from broker.http.state import IngressState, git_revision
from broker.telemetry import metrics
from broker.telemetry.endpoint import scrape_allowed
from broker.telemetry.status import BuildInfo, collect

_CACHE_SECONDS = 1.0
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
    """One status document per second, however many pages poll it."""

    def __init__(self) -> None:
        self.at = 0.0
        self.key: tuple[str, int] = ("", 0)
        self.body: bytes | None = None
        self.lock = asyncio.Lock()


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
        tenant = state.tenant
        async with cache.lock:
            now = time.monotonic()
            key = (tenant, recent)
            if cache.body is not None and cache.key == key and now - cache.at < _CACHE_SECONDS:
                return cache.body
            build = BuildInfo(
                version=broker.__version__,
                git_revision=git_revision(),
                nats_server_version=state.publisher.server_version,
                tenant=tenant,
            )
            snapshot = state.registry.snapshot
            result = await collect(
                state.publisher.nc,  # 503 until NATS is connected
                build=build,
                registered=snapshot.agents(tenant),
                recent=recent,
                trace_url=state.settings.trace_url,
                all_dead_letters=not authenticating,
            )
            cache.body, cache.at, cache.key = _json(result.to_dict()), now, key
            return cache.body

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
