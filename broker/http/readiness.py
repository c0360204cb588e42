"""``/readyz``: can this ingress take writes, answered within a probe's timeout; and is any
router pulling work.

Ready means what this ingress needs to append: NATS connected and answering, every broker
stream present, the registry snapshot caught up. Routers are not part of it: they are
separate processes (``broker router``, here or on other machines), and an ingress without
them still stores what it is sent (``POST /v1/route`` keeps a message until a router
runs). Whether one runs is reported beside ``ready`` (``routers_live``), read from the
routers' shared durable consumers: a live router nearly always has a pull request waiting
on ``router`` or ``router-retries`` (each fetch waits at most a second, then asks again;
:data:`ROUTER_GRACE_SECONDS` covers the moments it has none), and the server drops the
requests of a client that is gone.

Each check asks NATS at most for :data:`BUDGET_SECONDS`. A server that does not answer
(hung, partitioned, overloaded) used to hold the answer for the JetStream API timeout,
5 s, past a Kubernetes probe's default 1 s: the probe timed out instead of hearing 503.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.publisher import Publisher
from broker.registry.snapshot import RegistryView
from broker.routing.router import RETRY_CONSUMER, ROUTER_CONSUMER
from broker.streams import Stream, missing_streams

#: The longest a check waits for NATS; under a probe's usual 1 s timeout, with room for
#: the request itself. A healthy JetStream answers the few info requests in milliseconds.
BUDGET_SECONDS = 0.5
#: A result is reused this long: probes from several balancers share a check.
CACHE_SECONDS = 1.0
#: Routers count as live this long after one was last seen waiting for work: a router
#: busy with a batch, its event loop taken, may have no pull request out for a moment.
ROUTER_GRACE_SECONDS = 3.0

_ROUTER_CONSUMERS = ((Stream.MESSAGES, ROUTER_CONSUMER), (Stream.ROUTES, RETRY_CONSUMER))
NATS_UNAVAILABLE = "nats_unavailable"
NOT_READY = "not_ready"


@dataclass(frozen=True, slots=True)
class Readiness:
    """One check's result; ``error_code`` and ``message`` say why when not ready."""

    ready: bool
    nats_connected: bool
    missing_streams: list[str] = field(default_factory=list)
    registry_ready: bool = False
    #: ``None`` when NATS did not say.
    routers_live: bool | None = None
    error_code: str | None = None
    message: str | None = None


async def routers_waiting(js: JetStreamContext) -> int:
    """Pull requests waiting on the routers' durable consumers (0 before any router ran)."""
    waiting = 0
    for stream, name in _ROUTER_CONSUMERS:
        try:
            info = await js.consumer_info(stream, name)
        except NotFoundError:
            continue
        waiting += info.num_waiting or 0
    return waiting


class ReadinessCheck:
    """The ingress's readiness, asked of NATS at most once per :data:`CACHE_SECONDS`."""

    def __init__(
        self,
        publisher: Publisher,
        registry: RegistryView,
        *,
        budget: float = BUDGET_SECONDS,
    ) -> None:
        self.publisher = publisher
        self.registry = registry
        self.budget = budget
        self._last: Readiness | None = None
        self._last_at = 0.0
        self._routers_seen_at: float | None = None

    async def check(self) -> Readiness:
        now = time.monotonic()
        if self._last is None or now - self._last_at >= CACHE_SECONDS:
            self._last, self._last_at = await self._probe(), now
        return self._last

    async def _probe(self) -> Readiness:
        registry_ready = self.registry.ready
        if not self.publisher.connected:
            return Readiness(
                ready=False,
                nats_connected=False,
                registry_ready=registry_ready,
                error_code=NATS_UNAVAILABLE,
                message="NATS is not connected",
            )
        try:
            js = self.publisher.js
            async with asyncio.timeout(self.budget):
                missing, waiting = await asyncio.gather(missing_streams(js), routers_waiting(js))
        except TimeoutError:
            why = f"NATS did not answer the readiness check within {self.budget:g} s"
        except Exception as e:  # any NATS error here means not ready, whatever it is
            why = f"NATS failed the readiness check ({type(e).__name__})"
        else:
            return self._result(missing, registry_ready, waiting)
        return Readiness(
            ready=False,
            nats_connected=self.publisher.connected,
            registry_ready=registry_ready,
            error_code=NATS_UNAVAILABLE,
            message=why,
        )

    def _result(self, missing: list[str], registry_ready: bool, waiting: int) -> Readiness:
        now = time.monotonic()
        if waiting:
            self._routers_seen_at = now
        seen = self._routers_seen_at
        live = seen is not None and now - seen < ROUTER_GRACE_SECONDS
        why = None
        if missing:
            why = f"streams missing: {', '.join(missing)} (`broker serve` creates them at start)"
        elif not registry_ready:
            why = "the registry snapshot is still catching up with its stream"
        return Readiness(
            ready=why is None,
            nats_connected=True,
            missing_streams=missing,
            registry_ready=registry_ready,
            routers_live=live,
            error_code=None if why is None else NOT_READY,
            message=why,
        )
