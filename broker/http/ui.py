"""Operations endpoints: ``/metrics``, ``/v1/status`` and the ``/ui`` status page.

``/metrics`` is the Prometheus text of every process of the broker (see
:mod:`broker.telemetry.metrics`). ``/v1/status`` is :func:`broker.telemetry.status.collect`
as JSON, cached for a second so that any number of open pages cost JetStream and this
process the same: one read a tenant, with the most ``recent`` items a request may ask for,
each answer keeping as many as it asks for (so that asking for each ``recent`` in turn
costs no more reads than asking for one).
``/ui`` is one static HTML file with its script and styles inline (no CDN, no build step):
it polls ``/v1/status`` and draws streams, consumers and lag, agents and their live load,
the DLQ and the latest routing decisions with their candidates' scores and a trace link.
None of these are in the OpenAPI document: they are for operators, not API clients.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, Header, Query
from fastapi.responses import HTMLResponse, Response

import broker
from broker.envelope import Tenant
from broker.errors import NotFound, Unauthenticated, Unavailable
from broker.http.models import ErrorBody
from broker.http.state import IngressState, git_revision
from broker.telemetry import metrics
from broker.telemetry.endpoint import METRICS_OFF, scrape_allowed
from broker.telemetry.status import RECENT_LISTS, BuildInfo, collect
from broker.telemetry.tls_expiry import Expiry, NatsTlsExpiry

_CACHE_SECONDS = 1.0
#: The most ``recent`` items a request may ask for: what every read reads.
_MAX_RECENT = 200
#: A read of the status from JetStream gives up after this long (503), and that tenant's is
#: not tried again for ``_FAILURE_SECONDS``; a request waits ``_WAIT_SECONDS`` at most, its
#: turn behind a read of another tenant's document included.
_READ_SECONDS = 3.0
_FAILURE_SECONDS = 1.0
_WAIT_SECONDS = 5.0
#: The most tenants the cache remembers a document or a failed read of: past it, the least
#: recently read is forgotten (and read again when asked for).
_MAX_TENANTS = 1024
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


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A status document as JSON, encoded once, in pieces: everything but its lists of recent
    items (:data:`RECENT_LISTS`), and each of those items, so that the document with any
    number of them costs a join, not another encoding (nor another copy kept)."""

    rest: bytes  # the JSON object without the recent lists, its closing brace left off
    recent: dict[str, list[bytes]]

    @classmethod
    def of(cls, document: dict[str, Any]) -> _Encoded:
        lists = {name: document.get(name) for name in RECENT_LISTS}
        rest = {key: value for key, value in document.items() if key not in lists}
        return cls(
            rest=_json(rest)[:-1],
            recent={
                name: [_json(item) for item in items]
                for name, items in lists.items()
                if isinstance(items, list)
            },
        )

    def body(self, recent: int) -> bytes:
        """The document with the ``recent`` newest items of each list (they are newest first)."""
        parts = [self.rest]
        comma = b"," if self.rest != b"{" else b""
        for name, items in self.recent.items():
            parts += [comma, _json(name), b":[", b",".join(items[:recent]), b"]"]
            comma = b","
        parts.append(b"}")
        return b"".join(parts)


@dataclass(slots=True)
class _Entry:
    """What the cache knows of one tenant's document (times are ``time.monotonic()``)."""

    document: _Encoded | None = None
    read_at: float = -math.inf
    failed_at: float = -math.inf  # when a read of this tenant's document last failed

    def remembers(self, now: float) -> bool:
        """Whether the document is still fresh or the failure still recent."""
        return now - self.read_at < _CACHE_SECONDS or now - self.failed_at < _FAILURE_SECONDS


class _StatusCache:
    """One status document per second, however many pages poll it and whatever ``recent``
    they ask for; one read of JetStream at a time, shared by the requests that ask for the
    same tenant's document while it runs.

    Each tenant has its own entry: pages of several tenants polling at once each read their
    own document once a second, not each other's out, and a failed read holds back only
    reads of the same tenant's document. Entries are kept while they remember something
    (:meth:`_Entry.remembers`), :data:`_MAX_TENANTS` at most, least recently written first
    out."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.lock = asyncio.Lock()
        self.running: dict[str, asyncio.Future[_Encoded]] = {}

    def fresh(self, tenant: str, now: float) -> _Encoded | None:
        entry = self.entries.get(tenant)
        if entry is not None and now - entry.read_at < _CACHE_SECONDS:
            return entry.document
        return None

    def failed_lately(self, tenant: str, now: float) -> bool:
        """Whether a read of ``tenant``'s document failed within ``_FAILURE_SECONDS``."""
        entry = self.entries.get(tenant)
        return entry is not None and now - entry.failed_at < _FAILURE_SECONDS

    def keep(self, tenant: str, document: _Encoded, read_at: float) -> None:
        entry = self._written(tenant, read_at)
        entry.document, entry.read_at, entry.failed_at = document, read_at, -math.inf

    def failed(self, tenant: str, now: float) -> None:
        self._written(tenant, now).failed_at = now

    def _written(self, tenant: str, now: float) -> _Entry:
        """``tenant``'s entry, now the most recently written one. Entries written before it
        are dropped, oldest first, while they remember nothing or are too many."""
        entry = self.entries.pop(tenant, None) or _Entry()
        while self.entries:
            oldest = next(iter(self.entries.values()))
            if len(self.entries) < _MAX_TENANTS and oldest.remembers(now):
                break
            self.entries.popitem(last=False)
        self.entries[tenant] = entry
        return entry


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Take a shared read's error, whoever awaited it (all may have stopped waiting)."""
    if not future.cancelled():
        future.exception()


