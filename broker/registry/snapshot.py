"""The registry as readers see it: immutable snapshots, swapped whole (copy-on-write).

:class:`RegistrySnapshot` is a value: applying an event returns a new snapshot that shares
every untouched tenant with the old one. :class:`RegistryView` holds the current snapshot
of one process and keeps it up to date from the ``REGISTRY`` stream through an ordered
push consumer; readers take ``view.snapshot`` (one attribute read, no lock) and can never
see a half-applied change. An event this release cannot read is skipped (logged once, counted
in ``view.skipped``): the view still moves past it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from broker.envelope import Tenant
from broker.registry.events import (
    RegistryEvent,
    RegistryEventType,
    UnreadableEvent,
    decode_message,
)
from broker.registry.manifest import AgentManifest, AgentName
from broker.streams import Stream

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An agent as registered now: its manifest and the event that made it so."""

    tenant: Tenant
    name: AgentName
    manifest: AgentManifest
    seq: int
    registered_seq: int
    updated_at: datetime | None


AgentKey = tuple[str, str]  # (tenant, name)


class RegistrySnapshot(dict[AgentKey, AgentRecord]):
    """An immutable registry state after the events up to ``last_seq``.

    A dict keyed by ``(tenant, name)``, so the hot path is C-level:
    ``snapshot.get((tenant, name))``. Mutating methods raise; a change makes a new snapshot
    (:meth:`apply`, :func:`fold`) and the old one stays valid for whoever still reads it.
    """

    __slots__ = ("last_seq",)

    def __init__(
        self, agents: Mapping[AgentKey, AgentRecord] | None = None, last_seq: int = 0
    ) -> None:
        super().__init__(agents or {})
        self.last_seq = last_seq

    def _immutable(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a RegistrySnapshot is immutable; apply events to get a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _immutable
    __ior__ = _immutable

    def agent(self, tenant: Tenant, name: str) -> AgentRecord | None:
        return self.get((tenant, name))

    def agents(self, tenant: Tenant) -> list[AgentRecord]:
        """The tenant's agents, by name."""
        return sorted((r for (t, _), r in self.items() if t == tenant), key=lambda r: r.name)

    def apply(self, event: RegistryEvent) -> RegistrySnapshot:
        """The snapshot after ``event``; ``self`` is left as it was."""
        return fold([event], self)

    def past(self, seq: int) -> RegistrySnapshot:
        """The same registry, after stream sequence ``seq`` too: the events up to it that are
        not applied could not be read, and whoever waits for one of them must stop waiting."""
        return self if seq <= self.last_seq else RegistrySnapshot(self, seq)


def fold(events: Iterable[RegistryEvent], base: RegistrySnapshot | None = None) -> RegistrySnapshot:
    """Apply ``events`` in stream order onto a copy of ``base`` (one copy per call)."""
    agents: dict[AgentKey, AgentRecord] = dict(base) if base else {}
    last_seq = base.last_seq if base else 0
    for event in events:
        if event.seq and event.seq <= last_seq:
            continue  # already applied (redelivery)
        key = (event.tenant, event.name)
        if event.type is RegistryEventType.DEREGISTERED or event.manifest is None:
            agents.pop(key, None)
        else:
            previous = agents.get(key)
            agents[key] = AgentRecord(
                tenant=event.tenant,
                name=event.name,
                manifest=event.manifest,
                seq=event.seq,
                registered_seq=previous.registered_seq if previous else event.seq,
                updated_at=event.at,
            )
        last_seq = max(last_seq, event.seq)
    return RegistrySnapshot(agents, last_seq)


#: Events folded at once while a view replays the stream's history.
_REPLAY_BATCH = 512
#: Seconds between the server's idle heartbeats to a view's ordered consumer. nats-py checks
#: every two of them and recreates the consumer (from the next sequence) when none came, so
#: this bounds how long a view stays stale when its consumer is lost (a NATS restart drops
#: it): under 2 s, where nats-py's default, 5 s, left views 5 to 20 s behind. The cost: about
#: two header-only messages a second per idle view.
IDLE_HEARTBEAT = 0.5


class RegistryView:
    """One process's live registry, fed by an ordered push consumer on ``REGISTRY``."""

    def __init__(self) -> None:
        self.snapshot = RegistrySnapshot()
        self._advanced = asyncio.Condition()
        self._subscription: object | None = None
        self._caught_up = asyncio.Event()
        # While replaying up to ``_target``, events are folded in batches (one copy of the
        # registry per batch, not per event: a long history replays in linear time).
        self._target = 0
        self._replayed: list[RegistryEvent] = []
        self._received = 0  # the last event's sequence, folded, skipped or not yet folded
        self.skipped = 0  # events that could not be read, since start

    async def start(self, js: JetStreamContext, *, stalled_after: float = 30.0) -> None:
        """Replay the stream from its start, then follow it; returns once caught up, or
        once the replay made no progress for ``stalled_after`` seconds (logged)."""
        if self._subscription is not None:
            return
        info = await js.stream_info(Stream.REGISTRY)
        self._target = target = info.state.last_seq
        self._subscription = await js.subscribe(
            "reg.>",
            stream=Stream.REGISTRY,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            idle_heartbeat=IDLE_HEARTBEAT,
            cb=self._on_message,
        )
        received = self._received
        while not await self.wait_for(target, stalled_after):
            if self._received == received:  # nothing came for a whole wait
                log.error("registry_view_incomplete", seq=self._received, target=target)
                break
            received = self._received  # still replaying: keep waiting while it advances
        self._flush()
        self._caught_up.set()
        log.info("registry_view_ready", agents=len(self.snapshot), seq=self.snapshot.last_seq)

    @property
    def ready(self) -> bool:
        return self._caught_up.is_set()

    async def _on_message(self, message: Msg) -> None:
        seq = message.metadata.sequence.stream
        try:
            self._replayed.append(decode_message(message))
        except UnreadableEvent as e:
            if seq > self._received:  # not a redelivery of one already logged
                self.skipped += 1
                log.error("registry_event_unreadable", subject=e.subject, seq=seq, error=e.message)
        self._received = max(self._received, seq)
        replaying = not self._caught_up.is_set() and seq < self._target
        if replaying and len(self._replayed) < _REPLAY_BATCH:
            return
        self._flush()
        async with self._advanced:
            self._advanced.notify_all()

    def _flush(self) -> None:
        snapshot = self.snapshot
        if self._replayed:
            snapshot = fold(self._replayed, snapshot)
            self._replayed = []
        self.snapshot = snapshot.past(self._received)  # one reference swap

    async def wait_for(self, seq: int, timeout: float = 5.0) -> bool:
        """Wait until the snapshot includes stream sequence ``seq``; ``False`` on timeout."""
        if self.snapshot.last_seq >= seq:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._advanced:
                await self._advanced.wait_for(lambda: self.snapshot.last_seq >= seq)
        return self.snapshot.last_seq >= seq
