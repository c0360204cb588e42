"""Registry commands: validate, decide, append an event with optimistic concurrency.

A command reads the agent's last event (its subject's last message), decides which event
(if any) the change is, and appends it with ``Nats-Expected-Last-Subject-Sequence`` set to
that last sequence, so two writers racing on one agent cannot both win: the loser gets 409.
An identical re-apply appends nothing. A last event this release cannot read at all
(:class:`~broker.registry.events.UnreadableEvent`) counts as a registration of unknown
content at its sequence: a put or a delete replaces it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.envelope import NATS_EXPECTED_LAST_SUBJECT_SEQ, Tenant
from broker.errors import Conflict, NotFound, SequenceConflict
from broker.natsconn import get_stored
from broker.publisher import Publisher
from broker.reader import read_messages
from broker.registry.events import (
    RegistryEvent,
    RegistryEventType,
    UnreadableEvent,
    agent_subject,
    decode_message,
    decode_raw,
    encode,
    tenant_filter,
)
from broker.registry.manifest import AgentManifest, AgentName, canonical_json
from broker.registry.pages import PageFill, manifest_bytes
from broker.registry.snapshot import (
    HistoryMark,
    Rebuilt,
    RebuiltRegistries,
    RegistrySnapshot,
    fold,
    rebuilt_size,
)
from broker.streams import Stream

log = structlog.get_logger(__name__)


class VersionConflict(Conflict):
    """The agent changed since the version the client read (``If-Match``)."""

    error_code = "version_conflict"


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command did: the event appended (or ``None`` for a no-op) and the agent's
    current sequence, which is the version a client sends back in ``If-Match``."""

    event: RegistryEvent | None
    seq: int

    @property
    def changed(self) -> bool:
        return self.event is not None


@dataclass(frozen=True, slots=True)
class _Last:
    """An agent's latest event, its sequence, and the version it was appended over (its
    stored ``Nats-Expected-Last-Subject-Sequence``; ``None`` when it carries none). When it
    cannot be read, ``event`` is ``None`` and ``unreadable`` says why."""

    event: RegistryEvent | None
    seq: int
    replaced: int | None
    unreadable: UnreadableEvent | None = None

    @property
    def registered(self) -> bool:
        """Whether the agent is registered after it; one that cannot be read may be."""
        return self.event is None or self.event.type is not RegistryEventType.DEREGISTERED


async def last_event(js: JetStreamContext, tenant: Tenant, name: str) -> RegistryEvent | None:
    """The agent's latest event, as the stream's leader has it (see :func:`_last`);
    :class:`UnreadableEvent` when this release cannot read it."""
    last = await _last(js, tenant, name)
    if last is not None and last.unreadable is not None:
        raise last.unreadable
    return last.event if last else None


async def _last(js: JetStreamContext, tenant: Tenant, name: str) -> _Last | None:
    """The agent's latest event, as the stream's leader has it.

    Not a direct get: any replica answers those, and one that is catching up answers with an
    older event (a follower resumed after a pause, on a 3-node cluster: 1 stale answer in
    ~11,000). A write checks its expected sequence, so a stale event costs a spurious 409, but
    an old manifest equal to the one being put would make the put a no-op that never lands.
    """
    try:
        raw = await get_stored(js, Stream.REGISTRY, subject=agent_subject(tenant, name))
    except NotFoundError:
        return None
    replaced_header = (raw.headers or {}).get(NATS_EXPECTED_LAST_SUBJECT_SEQ)
    replaced = int(replaced_header) if replaced_header and replaced_header.isdigit() else None
    try:
        return _Last(decode_raw(raw), raw.seq or 0, replaced)
    except UnreadableEvent as e:
        # Still a version: a write over it names its seq, so it replaces what no one can read.
        log.warning("registry_event_unreadable", subject=e.subject, seq=e.seq, error=e.message)
        return _Last(None, e.seq, replaced, e)


@dataclass(frozen=True, slots=True)
class IfMatch:
    """An ``If-Match`` precondition on one agent (RFC 9110, section 13.1.1).

    An agent's entity tag is its seq in quotes (``"12"``), and it is always strong; an agent
    that never existed is at version 0. ``If-Match`` compares with the strong comparison, so
    ``tags`` keeps the opaque tags of the strong entity tags that were sent (``12`` for
    ``"12"``) and drops the weak ones (``W/"12"``), which never match. ``wildcard`` is ``*``:
    it matches whenever the agent is registered, whatever its version. A list matches when
    any of its members does; one of weak tags only matches nothing.
    """

    tags: frozenset[str] = frozenset()
    wildcard: bool = False

    @classmethod
    def seq(cls, seq: int) -> IfMatch:
        """The condition ``If-Match: "<seq>"``."""
        return cls(tags=frozenset({str(seq)}))

    def matches(self, version: int, *, registered: bool) -> bool:
        """Whether an agent at ``version`` (registered or not) meets the condition."""
        if self.wildcard:
            return registered
        return str(version) in self.tags


