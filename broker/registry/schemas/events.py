"""Schema registry events and their one mapping to and from NATS messages.

Every change to the schema registry is one past-tense event in the ``SCHEMAS`` stream:

=============================  ==========================================================
``SchemaVersionRegistered``    a subject got a new version (and maybe a new global id)
``SchemaVersionDeleted``       one version, or every version, of a subject was deleted,
                               softly or permanently
``CompatibilityChanged``       the compatibility level of a subject, or the global one,
                               was set or cleared
=============================  ==========================================================

A subject's events live on ``schema.<tenant>.subject.<token>``, where the token is the
subject name in unpadded base64url (registry subjects may hold dots, spaces and anything
else a NATS token may not); global settings live on ``schema.<tenant>.config``. The
registry state is the fold of all of them, in stream order.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NewType

import orjson
from nats.aio.msg import Msg

from broker.envelope import Outbound, Tenant
from broker.errors import BrokerError
from broker.registry.events import EVENT_TYPE_HEADER
from broker.registry.schemas.types import CompatibilityLevel, SchemaType
from broker.streams import SUBJECT_PREFIX, Stream

SchemaId = NewType("SchemaId", int)
EVENT_SCHEMA_VERSION = "1"
_PREFIX = SUBJECT_PREFIX[Stream.SCHEMAS]


@dataclass(frozen=True, slots=True)
class SchemaReference:
    """A schema's dependency: ``name`` as the schema text uses it (an Avro full name, a
    ``.proto`` import path, a JSON Schema ``$ref``) and the subject version it resolves to."""

    name: str
    subject: str
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "subject": self.subject, "version": self.version}


@dataclass(frozen=True, slots=True)
class SchemaVersionRegistered:
    tenant: Tenant
    subject: str
    version: int
    schema_id: SchemaId
    schema_type: SchemaType
    schema: str
    references: tuple[SchemaReference, ...] = ()
    seq: int = 0
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SchemaVersionDeleted:
    """``version`` ``None`` deletes every version of the subject that the delete applies to
    (live ones softly; soft-deleted ones permanently)."""

    tenant: Tenant
    subject: str
    version: int | None
    permanent: bool
    seq: int = 0
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CompatibilityChanged:
    """``subject`` ``None`` is the global level; ``level`` ``None`` clears the setting."""

    tenant: Tenant
    subject: str | None
    level: CompatibilityLevel | None
    seq: int = 0
    at: datetime | None = None


SchemaEvent = SchemaVersionRegistered | SchemaVersionDeleted | CompatibilityChanged
_TYPES: dict[str, type[SchemaEvent]] = {
    cls.__name__: cls
    for cls in (SchemaVersionRegistered, SchemaVersionDeleted, CompatibilityChanged)
}


def subject_token(subject: str) -> str:
    """A registry subject as one NATS subject token."""
    return base64.urlsafe_b64encode(subject.encode()).decode().rstrip("=") or "_"


def event_subject(event: SchemaEvent) -> str:
    subject = getattr(event, "subject", None)
    if subject is None:
        return f"{_PREFIX}.{event.tenant}.config"
    return f"{_PREFIX}.{event.tenant}.subject.{subject_token(subject)}"


def _body(event: SchemaEvent) -> dict[str, Any]:
    if isinstance(event, SchemaVersionRegistered):
        return {
            "tenant": event.tenant,
            "subject": event.subject,
            "version": event.version,
            "id": event.schema_id,
            "schemaType": str(event.schema_type),
            "schema": event.schema,
            "references": [r.to_dict() for r in event.references],
        }
    if isinstance(event, SchemaVersionDeleted):
        return {
            "tenant": event.tenant,
            "subject": event.subject,
            "version": event.version,
            "permanent": event.permanent,
        }
    return {
        "tenant": event.tenant,
        "subject": event.subject,
        "level": str(event.level) if event.level else None,
    }


def encode(event: SchemaEvent) -> Outbound:
    """The message that stores ``event`` (the expected-sequence header is the caller's)."""
    kind = type(event).__name__
    headers = {
        EVENT_TYPE_HEADER: kind,
        "Broker-Event-Schema": EVENT_SCHEMA_VERSION,
        "Content-Type": "application/json",
    }
    body = {"type": kind, **_body(event)}
    return Outbound(event_subject(event), orjson.dumps(body), headers)


def decode(data: bytes, *, subject: str, seq: int, at: datetime | None) -> SchemaEvent:
    """The event stored in a message's body, with its stream sequence and time."""
    try:
        body = orjson.loads(data)
        kind = _TYPES[body["type"]]
        tenant = Tenant(body["tenant"])
        if kind is SchemaVersionRegistered:
            return SchemaVersionRegistered(
                tenant=tenant,
                subject=str(body["subject"]),
                version=int(body["version"]),
                schema_id=SchemaId(int(body["id"])),
                schema_type=SchemaType(body["schemaType"]),
                schema=str(body["schema"]),
                references=tuple(
                    SchemaReference(str(r["name"]), str(r["subject"]), int(r["version"]))
                    for r in body["references"]
                ),
                seq=seq,
                at=at,
            )
        if kind is SchemaVersionDeleted:
            version = body["version"]
            return SchemaVersionDeleted(
                tenant=tenant,
                subject=str(body["subject"]),
                version=None if version is None else int(version),
                permanent=bool(body["permanent"]),
                seq=seq,
                at=at,
            )
        level = body["level"]
        return CompatibilityChanged(
            tenant=tenant,
            subject=body["subject"],
            level=CompatibilityLevel(level) if level else None,
            seq=seq,
            at=at,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BrokerError(f"unreadable schema registry event on {subject}: {e}") from e


def decode_message(message: Msg) -> SchemaEvent:
    """The event in a consumer's message (sequence and time from its metadata)."""
    meta = message.metadata
    return decode(
        message.data, subject=message.subject, seq=meta.sequence.stream, at=meta.timestamp
    )
