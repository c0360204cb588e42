"""Registry events and their one mapping to and from NATS messages.

Events are past tense and immutable. Each lives on the agent's own subject,
``reg.<tenant>.agent.<name>``, so the subject's last sequence is the agent's version for
optimistic concurrency, and the subject's messages are its history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import orjson
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg

from broker.envelope import Outbound, Tenant
from broker.errors import BrokerError, InvalidSubject
from broker.registry.manifest import (
    AGENT_NAME_PATTERN,
    SERIALIZE_ERRORS,
    AgentManifest,
    AgentName,
    ManifestInvalid,
)

EVENT_TYPE_HEADER = "Broker-Event-Type"
_NAME = re.compile(AGENT_NAME_PATTERN)
EVENT_SCHEMA_VERSION = "1"


class RegistryEventType(StrEnum):
    REGISTERED = "AgentRegistered"
    UPDATED = "AgentUpdated"
    DEREGISTERED = "AgentDeregistered"


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    """A change to one agent. ``seq`` and ``at`` are the stream's, once stored."""

    type: RegistryEventType
    tenant: Tenant
    name: AgentName
    manifest: AgentManifest | None
    seq: int = 0
    at: datetime | None = None


def agent_subject(tenant: Tenant, name: str) -> str:
    """``reg.<tenant>.agent.<name>``; :class:`InvalidSubject` for a name that is not a token."""
    if not _NAME.fullmatch(name):
        raise InvalidSubject(f"agent name {name[:64]!r} is not 1-64 characters of A-Z a-z 0-9 _ -")
    return f"reg.{tenant}.agent.{name}"


def tenant_filter(tenant: Tenant) -> str:
    return f"reg.{tenant}.agent.*"


def encode(event: RegistryEvent) -> Outbound:
    """The message that stores ``event`` (the expected-sequence header is added by the caller);
    :class:`ManifestInvalid` for a manifest that cannot be serialized."""
    try:
        body = orjson.dumps(
            {
                "type": str(event.type),
                "tenant": event.tenant,
                "name": event.name,
                "manifest": event.manifest.model_dump(mode="json") if event.manifest else None,
            }
        )
    except SERIALIZE_ERRORS as e:
        raise ManifestInvalid(f"manifest cannot be serialized: {e}") from None
    headers = {
        EVENT_TYPE_HEADER: str(event.type),
        "Broker-Event-Schema": EVENT_SCHEMA_VERSION,
        "Content-Type": "application/json",
    }
    return Outbound(agent_subject(event.tenant, event.name), body, headers)


def decode(data: bytes, *, subject: str, seq: int, at: datetime | None) -> RegistryEvent:
    """The event stored in a message's body, with its stream sequence and time."""
    try:
        body = orjson.loads(data)
        kind = RegistryEventType(body["type"])
        manifest = AgentManifest.model_validate(body["manifest"]) if body.get("manifest") else None
        return RegistryEvent(
            type=kind,
            tenant=Tenant(body["tenant"]),
            name=AgentName(body["name"]),
            manifest=manifest,
            seq=seq,
            at=at,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BrokerError(f"unreadable registry event on {subject}: {e}") from e


def decode_message(message: Msg) -> RegistryEvent:
    """The event in a consumer's message (sequence and time from its metadata)."""
    meta = message.metadata
    return decode(
        message.data, subject=message.subject, seq=meta.sequence.stream, at=meta.timestamp
    )


def decode_raw(message: RawStreamMsg) -> RegistryEvent:
    """The event in a direct-get answer."""
    return decode(
        message.data or b"", subject=message.subject or "", seq=message.seq or 0, at=message.time
    )