def _condition(if_match: IfMatch | int | None) -> IfMatch | None:
    return IfMatch.seq(if_match) if isinstance(if_match, int) else if_match


def precondition_holds(if_match: IfMatch | None, current: RegistryEvent | None) -> bool:
    """Whether a write conditioned on ``if_match`` may go ahead over the agent's latest event
    ``current`` (``None``: it never existed, version 0). No condition always holds."""
    if if_match is None:
        return True
    registered = current is not None and current.type is not RegistryEventType.DEREGISTERED
    return if_match.matches(current.seq if current else 0, registered=registered)


def repeats_deregistration(if_match: IfMatch | None, replaced: int | None) -> bool:
    """Whether a delete conditioned on ``if_match``, sent to an agent whose deregistration
    replaced version ``replaced``, is that very delete sent again (a retry whose answer was
    lost). Only a condition naming the version can say so: ``*`` asks for a registered agent,
    and a deregistered one is not."""
    if if_match is None or if_match.wildcard or replaced is None:
        return False
    return if_match.matches(replaced, registered=True)


def _check_if_match(if_match: IfMatch | None, last: _Last | None, name: str) -> None:
    have = last.seq if last else 0
    if if_match is None or if_match.matches(have, registered=last is not None and last.registered):
        return
    if if_match.wildcard:
        raise VersionConflict(f"agent {name} is not registered, and If-Match: * needs it to be")
    if not if_match.tags:
        raise VersionConflict(
            f"agent {name} is at registry seq {have} (its ETag); a weak entity tag never "
            f'matches: send "{have}"'
        )
    named = sorted(if_match.tags)
    sent = ", ".join(f'"{tag[:24]}"' for tag in named[:3]) + (", ..." if len(named) > 3 else "")
    raise VersionConflict(
        f"agent {name} is at registry seq {have} (its ETag), not {sent}: read it again and retry"
    )


async def _append(publisher: Publisher, event: RegistryEvent, expected: int) -> RegistryEvent:
    out = encode(event)
    out.headers[NATS_EXPECTED_LAST_SUBJECT_SEQ] = str(expected)
    try:
        ack = await publisher.publish(out)
    except SequenceConflict:
        raise VersionConflict(
            f"agent {event.name} was changed concurrently: read it again and retry"
        ) from None
    return RegistryEvent(event.type, event.tenant, event.name, event.manifest, ack.seq, None)


async def put_agent(
    publisher: Publisher,
    tenant: Tenant,
    manifest: AgentManifest,
    *,
    if_match: IfMatch | int | None = None,
) -> CommandResult:
    """Register or update an agent; a no-op when the manifest is already the current one,
    whatever ``if_match`` says: the state asked for is the state there (a client retrying a
    conditional put whose answer was lost would otherwise be told it conflicted with
    itself). ``if_match`` as an int is ``If-Match: "<seq>"``."""
    last = await _last(publisher.js, tenant, manifest.name)
    current = last.event if last else None
    live = last is not None and last.registered
    if (
        live
        and current is not None
        and current.manifest is not None
        and canonical_json(current.manifest) == canonical_json(manifest)
    ):
        return CommandResult(None, current.seq)
    _check_if_match(_condition(if_match), last, manifest.name)
    kind = RegistryEventType.UPDATED if live else RegistryEventType.REGISTERED
    event = RegistryEvent(kind, tenant, AgentName(manifest.name), manifest)
    stored = await _append(publisher, event, last.seq if last else 0)
    return CommandResult(stored, stored.seq)


async def delete_agent(
    publisher: Publisher, tenant: Tenant, name: str, *, if_match: IfMatch | int | None = None
) -> CommandResult:
    """Deregister an agent; 404 when it is not registered, whatever ``if_match`` says.

    A conditional delete of an agent that was deregistered from a version it names is a
    no-op, not a 404: a client retrying one whose answer was lost would otherwise be told
    that what it did failed (see :func:`repeats_deregistration`)."""
    condition = _condition(if_match)
    last = await _last(publisher.js, tenant, name)
    if last is None or not last.registered:
        if last is not None and repeats_deregistration(condition, last.replaced):
            return CommandResult(None, last.seq)
        raise NotFound(f"agent {name} is not registered")
    _check_if_match(condition, last, name)
    event = RegistryEvent(RegistryEventType.DEREGISTERED, tenant, AgentName(name), None)
    stored = await _append(publisher, event, last.seq)
    return CommandResult(stored, stored.seq)


async def _readable(
    js: JetStreamContext, subject: str, *, start_seq: int | None = None
) -> AsyncGenerator[RegistryEvent | UnreadableEvent, None]:
    """The events on ``subject`` (from ``start_seq``), oldest first; one that cannot be read
    as its error (logged)."""
    messages = read_messages(js, Stream.REGISTRY, subject=subject, start_seq=start_seq)
    async with contextlib.aclosing(messages) as read:
        async for message in read:
            yield _decoded(message)


