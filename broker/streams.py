"""The streams and buckets the broker owns, and their idempotent provisioning.

Each stream is declared once here (:func:`stream_specs`); :func:`provision` creates what is
missing, leaves what matches alone, and reports a conflicting existing configuration as a
:class:`~broker.errors.StreamConfigConflict` naming every differing field, unless asked to
``update`` the fields JetStream can change in place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
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


def dead_subject(tenant: str) -> str:
    """Where ``ROUTES`` records a decision for nobody, before the DLQ gets it."""
    return f"{SUBJECT_PREFIX[Stream.ROUTES]}.{tenant}.-.dead"


def dlq_subject(tenant: str) -> str:
    """Where the DLQ keeps ``tenant``'s decisions for nobody."""
    return f"{SUBJECT_PREFIX[Stream.DLQ]}.{tenant}.route"


def is_decision_subject(subject: str, tenant: str) -> bool:
    """Whether ``subject`` is one where routers store ``tenant``'s decisions: an inbox, or the
    record of a decision for nobody. No agent's NATS user may publish to either (an agent
    writes only its ``.failed`` and ``.reply.<seq>`` subjects)."""
    parts = subject.split(".")
    inbox = len(parts) == 3 and parts[0] == SUBJECT_PREFIX[Stream.ROUTES] and parts[1] == tenant
    return inbox or subject == dead_subject(tenant)


#: The tenant token of events that belong to no tenant (``audit._.…``); no tenant may be
#: named so (``broker.auth.valid_tenant``).
NO_TENANT = "_"

AGENT_LOAD_BUCKET = "agent_load"
#: Secrets of the broker's own processes (:data:`DECISION_ID_KEY`); no agent may read it.
KEYS_BUCKET = "broker_keys"
#: The highest routing attempt decided per failed message (``broker.routing.router``).
ATTEMPTS_BUCKET = "route_attempts"
#: The key of the routers' decision ids (see ``broker.routing.router.decision_id_key``).
DECISION_ID_KEY = "decision-ids"

