"""The streams and buckets the broker owns, and their idempotent provisioning.

Each stream is declared once here (:func:`stream_specs`); :func:`provision` creates what is
missing, leaves what matches alone, and reports a conflicting existing configuration as a
:class:`~broker.errors.StreamConfigConflict` naming every differing field, unless asked to
``update`` the fields JetStream can change in place.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from broker.errors import StreamConfigConflict
from broker.settings import Settings

log = structlog.get_logger(__name__)


class Stream(StrEnum):
    """Stream names; each owns one top-level subject prefix."""

    MESSAGES = "MESSAGES"
    REGISTRY = "REGISTRY"
    SCHEMAS = "SCHEMAS"
    ROUTES = "ROUTES"
    DLQ = "DLQ"
    AUDIT = "AUDIT"


#: Subject prefix of each stream: ``msg.<tenant>.<topic…>``, ``reg.<tenant>.agent.<name>`` …
SUBJECT_PREFIX: dict[Stream, str] = {
    Stream.MESSAGES: "msg",
    Stream.REGISTRY: "reg",
    Stream.SCHEMAS: "schema",
    Stream.ROUTES: "route",
    Stream.DLQ: "dlq",
    Stream.AUDIT: "audit",
}

#: The tenant token of events that belong to no tenant (``audit._.…``); no tenant may be
#: named so (``broker.auth.valid_tenant``).
NO_TENANT = "_"

AGENT_LOAD_BUCKET = "agent_load"

#: Fields compared between an existing stream and the wanted one. JetStream refuses to change
#: the ones in ``_IMMUTABLE`` on an existing stream.
_COMPARED = (
    "subjects",
    "retention",
    "storage",
    "num_replicas",
    "max_age",
    "max_bytes",
    "max_msgs",
    "max_msg_size",
    "discard",
    "duplicate_window",
    "deny_delete",
    "deny_purge",
    "allow_direct",
)
_IMMUTABLE = frozenset({"retention", "storage"})


def stream_specs(settings: Settings) -> list[StreamConfig]:
    """The configuration the broker wants for each of its streams."""
    common: dict[str, Any] = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "num_replicas": settings.stream_replicas,
        "duplicate_window": settings.duplicate_window_seconds,
        "discard": DiscardPolicy.OLD,
        "max_msgs": -1,
        "max_msg_size": -1,
        "allow_direct": True,
    }
    # The registry and schema streams are the source of truth: kept forever, never edited.
    audit: dict[str, Any] = {**common, "max_age": 0.0, "max_bytes": -1, "deny_delete": True}
    return [
        StreamConfig(
            name=Stream.MESSAGES,
            description="Every published message, payload as sent (schema-on-read).",
            subjects=[f"{SUBJECT_PREFIX[Stream.MESSAGES]}.>"],
            max_age=settings.messages_max_age_seconds,
            max_bytes=settings.messages_max_bytes,
            deny_delete=False,
            **common,
        ),
        StreamConfig(
            name=Stream.REGISTRY,
            description="Agent registry events: AgentRegistered/Updated/Deregistered.",
            subjects=[f"{SUBJECT_PREFIX[Stream.REGISTRY]}.>"],
            **audit,
        ),
        StreamConfig(
            name=Stream.SCHEMAS,
            description="Schema registry events: versions, deletions, compatibility.",
            subjects=[f"{SUBJECT_PREFIX[Stream.SCHEMAS]}.>"],
            **audit,
        ),
        StreamConfig(
            name=Stream.ROUTES,
            description="RouteDecided events; route.<tenant>.<agent> is an agent's inbox.",
            subjects=[f"{SUBJECT_PREFIX[Stream.ROUTES]}.>"],
            max_age=settings.messages_max_age_seconds,
            max_bytes=-1,
            deny_delete=False,
            **common,
        ),
        StreamConfig(
            name=Stream.DLQ,
            description="What could not be processed, with the reason.",
            subjects=[f"{SUBJECT_PREFIX[Stream.DLQ]}.>"],
            max_age=0.0,
            max_bytes=-1,
            deny_delete=False,
            **common,
        ),
        StreamConfig(
            name=Stream.AUDIT,
            description="Audit events, audit.<tenant>.<kind>: e.g. card numbers a replica "
            "masked (where, brand, last four digits; never the number).",
            subjects=[f"{SUBJECT_PREFIX[Stream.AUDIT]}.>"],
            **audit,
        ),
    ]


def agent_load_spec(settings: Settings) -> KeyValueConfig:
    """Live load per agent instance; entries expire when heartbeats stop."""
    return KeyValueConfig(
        bucket=AGENT_LOAD_BUCKET,
        description="Live load per agent instance (heartbeats, TTL).",
        history=1,
        ttl=settings.agent_load_ttl_seconds,
        storage=StorageType.FILE,
        replicas=settings.stream_replicas,
    )


@dataclass
class ProvisionReport:
    """What :func:`provision` did, by stream or bucket name."""

    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def _normalise(name: str, value: Any) -> Any:
    if name == "subjects":
        return sorted(value or [])
    if name in {"max_age", "duplicate_window"}:
        return round(float(value or 0.0), 3)
    if name in {"max_bytes", "max_msgs", "max_msg_size"}:
        return -1 if value in (None, 0, -1) and name != "max_msg_size" else value
    if name in {"deny_delete", "deny_purge", "allow_direct"}:
        return bool(value)
    return value


def config_diff(existing: StreamConfig, wanted: StreamConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose existing value differs from the wanted one: ``{field: (existing, wanted)}``."""
    diff: dict[str, tuple[Any, Any]] = {}
    for name in _COMPARED:
        have = _normalise(name, getattr(existing, name))
        want = _normalise(name, getattr(wanted, name))
        if have != want:
            diff[name] = (have, want)
    return diff