def _decoded(message: Msg) -> RegistryEvent | UnreadableEvent:
    """The event in ``message``; one that cannot be read as its error (logged)."""
    try:
        return decode_message(message)
    except UnreadableEvent as e:
        log.warning("registry_event_unreadable", subject=e.subject, seq=e.seq, error=e.message)
        return e


async def agent_history(
    js: JetStreamContext,
    tenant: Tenant,
    name: str,
    *,
    from_seq: int = 1,
    limit: int | None = None,
    max_bytes: int | None = None,
) -> tuple[list[RegistryEvent], int | None]:
    """One agent's events from stream sequence ``from_seq``, oldest first: at most ``limit``
    of them, and no more than ``max_bytes`` of manifests as JSON unless the first alone is
    more (``None``: unbounded); one this release cannot read is left out. With them, the
    ``from_seq`` of the next page (the first event left out) when more follow, else ``None``."""
    events: list[RegistryEvent] = []
    page = PageFill(limit, max_bytes)
    subject = agent_subject(tenant, name)
    async with contextlib.aclosing(_readable(js, subject, start_seq=from_seq)) as read:
        async for event in read:
            if not isinstance(event, RegistryEvent):
                continue
            if not page.take(manifest_bytes(event)):
                return events, event.seq
            events.append(event)
    return events, None


@dataclass(frozen=True, slots=True)
class _History:
    """The ``REGISTRY`` stream's history as it is now, and its last sequence."""

    mark: HistoryMark
    last_seq: int


async def _history(js: JetStreamContext) -> _History:
    info = await js.stream_info(Stream.REGISTRY)
    state = info.state
    mark = HistoryMark(info.created, state.first_seq, state.num_deleted or 0)
    return _History(mark, state.last_seq)


async def registry_as_of(
    js: JetStreamContext,
    tenant: Tenant,
    *,
    seq: int | None = None,
    time: datetime | None = None,
    rebuilt: RebuiltRegistries | None = None,
) -> RegistrySnapshot:
    """The tenant's registry exactly as it was after stream sequence ``seq`` or at ``time``,
    rebuilt from the stream (skipping what cannot be read, as the live view does).

    With ``rebuilt``, what is rebuilt is kept there for the next pages, under the sequence
    it runs through (the last of the tenant's events up to the point asked for, the ``seq``
    the next pages ask for, whether a sequence or a time was asked for) and under ``seq``
    when the stream has reached it; and it is taken from there when the stream still holds
    the history it was rebuilt from (a purge, or the stream made again, drops it). Requests
    for a ``seq`` the stream has reached wait for one rebuild of it in progress rather than
    each reading the history. A point still to come (a later time, a ``seq`` the stream has
    not reached) is rebuilt for each request: what is appended meanwhile counts."""
    if rebuilt is None:
        return (await _rebuilt(js, tenant, seq=seq, time=time)).snapshot
    before = await _history(js)
    rebuilt.follow(before.mark)
    if seq is not None:
        kept = rebuilt.get(tenant, seq, before.mark)
        if kept is not None:  # an empty registry is falsy: a mapping
            return kept
    past = seq is not None and seq <= before.last_seq
    rebuild = partial(
        _rebuild_and_keep,
        js,
        tenant,
        seq=seq,
        time=time,
        history=before.mark,
        rebuilt=rebuilt,
        asked=seq if past else None,
    )
    if seq is not None and past:
        return await rebuilt.once(tenant, seq, before.mark, rebuild)
    return await rebuild()


async def _rebuild_and_keep(
    js: JetStreamContext,
    tenant: Tenant,
    *,
    seq: int | None,
    time: datetime | None,
    history: HistoryMark,
    rebuilt: RebuiltRegistries,
    asked: int | None,
) -> RegistrySnapshot:
    made = await _rebuilt(js, tenant, seq=seq, time=time)
    # Kept only when the stream held the same history all along: a purge during the read
    # may have taken events out of it.
    if (await _history(js)).mark == history:
        rebuilt.put(tenant, made, history, asked=asked)
    return made.snapshot


async def _rebuilt(
    js: JetStreamContext, tenant: Tenant, *, seq: int | None, time: datetime | None
) -> Rebuilt:
    events: list[RegistryEvent] = []
    stored: dict[str, int] = {}  # each agent's last readable event: its bytes
    through = 0  # past the events that could not be read
    messages = read_messages(js, Stream.REGISTRY, subject=tenant_filter(tenant))
    async with contextlib.aclosing(messages) as read:
        async for message in read:
            event = _decoded(message)
            if seq is not None and event.seq > seq:
                break
            if time is not None and event.at is not None and event.at > time:
                break
            if isinstance(event, UnreadableEvent):
                through = event.seq
            else:
                events.append(event)
                stored[event.name] = len(message.data)
    snapshot = fold(events).past(through)
    return Rebuilt(snapshot, rebuilt_size(stored[record.name] for record in snapshot.values()))
