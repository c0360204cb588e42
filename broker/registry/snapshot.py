"""The registry as readers see it: immutable snapshots, swapped whole (copy-on-write).

:class:`RegistrySnapshot` is a value: applying an event returns a new snapshot that shares
every untouched tenant with the old one. :class:`RegistryView` holds the current snapshot
of one process and keeps it up to date from the ``REGISTRY`` stream through an ordered
push consumer; readers take ``view.snapshot`` (one attribute read, no lock) and can never
see a half-applied change. An event this release cannot read is skipped (logged once, counted
in ``view.skipped``): the view still moves past it.

:class:`RebuiltRegistries` keeps the past registries ``GET /v1/agents?as_of=`` rebuilt, a
while, for the pages after the first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from time import monotonic
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

    __slots__ = ("_listed", "last_seq")

    def __init__(
        self, agents: Mapping[AgentKey, AgentRecord] | None = None, last_seq: int = 0
    ) -> None:
        super().__init__(agents or {})
        self.last_seq = last_seq
        self._listed: dict[Tenant, tuple[AgentRecord, ...]] = {}

    def _immutable(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a RegistrySnapshot is immutable; apply events to get a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _immutable
    __ior__ = _immutable

    def agent(self, tenant: Tenant, name: str) -> AgentRecord | None:
        return self.get((tenant, name))

    def agents(self, tenant: Tenant) -> tuple[AgentRecord, ...]:
        """The tenant's agents, by name: sorted once per snapshot and tenant, since a list's
        every page reads them (a snapshot never changes)."""
        listed = self._listed.get(tenant)
        if listed is None:
            mine = (r for (t, _), r in self.items() if t == tenant)
            listed = self._listed[tenant] = tuple(sorted(mine, key=lambda r: r.name))
        return listed

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


@dataclass(frozen=True, slots=True)
class HistoryMark:
    """Which history of the ``REGISTRY`` stream a registry was rebuilt from: the stream by its
    creation time (one deleted and made again numbers its messages from 1 again), and where
    its messages start and how many are missing in between. Appends change none of these; a
    purge, a deletion or an age limit changes ``first_seq`` or ``deleted``, and so what a
    rebuild at an earlier sequence finds."""

    created: datetime | None
    first_seq: int
    deleted: int


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """A registry rebuilt from the stream, and about how many bytes it takes in memory."""

    snapshot: RegistrySnapshot
    size: int


#: What :func:`rebuilt_size` counts for each agent: the Python objects of a small manifest
#: and its record (about 4 KB measured), and four times the bytes of the stored event (a
#: manifest's strings, lists and floats take 2 to 4 times their JSON).
AGENT_OVERHEAD = 4096
PAYLOAD_FACTOR = 4


def rebuilt_size(payload_bytes: Iterable[int]) -> int:
    """The estimated memory of a registry whose agents' last events took ``payload_bytes``."""
    return sum(AGENT_OVERHEAD + PAYLOAD_FACTOR * size for size in payload_bytes)


@dataclass(slots=True)
class _Kept:
    at: float
    rebuilt: Rebuilt


@dataclass(slots=True)
class _Building:
    task: asyncio.Future[RegistrySnapshot]
    waiting: int = 0


_RegistryKey = tuple[str, int]  # (tenant, seq)
_BuildKey = tuple[HistoryMark, str, int]  # (history, tenant, seq)