def _json(document: Any) -> bytes:
    """The status document as JSON. orjson writes a float JSON cannot carry (infinity, NaN)
    as ``null`` where Starlette's ``JSONResponse`` raised: one agent's absurd heartbeat must
    not turn every reader's status into a 500."""
    return orjson.dumps(document)


def _status_documents(state: IngressState) -> Callable[[int], Awaitable[bytes]]:
    """What answers ``/v1/status``: the tenant's document with ``recent`` recent items."""
    cache = _StatusCache()
    # With tenants, a page shows its own tenant's dead letters only: projections' dead
    # letters (``dlq.<STREAM>.…``) point at any tenant's messages.
    authenticating = state.settings.auth_configured

    async def status_document(recent: int) -> bytes:
        """The status document, from the cache or a read shared with other requests: 503
        at once while NATS is not connected or a read of the tenant's document failed
        within the last second, and after :data:`_WAIT_SECONDS` at most (a stalled NATS
        answers each read only at its own timeout, and requests queued behind one another
        waited 5 s more each)."""
        tenant = state.tenant
        now = time.monotonic()
        if (document := cache.fresh(tenant, now)) is not None:
            return document.body(recent)
        if cache.failed_lately(tenant, now):
            raise Unavailable("the status could not be read a moment ago; try again shortly")
        if not state.publisher.nc.is_connected:  # 503 until NATS is connected, too
            raise Unavailable("NATS is not connected")
        running = cache.running.get(tenant)
        if running is None:
            running = cache.running[tenant] = asyncio.ensure_future(read(tenant))
            running.add_done_callback(_retrieved)
            running.add_done_callback(lambda _: cache.running.pop(tenant, None))
        try:
            async with asyncio.timeout(_WAIT_SECONDS):
                document = await asyncio.shield(running)
        except TimeoutError:
            raise Unavailable(
                f"the status was not read within {_WAIT_SECONDS:g} s (NATS slow or busy)"
            ) from None
        return document.body(recent)

    async def read(tenant: Tenant) -> _Encoded:
        async with cache.lock:  # one read of JetStream at a time
            now = time.monotonic()
            if (document := cache.fresh(tenant, now)) is not None:
                return document
            try:
                async with asyncio.timeout(_READ_SECONDS):
                    document = await read_status(tenant)
            except TimeoutError:
                cache.failed(tenant, time.monotonic())
                raise Unavailable(
                    f"NATS did not answer the status reads within {_READ_SECONDS:g} s"
                ) from None
            except BaseException:
                cache.failed(tenant, time.monotonic())
                raise
            cache.keep(tenant, document, now)
            return document

    async def read_status(tenant: Tenant) -> _Encoded:
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
            recent=_MAX_RECENT,
            trace_url=state.settings.trace_url,
            all_dead_letters=not authenticating,
        )
        return _Encoded.of(result.to_dict())

    return status_document


_STATUS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The status document: `streams`, `consumers`, `agents`, the recent "
        "route decisions and DLQ entries, and when it was read.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    422: {"model": ErrorBody, "description": "`recent` out of range."},
    503: {"model": ErrorBody, "description": "JetStream did not answer in time."},
}


def _exposition(ingress_tls: list[Expiry], nats_tls: NatsTlsExpiry) -> bytes:
    """``/metrics``' body: every process's metrics, then when the TLS files stop being
    valid: the ingress's as this worker read them, the NATS client's as they are now."""
    return metrics.render() + metrics.tls_expiry_exposition([*ingress_tls, *nats_tls.samples()])


def ops_router(state: IngressState) -> APIRouter:
    router = APIRouter(tags=["operations"])  # /metrics and /ui are not part of the API
    status_document = _status_documents(state)

    secret = state.settings.metrics_token
    token = secret.get_secret_value() if secret is not None else None
    # Read as this worker starts, as granian's worker read the files it serves with: after a
    # reload the new workers report the new files, and a refused reload the ones still used.
    from broker.http.tls import tls_expiries

    ingress_tls = [
        (kind, str(path), expires.timestamp())
        for kind, path, expires in tls_expiries(state.settings)
    ]
    nats_tls = NatsTlsExpiry(state.settings)

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(authorization: str | None = Header(None)) -> Response:
        """Prometheus text exposition of every broker process (with ``BROKER_METRICS_TOKEN``
        set, to scrapes that present it); 404 when ``BROKER_METRICS=false``."""
        if not scrape_allowed(token, authorization):
            raise Unauthenticated("/metrics needs Authorization: Bearer <BROKER_METRICS_TOKEN>")
        if not metrics.enabled():
            # Nothing is recorded: a 200 would read as a broker with no traffic at all.
            raise NotFound(METRICS_OFF)
        metrics.flush()  # this process's latest counts first (on the loop's thread)
        body = await asyncio.to_thread(_exposition, ingress_tls, nats_tls)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    @router.get("/v1/status", responses=_STATUS_RESPONSES)
    async def broker_status(
        recent: int = Query(20, ge=1, le=_MAX_RECENT, description="Newest items of each list."),
    ) -> Response:
        """Streams, consumers and lag, agents and load, the DLQ's and the routes' tails: the
        document `broker status --json` prints and `/ui` draws (docs/observability.md). Read
        from JetStream at most once a second per tenant."""
        body = await status_document(recent)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})

    @router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        """The status page (works offline: no external resources)."""
        return HTMLResponse(ui_page(), headers=_UI_HEADERS)

    return router