def _describe(name: str, diff: dict[str, tuple[Any, Any]]) -> str:
    parts = ", ".join(f"{f}: existing={have!r} wanted={want!r}" for f, (have, want) in diff.items())
    return f"stream {name} exists with a different configuration ({parts})"


async def _ensure_stream(
    js: JetStreamContext, wanted: StreamConfig, *, update: bool, report: ProvisionReport
) -> None:
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        report.created.append(wanted.name)
        log.info("stream_created", stream=wanted.name, replicas=wanted.num_replicas)
        return
    diff = config_diff(info.config, wanted)
    if not diff:
        report.unchanged.append(wanted.name)
        return
    message = _describe(wanted.name, diff)
    if not update or _IMMUTABLE & diff.keys():
        hint = (
            "these fields cannot be changed in place; migrate the stream"
            if _IMMUTABLE & diff.keys()
            else "start with --update-streams to apply the wanted configuration"
        )
        raise StreamConfigConflict(f"{message}; {hint}")
    await js.update_stream(wanted)
    report.updated.append(wanted.name)
    log.warning("stream_updated", stream=wanted.name, changed=sorted(diff))


async def provision(
    js: JetStreamContext, settings: Settings, *, update: bool = False
) -> ProvisionReport:
    """Create the broker's streams and the ``agent_load`` bucket if missing; idempotent.

    A second call with the same settings changes nothing. An existing stream with another
    configuration raises :class:`StreamConfigConflict` listing the differing fields, or is
    updated in place when ``update`` is true and JetStream allows the change.
    """
    report = ProvisionReport()
    for wanted in stream_specs(settings):
        await _patiently(
            functools.partial(_ensure_stream, js, wanted, update=update, report=report)
        )
    bucket = agent_load_spec(settings)
    await _patiently(functools.partial(_ensure_bucket, js, bucket, update=update, report=report))
    return report


#: How long provisioning keeps retrying a step that timed out: a new R3 stream on a cluster
#: that is still electing leaders, or two processes provisioning at once, can take longer
#: than one JetStream API timeout.
PROVISION_PATIENCE_SECONDS = 60.0
#: "no suitable peers for placement": every node is up and follows the meta leader, which
#: has not yet heard from enough of them to place the replicas (seen on a cluster started
#: a moment before the broker).
_JS_NO_SUITABLE_PEERS = 10005


async def _patiently(step: Callable[[], Awaitable[None]]) -> None:
    """Run one idempotent provisioning step, again after a timeout, "no responders" or a
    placement the cluster cannot make yet."""
    deadline = time.monotonic() + PROVISION_PATIENCE_SECONDS
    while True:
        try:
            await step()
            return
        except (
            TimeoutError,
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            ServiceUnavailableError,
        ):
            if time.monotonic() >= deadline:
                raise
        except BadRequestError as e:
            if e.err_code != _JS_NO_SUITABLE_PEERS or time.monotonic() >= deadline:
                raise
        log.warning("provisioning_retried")
        await asyncio.sleep(0.5)


async def open_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """A KV bucket a component owns: opened if it exists, else created with ``config``."""
    try:
        return await js.key_value(config.bucket)
    except BucketNotFoundError:
        return await js.create_key_value(config)


async def _ensure_bucket(
    js: JetStreamContext, kv: KeyValueConfig, *, update: bool, report: ProvisionReport
) -> None:
    stream_name = f"KV_{kv.bucket}"
    try:
        info = await js.stream_info(stream_name)
    except NotFoundError:
        await js.create_key_value(kv)
        report.created.append(kv.bucket)
        log.info("bucket_created", bucket=kv.bucket, ttl_seconds=kv.ttl)
        return
    have = info.config
    diff: dict[str, tuple[Any, Any]] = {}
    if round(float(have.max_age or 0.0), 3) != round(float(kv.ttl or 0.0), 3):
        diff["ttl"] = (have.max_age, kv.ttl)
    if (have.num_replicas or 1) != kv.replicas:
        diff["replicas"] = (have.num_replicas, kv.replicas)
    if have.storage != kv.storage:
        diff["storage"] = (have.storage, kv.storage)
    if not diff:
        report.unchanged.append(kv.bucket)
        return
    message = _describe(f"KV_{kv.bucket}", diff)
    if not update or "storage" in diff:
        raise StreamConfigConflict(
            f"{message}; start with --update-streams to apply the wanted configuration"
        )
    have.max_age = kv.ttl
    have.num_replicas = kv.replicas
    await js.update_stream(have)
    report.updated.append(kv.bucket)
    log.warning("bucket_updated", bucket=kv.bucket, changed=sorted(diff))


async def missing_streams(js: JetStreamContext) -> list[str]:
    """Names of broker streams that do not exist (for readiness)."""
    missing: list[str] = []
    for name in [*Stream, f"KV_{AGENT_LOAD_BUCKET}"]:
        try:
            await js.stream_info(str(name))
        except NotFoundError:
            missing.append(str(name))
    return missing
