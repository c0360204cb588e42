"""Registry commands: validate, decide, append an event with optimistic concurrency.

A command reads the agent's last event (its subject's last message), decides which event
(if any) the change is, and appends it with ``Nats-Expected-Last-Subject-Sequence`` set to
that last sequence, so two writers racing on one agent cannot both win: the loser gets 409.
An identical re-apply appends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.envelope import NATS_EXPECTED_LAST_SUBJECT_SEQ, Tenant
from broker.errors import Conflict, NotFound, SequenceConflict
from broker.publisher import Publisher
from broker.reader import read_messages
from broker.registry.events import (
    RegistryEvent,
    RegistryEventType,
    agent_subject,
    decode_message,
    decode_raw,
    encode,
    tenant_filter,
)
from broker.registry.manifest import AgentManifest, AgentName, canonical_json
from broker.registry.snapshot import RegistrySnapshot, fold
from broker.streams import Stream


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
    """An agent's latest event and the version it was appended over (its stored
    ``Nats-Expected-Last-Subject-Sequence``; ``None`` when it carries none)."""

    event: RegistryEvent
    replaced: int | None


async def last_event(js: JetStreamContext, tenant: Tenant, name: str) -> RegistryEvent | None:
    """The agent's latest event, as the stream's leader has it (see :func:`_last`)."""
    last = await _last(js, tenant, name)
    return last.event if last else None


async def _last(js: JetStreamContext, tenant: Tenant, name: str) -> _Last | None:
    """The agent's latest event, as the stream's leader has it.

    Not a direct get: any replica answers those, and one that is catching up answers with an
    older event (a follower resumed after a pause, on a 3-node cluster: 1 stale answer in
    ~11,000). A write checks its expected sequence, so a stale event costs a spurious 409, but
    an old manifest equal to the one being put would make the put a no-op that never lands.
    """
    try:
        raw = await js.get_last_msg(Stream.REGISTRY, agent_subject(tenant, name))
    except NotFoundError:
        return None
    replaced = (raw.headers or {}).get(NATS_EXPECTED_LAST_SUBJECT_SEQ)
    return _Last(decode_raw(raw), int(replaced) if replaced and replaced.isdigit() else None)


def _check_if_match(if_match: int | None, current: RegistryEvent | None, name: str) -> None:
    have = current.seq if current else 0
    if if_match is not None and if_match != have:
        raise VersionConflict(
            f"agent {name} is at version {have}, not {if_match}: read it again and retry"
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
    publisher: Publisher, tenant: Tenant, manifest: AgentManifest, *, if_match: int | None = None
) -> CommandResult:
    """Register or update an agent; a no-op when the manifest is already the current one,
    whatever ``if_match`` says: the state asked for is the state there (a client retrying a
    conditional put whose answer was lost would otherwise be told it conflicted with
    itself)."""
    current = await last_event(publisher.js, tenant, manifest.name)
    live = current is not None and current.type is not RegistryEventType.DEREGISTERED
    if (
        live
        and current is not None
        and current.manifest is not None
        and canonical_json(current.manifest) == canonical_json(manifest)
    ):
        return CommandResult(None, current.seq)
    _check_if_match(if_match, current, manifest.name)
    kind = RegistryEventType.UPDATED if live else RegistryEventType.REGISTERED
    event = RegistryEvent(kind, tenant, AgentName(manifest.name), manifest)
    stored = await _append(publisher, event, current.seq if current else 0)
    return CommandResult(stored, stored.seq)


async def delete_agent(
    publisher: Publisher, tenant: Tenant, name: str, *, if_match: int | None = None
) -> CommandResult:
    """Deregister an agent; 404 when it is not registered.

    A conditional delete of an agent that was deregistered from the very version it names is
    a no-op, not a 404: a client retrying one whose answer was lost would otherwise be told
    that what it did failed."""
    last = await _last(publisher.js, tenant, name)
    if last is None or last.event.type is RegistryEventType.DEREGISTERED:
        if last is not None and if_match is not None and last.replaced == if_match:
            return CommandResult(None, last.event.seq)
        raise NotFound(f"agent {name} is not registered")
    current = last.event
    _check_if_match(if_match, current, name)
    event = RegistryEvent(RegistryEventType.DEREGISTERED, tenant, AgentName(name), None)
    stored = await _append(publisher, event, current.seq)
    return CommandResult(stored, stored.seq)


async def agent_history(js: JetStreamContext, tenant: Tenant, name: str) -> list[RegistryEvent]:
    """Every event of one agent, oldest first."""
    return [
        decode_message(m)
        async for m in read_messages(js, Stream.REGISTRY, subject=agent_subject(tenant, name))
    ]


async def registry_as_of(
    js: JetStreamContext, tenant: Tenant, *, seq: int | None = None, time: datetime | None = None
) -> RegistrySnapshot:
    """The tenant's registry exactly as it was after stream sequence ``seq`` or at ``time``,
    rebuilt from the stream."""
    events: list[RegistryEvent] = []
    async for message in read_messages(js, Stream.REGISTRY, subject=tenant_filter(tenant)):
        event = decode_message(message)
        if seq is not None and event.seq > seq:
            break
        if time is not None and event.at is not None and event.at > time:
            break
        events.append(event)
    return fold(events)
