"""Registry events and their one mapping to and from NATS messages.

Events are past tense and immutable. Each lives on the agent's own subject,
``reg.<tenant>.agent.<name>``, so the subject's last sequence is the agent's version for
optimistic concurrency, and the subject's messages are its history.

A stored event is a fact, whatever the rules are today. The API checks a new manifest with
today's rules (:func:`~broker.registry.manifest.validate_manifest`); reading one back does
not: a manifest an earlier release accepted (``content_types: ["text/plain\\n"]`` before the
media type check used ``fullmatch``) is read as it was stored (:func:`stored_manifest`). Only
an event that cannot be read at all (not JSON, an unknown type, a manifest of the wrong
shape, or one nested too deep to serialize again) is :class:`UnreadableEvent`, and readers
skip it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import NoneType, UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import orjson
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg
from pydantic import BaseModel, TypeAdapter, ValidationError

from broker.envelope import Outbound, Tenant
from broker.errors import BrokerError, InvalidSubject
from broker.registry.manifest import (
    AGENT_NAME_PATTERN,
    SERIALIZE_ERRORS,
    AgentManifest,
    AgentName,
    ManifestInvalid,
    canonical_json,
)

EVENT_TYPE_HEADER = "Broker-Event-Type"
_NAME = re.compile(AGENT_NAME_PATTERN)
EVENT_SCHEMA_VERSION = "1"


class UnreadableEvent(BrokerError):
    """A stored registry event this release cannot read at all; ``seq`` and ``at`` are the
    stream's, so a reader can skip it and a write can replace it."""

    def __init__(self, message: str, *, subject: str, seq: int, at: datetime | None = None) -> None:
        super().__init__(message)
        self.subject = subject
        self.seq = seq
        self.at = at


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
    """The event stored in a message's body, with its stream sequence and time; its manifest
    as stored (:func:`stored_manifest`). :class:`UnreadableEvent` when it cannot be read, or
    when its body names another agent than its subject (``reg.<tenant>.agent.<name>``):
    a self-registering agent may publish on its own subject only (docs/tenants.md), and
    what it writes there must not register, change or remove any other agent."""
    try:
        body = orjson.loads(data)
        kind = RegistryEventType(body["type"])
        tenant, name = _subject_agent(subject)
        if body["tenant"] != tenant or body["name"] != name:
            raise ValueError(f"its body names {body['tenant']!r}/{body['name']!r}"[:200])
        manifest = stored_manifest(body["manifest"]) if body.get("manifest") else None
        if manifest is not None and manifest.name != name:
            raise ValueError(f"its manifest names {manifest.name!r}"[:200])
        if manifest is not None:
            _servable(manifest)
        return RegistryEvent(type=kind, tenant=tenant, name=name, manifest=manifest, seq=seq, at=at)
    except (ValueError, KeyError, TypeError) as e:
        message = f"unreadable registry event on {subject} (seq {seq}): {e}"
        raise UnreadableEvent(message, subject=subject, seq=seq, at=at) from e


def _servable(manifest: AgentManifest) -> None:
    """``ValueError`` when ``manifest`` cannot be serialized, as every reader that answers it
    does (nested deeper than pydantic and orjson write: an agent publishing on its own
    subject is not held to the API's depth bound). Taken as a registration, it would fail
    its whole tenant's agent list, and a put over it, for good."""
    try:
        canonical_json(manifest)
    except ManifestInvalid as e:
        raise ValueError(f"its manifest {e.message.removeprefix('manifest ')}"[:200]) from None


def _subject_agent(subject: str) -> tuple[Tenant, AgentName]:
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "reg" or parts[2] != "agent":
        raise ValueError("not an agent's registry subject")
    return Tenant(parts[1]), AgentName(parts[3])


def stored_manifest(data: Any) -> AgentManifest:
    """A manifest as an event stored it: checked by today's rules where it meets them, and
    otherwise read as stored, value by value (``ValueError`` only when its shape is wrong).

    Every event this release writes meets the rules, so that is the first and usual path.
    One an earlier release wrote may not (the rules only ever got stricter), and refusing it
    would hide the agent and fail every write to it, for good. A value read as stored has the
    type its field declares but may break a rule (a media type with a final newline): a
    reader compares such values, it never relies on their syntax.
    """
    try:
        return AgentManifest.model_validate(data)
    except ValidationError:
        manifest: AgentManifest = _model_as_stored(AgentManifest, data, "manifest")
        return manifest


_M = TypeVar("_M", bound=BaseModel)
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}
#: The JSON types a leaf field of each Python type may hold when read as stored.
_LEAF_TYPES: dict[type, tuple[type, ...]] = {
    bool: (bool,),  # before int: a bool is an int to issubclass
    str: (str,),
    int: (int,),
    float: (int, float),
    NoneType: (NoneType,),
}


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(annotation)
    if adapter is None:
        adapter = _ADAPTERS[annotation] = TypeAdapter(annotation)
    return adapter


def _model_as_stored(model: type[_M], raw: Any, where: str) -> _M:
    """``raw`` as ``model``, each field :func:`_as_stored`, without the model's own rules
    (field constraints, validators): its fields' values, as stored."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name in raw:
            values[name] = _as_stored(field.annotation, raw[name], f"{where}.{name}")
        elif field.is_required():
            raise ValueError(f"{where}.{name} is missing")
    return model.model_construct(**values)


def _as_stored(annotation: Any, raw: Any, where: str) -> Any:
    """``raw`` as ``annotation`` says, by today's rules if it meets them, else as stored if
    its shape fits: an object for a model, a list for a list, a string for a string."""
    try:
        return _adapter(annotation).validate_python(raw)
    except ValidationError:
        pass
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _as_stored(args[0], raw, where)
    if origin is Union or origin is UnionType:
        for member in args:
            try:
                return _as_stored(member, raw, where)
            except ValueError:
                continue
        raise ValueError(f"{where} is none of {annotation}")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model_as_stored(annotation, raw, where)
    if origin is list and isinstance(raw, list):
        return [_as_stored(args[0], item, f"{where}.{i}") for i, item in enumerate(raw)]
    if origin is dict and isinstance(raw, dict):
        return {key: _as_stored(args[1], value, f"{where}.{key}") for key, value in raw.items()}
    if origin is None and isinstance(annotation, type):
        base = next((t for t in _LEAF_TYPES if issubclass(annotation, t)), None)
        fits = base is not None and isinstance(raw, _LEAF_TYPES[base])
        if fits and (base is bool or not isinstance(raw, bool)):
            return raw  # a StrEnum field keeps a member it no longer has as its string
    raise ValueError(f"{where} is not {annotation}")


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