class RebuiltRegistries:
    """Registries rebuilt as of a past sequence, kept a while for the next pages of a list.

    A registry rebuilt through sequence S of a stream's history is what a rebuild as of S
    finds for as long as that history holds (:class:`HistoryMark`), whatever is appended
    later. It is kept under ``(tenant, S)``: a tenant never finds another's, since the key
    holds the tenant and a registry holds only its tenant's agents. Every look-up names the
    history the stream holds now, and one that differs from the history the registries kept
    were rebuilt from drops them all: what is kept is what a rebuild would find now.

    Bounds: ``entries`` registries and ``max_bytes`` of them (by :func:`rebuilt_size`) at
    most, the least recently used leaving first (one larger than ``max_bytes`` alone is not
    kept), each for ``seconds`` from its rebuild, after which it is released even when no
    request comes. Requests for one registry that is being rebuilt wait for that rebuild
    (:meth:`once`) rather than each reading the history.
    """

    def __init__(
        self, *, entries: int = 8, max_bytes: int = 256 * 1024 * 1024, seconds: float = 60.0
    ) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self.seconds = seconds
        self._kept: OrderedDict[_RegistryKey, _Kept] = OrderedDict()
        self._bytes = 0
        self._history: HistoryMark | None = None
        self._building: dict[_BuildKey, _Building] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def bytes(self) -> int:
        """The estimated bytes of the registries kept."""
        return self._bytes

    @property
    def waiting(self) -> int:
        """Requests waiting for a rebuild another request started, or for their own."""
        return sum(building.waiting for building in self._building.values())

    def follow(self, history: HistoryMark) -> None:
        """The stream holds ``history`` now: drop what was rebuilt from another."""
        if history != self._history:
            self._kept.clear()
            self._bytes = 0
            self._history = history

    def get(self, tenant: str, seq: int, history: HistoryMark) -> RegistrySnapshot | None:
        """The registry of ``tenant`` as of ``seq`` rebuilt from ``history`` (the stream's
        now), if kept."""
        self.follow(history)
        kept = self._kept.get((tenant, seq))
        if kept is None:
            return None
        if monotonic() - kept.at >= self.seconds:
            self._drop((tenant, seq))
            return None
        self._kept.move_to_end((tenant, seq))
        return kept.rebuilt.snapshot

    def put(
        self, tenant: str, rebuilt: Rebuilt, history: HistoryMark, *, asked: int | None = None
    ) -> None:
        """Keep ``rebuilt``, rebuilt from ``history``, under the sequence it runs through,
        and under ``asked`` too: a past sequence it was rebuilt as of (the same registry when
        no event of the tenant's came between). Nothing is kept when ``history`` is no
        longer the stream's, or when the registry alone is over ``max_bytes``."""
        if history != self._history:
            return
        if rebuilt.size > self.max_bytes:  # its next pages each read the history again
            log.info(
                "registry_rebuilt_not_kept", tenant=tenant, bytes=rebuilt.size, max=self.max_bytes
            )
            return
        seqs = [rebuilt.snapshot.last_seq]  # the one the next pages ask for: used last
        if asked is not None and asked != rebuilt.snapshot.last_seq:
            seqs.insert(0, asked)
        for seq in seqs:
            self._drop((tenant, seq))
            self._kept[(tenant, seq)] = _Kept(monotonic(), rebuilt)
            self._bytes += rebuilt.size  # counted for each key: an overestimate, never under
        while len(self._kept) > self.entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._kept)))
        self._release_later()

    async def once(
        self,
        tenant: str,
        seq: int,
        history: HistoryMark,
        rebuild: Callable[[], Awaitable[RegistrySnapshot]],
    ) -> RegistrySnapshot:
        """``rebuild()``, unless the same registry is being rebuilt already: then what that
        rebuild makes. A waiter cancelled leaves the rebuild to the others; the last one
        cancelled cancels it, and the next request starts another. A rebuild that fails
        fails each of its waiters and is not kept: the next request starts another."""
        key = (history, tenant, seq)
        building = self._building.get(key)
        if building is None:
            building = _Building(asyncio.ensure_future(rebuild()))
            self._building[key] = building
            building.task.add_done_callback(partial(self._built, key, building))
        building.waiting += 1
        try:
            return await asyncio.shield(building.task)
        finally:
            building.waiting -= 1
            if not building.waiting and not building.task.done():
                # No one is left to use it: a request to come starts a rebuild of its own
                # rather than joining one that is being cancelled.
                self._forget(key, building)
                building.task.cancel()

    def _built(
        self, key: _BuildKey, building: _Building, task: asyncio.Future[RegistrySnapshot]
    ) -> None:
        self._forget(key, building)
        if not task.cancelled():
            task.exception()  # each waiter got it; no "exception was never retrieved"

    def _forget(self, key: _BuildKey, building: _Building) -> None:
        if self._building.get(key) is building:
            del self._building[key]

    def _drop(self, key: _RegistryKey) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self._bytes -= kept.rebuilt.size

    def _release_later(self) -> None:
        """Drop the registries kept too long once they are, whether or not a request
        comes: a listing must not hold hundreds of MB in an idle process."""
        if self._timer is not None or not self._kept:
            return
        oldest = min(kept.at for kept in self._kept.values())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a caller outside asyncio): look-ups expire them
            return
        self._timer = loop.call_later(max(0.0, oldest + self.seconds - monotonic()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = monotonic()
        for key in [k for k, kept in self._kept.items() if now - kept.at >= self.seconds]:
            self._drop(key)
        self._release_later()