#: Fields compared between an existing stream and the wanted one, with the reason the broker
#: cares about each. Every other ``StreamConfig`` field is left as the operator set it, and an
#: update in place keeps it: ``name`` (the identity), ``description`` (text), ``placement``,
#: ``compression`` and ``metadata`` (where and how it is stored, not what), ``republish``
#: (copies messages out; stores the same), ``first_seq`` (read only at creation),
#: ``template_owner`` (templates are gone from JetStream), ``mirror_direct`` (means something
#: only on a mirror, and ``mirror`` is compared), and ``allow_rollup_hdrs``, ``allow_msg_ttl``,
#: ``allow_msg_schedules``, ``allow_atomic``, ``allow_batched``: they act only on messages
#: that carry their ``Nats-*`` headers, which the broker never sends and the ingress does not
#: take from clients (it stores only their ``ce-*`` headers).
_COMPARED = (
    # Set from the broker's settings or its design (``stream_specs``). ``num_replicas`` is
    # the operator's choice, made through ``--replicas``/``BROKER_STREAM_REPLICAS``.
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
    # Left at JetStream's default by the broker, which relies on it: any other value loses
    # acknowledged messages, refuses appends, or breaks the broker's readers.
    "max_msgs_per_subject",  # a limit drops a subject's older messages after their PubAck
    "discard_new_per_subject",  # refuses appends to a full subject
    "max_consumers",  # each projection partition, router, agent and replay has its own
    "consumer_limits",  # an inactive threshold deletes idle durables; max_ack_pending caps them
    "no_ack",  # no PubAck: every append times out
    "sealed",  # refuses every append
    "mirror",  # a mirror refuses appends
    "sources",  # adds messages that were never published through the broker
    "subject_transform",  # stores under subjects the broker's readers do not expect
    "subject_delete_marker_ttl",  # adds marker messages that readers would take for messages
    "allow_msg_counter",  # a counter stream refuses every other message
    "persist_mode",  # async: PubAck before the message is written
)
#: Limits a stream made by an earlier release left unset, which provisioning sets without
#: ``--update-streams``: unset, nats-server (2.15 on) applies its own default, 1,000
#: consumers a stream, which the broker's design (an inbox consumer per agent) outgrows.
#: Setting it changes no stored message and no behaviour below the old default.
_SET_WHEN_UNSET = frozenset({"max_consumers"})
#: Fields JetStream refuses to change on an existing stream, or (``sealed``) to change back to
#: what the broker wants: a difference in one of them cannot be updated in place.
_IMMUTABLE = frozenset({"retention", "storage", "sealed", "allow_msg_counter", "persist_mode"})


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
        "max_consumers": settings.stream_max_consumers,
    }
    # The registry and schema streams are the source of truth: kept forever, never edited.
    audit: dict[str, Any] = {**common, "max_age": 0.0, "max_bytes": -1, "deny_delete": True}
    # ROUTES and DLQ keep copies of MESSAGES' payloads: unless set, MESSAGES' limits bound them
    # (Settings.routes_limits, dlq_limits).
    messages_age, messages_bytes = settings.messages_max_age_seconds, settings.messages_max_bytes
    return [
        StreamConfig(
            name=Stream.MESSAGES,
            description="Every published message, payload as sent (schema-on-read).",
            subjects=[f"{SUBJECT_PREFIX[Stream.MESSAGES]}.>"],
            max_age=messages_age,
            max_bytes=messages_bytes,
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
            max_age=settings.routes_limits[0],
            max_bytes=settings.routes_limits[1],
            deny_delete=False,
            **common,
        ),
        StreamConfig(
            name=Stream.DLQ,
            description="What could not be processed, with the reason.",
            subjects=[f"{SUBJECT_PREFIX[Stream.DLQ]}.>"],
            max_age=settings.dlq_limits[0],
            max_bytes=settings.dlq_limits[1],
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


#: How long the routers remember a failed message's highest attempt: far longer than any
#: agent takes to store a failure again (its ack_wait times its deliveries).
ATTEMPTS_TTL_SECONDS = 24 * 3600.0


def attempts_spec(replicas: int) -> KeyValueConfig:
    """The highest attempt the routers decided for each failed message (``<tenant>.<seq>``):
    a failure stored twice, however far apart (past ``ROUTES``' duplicate window), is
    retried once."""
    return KeyValueConfig(
        bucket=ATTEMPTS_BUCKET,
        description="The highest routing attempt decided per failed message (retries).",
        history=1,
        ttl=ATTEMPTS_TTL_SECONDS,
        storage=StorageType.FILE,
        replicas=replicas,
    )


def keys_spec(replicas: int) -> KeyValueConfig:
    """Secrets the broker's processes share (kept for good: no TTL, one revision)."""
    return KeyValueConfig(
        bucket=KEYS_BUCKET,
        description="Secrets of the broker's own processes (the routers' decision-id key).",
        history=1,
        storage=StorageType.FILE,
        replicas=replicas,
    )


@dataclass
class ProvisionReport:
    """What :func:`provision` did, by stream or bucket name."""

    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


_UNLIMITED_IF_UNSET = frozenset({"max_bytes", "max_msgs", "max_consumers", "max_msgs_per_subject"})
_FLAGS = frozenset(
    {
        "deny_delete",
        "deny_purge",
        "allow_direct",
        "discard_new_per_subject",
        "no_ack",
        "sealed",
        "allow_msg_counter",
    }
)


def _normalise(name: str, value: Any) -> Any:
    """One spelling per meaning: what JetStream reports and what the broker asks for differ
    in how they say "unset" (``None``, ``0``, ``-1``, ``False``, an empty object)."""
    if name == "subjects":
        return sorted(value or [])
    if name in {"max_age", "duplicate_window", "subject_delete_marker_ttl"}:
        return round(float(value or 0.0), 3)
    if name in _UNLIMITED_IF_UNSET:
        return -1 if value in (None, 0, -1) else value
    if name == "num_replicas":
        return value or 1
    if name in _FLAGS:
        return bool(value)
    if name == "sources":
        return [source.as_dict() for source in value or []]
    if name in {"mirror", "subject_transform", "consumer_limits"}:
        shown = value.as_dict() if value is not None else {}
        # An empty consumer_limits object (what JetStream reports) sets no limit.
        return {k: v for k, v in shown.items() if v} or None
    if name == "persist_mode":
        return None if value in (None, PersistMode.DEFAULT) else str(value)
    return value


def config_diff(
    existing: StreamConfig, wanted: StreamConfig, fields: Iterable[str] = _COMPARED
) -> dict[str, tuple[Any, Any]]:
    """Fields whose existing value differs from the wanted one: ``{field: (existing, wanted)}``."""
    diff: dict[str, tuple[Any, Any]] = {}
    for name in fields:
        have = _normalise(name, getattr(existing, name))
        want = _normalise(name, getattr(wanted, name))
        if have != want:
            diff[name] = (have, want)
    return diff


#: The settings that set a stream's own retention limits, by stream and field.
_LIMIT_SETTINGS = {
    (Stream.MESSAGES, "max_age"): "BROKER_MESSAGES_MAX_AGE_SECONDS",
    (Stream.MESSAGES, "max_bytes"): "BROKER_MESSAGES_MAX_BYTES",
    (Stream.ROUTES, "max_age"): "BROKER_ROUTES_MAX_AGE_SECONDS",
    (Stream.ROUTES, "max_bytes"): "BROKER_ROUTES_MAX_BYTES",
    (Stream.DLQ, "max_age"): "BROKER_DLQ_MAX_AGE_SECONDS",
    (Stream.DLQ, "max_bytes"): "BROKER_DLQ_MAX_BYTES",
}


def _tightened(diff: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """The retention limits in ``diff`` (normalised values) that the wanted configuration
    lowers: 0 s and -1 bytes are no limit."""
    lowered = []
    for name in ("max_age", "max_bytes"):
        if name not in diff:
            continue
        have, want = diff[name]
        unlimited = 0.0 if name == "max_age" else -1
        if want != unlimited and (have == unlimited or want < have):
            lowered.append(name)
    return lowered


def _loss_warning(name: str, diff: Mapping[str, tuple[Any, Any]], messages: int) -> str:
    """What applying ``diff`` to stream ``name``, which holds ``messages``, deletes at once,
    and how to keep it: ``""`` when it lowers no limit or the stream is empty. A stream made
    by an earlier release that did not bound ROUTES and DLQ differs from one made now as soon
    as MESSAGES is bounded, and its dead letters are what a person has not looked at yet."""
    lowered = _tightened(diff)
    if not lowered or messages == 0:
        return ""
    keep = ", ".join(
        f"{_LIMIT_SETTINGS[(Stream(name), f)]}={'0' if f == 'max_age' else '-1'}"
        if (Stream(name), f) in _LIMIT_SETTINGS
        else f
        for f in lowered
    )
    return (
        f"; applying it deletes at once the messages of {name} ({messages} stored) past the "
        f"new {' and '.join(lowered)}; to keep them unbounded set {keep}"
    )


def _describe(name: str, diff: dict[str, tuple[Any, Any]]) -> str:
    parts = ", ".join(f"{f}: existing={have!r} wanted={want!r}" for f, (have, want) in diff.items())
    return f"stream {name} exists with a different configuration ({parts})"


async def _reconcile(
    js: JetStreamContext,
    existing: StreamConfig,
    wanted: StreamConfig,
    diff: dict[str, tuple[Any, Any]],
    *,
    update: bool,
    shown_as: Mapping[str, str] | None = None,
    stored: int = 0,
) -> None:
    """Refuse a differing configuration, or, asked to ``update``, apply the wanted values of
    the differing fields in place, keeping every field the broker does not compare (the
    operator's placement, compression, metadata…)."""
    assert existing.name is not None
    renamed = {(shown_as or {}).get(name, name): values for name, values in diff.items()}
    message = _describe(existing.name, renamed)
    if _IMMUTABLE & diff.keys():
        raise StreamConfigConflict(
            f"{message}; these fields cannot be changed in place; migrate the stream"
        )
    loss = _loss_warning(existing.name, diff, stored) if existing.name in set(Stream) else ""
    if not update:
        raise StreamConfigConflict(
            f"{message}{loss}; start with --update-streams to apply the wanted configuration"
        )
    if loss:
        log.warning("stream_limits_lowered", stream=existing.name, warning=loss[2:])
    changed = dataclasses.replace(existing, **{name: getattr(wanted, name) for name in diff})
    try:
        await js.update_stream(changed)
    except APIError as e:
        if isinstance(e, ServiceUnavailableError) or e.err_code == _JS_NO_SUITABLE_PEERS:
            raise  # the cluster is not ready yet: ``_patiently`` tries again
        # e.g. deny_delete or deny_purge, which JetStream sets once and never clears
        raise StreamConfigConflict(
            f"{message}; JetStream refused the update ({e.description}); migrate the stream"
        ) from e


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
    unset = all(name in _SET_WHEN_UNSET and have == -1 for name, (have, _) in diff.items())
    stored = info.state.messages if info.state is not None else 0
    await _reconcile(js, info.config, wanted, diff, update=update or unset, stored=stored)
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
    buckets = (
        agent_load_spec(settings),
        keys_spec(settings.stream_replicas),
        attempts_spec(settings.stream_replicas),
    )
    for bucket in buckets:
        await _patiently(
            functools.partial(_ensure_bucket, js, bucket, update=update, report=report)
        )
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


#: What the broker relies on in a bucket's stream, by the name the bucket's own setting has
#: where it has one: ``history`` is its ``max_msgs_per_subject`` (kept older heartbeats
#: would read as more instances of an agent), ``ttl`` its ``max_age``. The fields the KV
#: client itself sets (discard, rollups, deletes, TTL headers) are its business.
_BUCKET_COMPARED: dict[str, str] = {
    "subjects": "subjects",
    "storage": "storage",
    "num_replicas": "replicas",
    "max_age": "ttl",
    "max_msgs_per_subject": "history",
    "max_consumers": "max_consumers",  # the router follows the bucket with its own consumer
    "consumer_limits": "consumer_limits",
    "no_ack": "no_ack",
    "sealed": "sealed",
    "mirror": "mirror",
    "sources": "sources",
    "subject_transform": "subject_transform",
    "allow_msg_counter": "allow_msg_counter",
    "persist_mode": "persist_mode",
}


def _bucket_stream(kv: KeyValueConfig) -> StreamConfig:
    """The compared part of the stream ``create_key_value`` makes for ``kv``."""
    return StreamConfig(
        name=f"KV_{kv.bucket}",
        subjects=[f"$KV.{kv.bucket}.>"],
        storage=kv.storage,
        num_replicas=kv.replicas,
        max_age=kv.ttl,
        max_msgs_per_subject=kv.history,
    )


async def _ensure_bucket(
    js: JetStreamContext, kv: KeyValueConfig, *, update: bool, report: ProvisionReport
) -> None:
    wanted = _bucket_stream(kv)
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.create_key_value(kv)
        report.created.append(kv.bucket)
        log.info("bucket_created", bucket=kv.bucket, ttl_seconds=kv.ttl)
        return
    diff = config_diff(info.config, wanted, _BUCKET_COMPARED)
    if not diff:
        report.unchanged.append(kv.bucket)
        return
    await _reconcile(js, info.config, wanted, diff, update=update, shown_as=_BUCKET_COMPARED)
    report.updated.append(kv.bucket)
    log.warning(
        "bucket_updated", bucket=kv.bucket, changed=sorted(_BUCKET_COMPARED[f] for f in diff)
    )


async def missing_streams(js: JetStreamContext, names: Sequence[str] = ()) -> list[str]:
    """Which of the streams ``names`` do not exist; with none named, which of the broker's
    streams and buckets (for readiness)."""
    wanted = names or [*Stream, f"KV_{AGENT_LOAD_BUCKET}", f"KV_{KEYS_BUCKET}"]
    missing: list[str] = []
    for name in wanted:
        try:
            await js.stream_info(str(name))
        except NotFoundError:
            missing.append(str(name))
    return missing
