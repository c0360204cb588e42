"""What ``broker status`` and ``/ui`` show, read from JetStream in one pass.

:func:`collect` reads the broker's streams (messages, bytes, sequences), their durable
consumers (what each has left to process: a projection's lag), the agents (registered, and
their live load from the ``agent_load`` bucket), the latest DLQ entries and the latest
routing decisions (``RouteDecided`` in ``ROUTES``, and messages nobody qualified for in
``dlq.<tenant>.route``) with their candidates' scores and trace ids. Everything here is
read-only and bounded: a few stream-info calls, the consumer lists (at most
:data:`MAX_CONSUMER_PAGES` pages a stream) and short reads of the streams' tails.

Heartbeats are read as the routers read them (:meth:`InstanceLoad.from_json`, the body
naming the key it is stored under) and an agent's load is :func:`aggregate` over its
instances, so ``/v1/status``, ``broker status`` and the agent gauges of ``/metrics`` agree.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.consumers import list_consumers
from broker.envelope import read_number
from broker.reader import read_batches
from broker.registry.snapshot import AgentRecord

# Heartbeats parsed and aggregated as the routers do. The routing package loads no embedder
# model on import (only on first use), and the ingress, which serves this, imports it anyway.
from broker.routing.load import InstanceLoad, aggregate
from broker.routing.types import AgentLoad
from broker.streams import (
    AGENT_LOAD_BUCKET,
    SUBJECT_PREFIX,
    Stream,
    dlq_subject,
    is_decision_subject,
)
from broker.telemetry.tracing import extract

log = structlog.get_logger(__name__)

H_EVENT = "Broker-Event"
H_ROUTE = "Broker-Route"
ROUTE_DECIDED = "RouteDecided"
#: How far back from a stream's end the tail reads look, at most.
_MAX_TAIL = 5000
_KV_STREAM = f"KV_{AGENT_LOAD_BUCKET}"
_KV_OPERATION = "KV-Operation"
#: Seconds each JetStream API request of one status read may take.
_API_TIMEOUT = 5.0
#: Pages of a stream's consumers status reads at most (:func:`broker.consumers.list_consumers`;
#: agents' inboxes, ``agent-…``, come first, so one page would hide the projections' lag as
#: soon as there are 256 agents); it says how many it left out (``consumers_unlisted``).
MAX_CONSUMER_PAGES = 16
#: The largest number a heartbeat's field is shown as: the load of many instances then still
#: adds up to a finite number (``1e308 + 1e308`` is infinity, which JSON cannot carry).
LOAD_MAX = 1e12
#: The lists of the status document that ``recent`` bounds, each newest first.
RECENT_LISTS = ("dlq", "routes")


@dataclass(frozen=True, slots=True)
class StreamState:
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: int


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """A durable consumer; ``lag`` is what it has not processed yet (pending + unacked)."""

    stream: str
    name: str
    kind: str  # projection, router, agent or other
    pending: int
    ack_pending: int
    redelivered: int
    delivered_seq: int
    ack_floor_seq: int

    @property
    def lag(self) -> int:
        return self.pending + self.ack_pending


@dataclass(frozen=True, slots=True)
class AgentState:
    """A registered agent and/or one that heartbeats load (its live instances, as the
    routers read them); :attr:`load` is what the routers aggregate from them."""

    name: str
    registered: bool
    version: str | None
    capabilities: list[str]
    instances: list[InstanceLoad]

    @property
    def load(self) -> AgentLoad:
        return aggregate(self.instances) if self.instances else AgentLoad(instances=0)


@dataclass(frozen=True, slots=True)
class DlqEntry:
    seq: int
    subject: str
    time: str | None
    source: str  # the projection that gave up, or "route"
    error: str | None
    origin_stream: str | None
    origin_seq: int | None


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """One routing decision as stored (``Broker-Route``), with the trace it belongs to."""

    stream: str
    seq: int
    subject: str
    time: str | None
    agent: str | None
    capability: str | None
    reason: str | None
    detail: str | None
    candidates: list[dict[str, Any]]
    message_seq: int | None
    message_subject: str | None
    attempt: int | None
    policy_version: str | None
    trace_id: str | None
    #: A copy for a policy's shadow agent (``mirror``), which was never chosen itself: the
    #: decision is the entry of the same message and attempt for the agent it shadows.
    mirror: bool = False


@dataclass(frozen=True, slots=True)
class BuildInfo:
    version: str
    git_revision: str
    nats_server_version: str | None
    tenant: str


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    generated_at: str
    broker: BuildInfo
    streams: list[StreamState]
    consumers: list[ConsumerState]
    agents: list[AgentState]
    dlq: list[DlqEntry]
    routes: list[RouteEntry]
    links: dict[str, str | None] = field(default_factory=dict)
    #: By stream, how many consumers were not read (past :data:`MAX_CONSUMER_PAGES` pages):
    #: ``consumers`` is then incomplete for that stream.
    consumers_unlisted: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``GET /v1/status`` and ``broker status --json``."""
        document = asdict(self)
        for consumer, data in zip(self.consumers, document["consumers"], strict=True):
            data["lag"] = consumer.lag
        for agent, data in zip(self.agents, document["agents"], strict=True):
            load = agent.load
            data["load"] = {
                "instances": load.instances,
                "in_flight": load.in_flight,
                "qps": load.qps,
                "p99_ms": load.p99_ms,
                "error_rate": load.error_rate,
            }
        return document


async def collect(
    nc: NatsClient,
    *,
    build: BuildInfo,
    registered: Iterable[AgentRecord] = (),
    recent: int = 20,
    trace_url: str | None = None,
    all_dead_letters: bool = True,
) -> BrokerStatus:
    """The broker's state now, as one :class:`BrokerStatus`.

    ``all_dead_letters=False`` is a tenant's view: the DLQ tail keeps to ``dlq.<tenant>.…``
    and the agents' consumers to the tenant's own inboxes.
    """
    js = nc.jetstream(timeout=_API_TIMEOUT)
    streams = await _streams(js)
    by_name = {s.name: s for s in streams}
    (consumers, unlisted), agents, dlq_messages, route_messages = await asyncio.gather(
        _consumers(nc, [s.name for s in streams], None if all_dead_letters else build.tenant),
        _agents(js, build.tenant, registered),
        _tail(
            js,
            Stream.DLQ,
            by_name.get(Stream.DLQ),
            None if all_dead_letters else f"{SUBJECT_PREFIX[Stream.DLQ]}.{build.tenant}.>",
            recent,
        ),
        _tail(
            js,
            Stream.ROUTES,
            by_name.get(Stream.ROUTES),
            # Inboxes and the record of a decision for nobody (route.<t>.-.dead), not the
            # answers stored beside them: a failed route was missing here, and shown only
            # while its DLQ copy was among the DLQ's last messages.
            f"{SUBJECT_PREFIX[Stream.ROUTES]}.{build.tenant}.>",
            recent,
            keep=lambda m: is_decision_subject(m.subject, build.tenant),
        ),
    )
    route_dlq = dlq_subject(build.tenant)
    routes: list[RouteEntry] = []
    seen: set[tuple[object, ...]] = set()
    for m in [*route_messages, *(m for m in dlq_messages if m.subject == route_dlq)]:
        r = _route(m)
        if r is None:
            continue
        same = (r.message_seq, r.attempt, r.agent, r.reason)  # its DLQ copy: shown once
        if r.message_seq is None or same not in seen:
            seen.add(same)
            routes.append(r)
    routes.sort(key=lambda r: (r.time or "", r.seq), reverse=True)
    return BrokerStatus(
        generated_at=datetime.now(UTC).isoformat(),
        broker=build,
        streams=streams,
        consumers=consumers,
        agents=agents,
        dlq=[_dlq_entry(m) for m in reversed(dlq_messages)],
        routes=routes[:recent],
        links={"trace": trace_url},
        consumers_unlisted=unlisted,
    )


async def _streams(js: JetStreamContext) -> list[StreamState]:
    found: list[StreamState] = []
    for name in Stream:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue
        state = info.state
        found.append(
            StreamState(
                name=str(name),
                messages=state.messages,
                bytes=state.bytes,
                first_seq=state.first_seq,
                last_seq=state.last_seq,
                consumers=state.consumer_count,
            )
        )
    return found


def _consumer_kind(stream: str, name: str) -> str:
    if name.startswith("proj_"):
        return "projection"
    if name.startswith("router"):
        return "router"
    if stream == Stream.ROUTES:
        return "agent"
    return "other"


def _seq(position: Any) -> int:
    """The stream sequence of a consumer's ``delivered`` or ``ack_floor``."""
    return (read_number(position.get("stream_seq")) or 0) if isinstance(position, dict) else 0


def _consumer(info: Mapping[str, Any]) -> ConsumerState:
    """One entry of nats-server's consumer list (its ``ConsumerInfo`` JSON)."""
    stream, name = str(info.get("stream_name", "")), str(info.get("name", ""))
    return ConsumerState(
        stream=stream,
        name=name,
        kind=_consumer_kind(stream, name),
        pending=read_number(info.get("num_pending")) or 0,
        ack_pending=read_number(info.get("num_ack_pending")) or 0,
        redelivered=read_number(info.get("num_redelivered")) or 0,
        delivered_seq=_seq(info.get("delivered")),
        ack_floor_seq=_seq(info.get("ack_floor")),
    )


async def _consumers(
    nc: NatsClient, streams: list[str], tenant: str | None
) -> tuple[list[ConsumerState], dict[str, int]]:
    """Durable consumers only: the ephemeral ones are reads (replay, this status) in flight.
    With ``tenant``, agents' consumers that read anything but the tenant's own inboxes are
    left out (their names are those agents' names). Also, by stream, how many consumers
    were not read."""

    async def listed(stream: str) -> tuple[list[dict[str, Any]], int]:
        try:
            return await list_consumers(
                nc, stream, timeout=_API_TIMEOUT, max_pages=MAX_CONSUMER_PAGES
            )
        except NotFoundError:  # the stream went away since it was listed
            return [], 0

    found: list[ConsumerState] = []
    unlisted: dict[str, int] = {}
    own_inboxes = f"{SUBJECT_PREFIX[Stream.ROUTES]}.{tenant}."
    for stream, (infos, left_out) in zip(
        streams, await asyncio.gather(*(listed(s) for s in streams)), strict=True
    ):
        if left_out:
            unlisted[stream] = left_out
        for info in infos:
            config = info.get("config")
            if not isinstance(config, dict) or not config.get("durable_name"):
                continue
            consumer = _consumer(info)
            if tenant is None or consumer.kind != "agent" or _reads_only(config, own_inboxes):
                found.append(consumer)
    found.sort(key=lambda c: (c.stream, c.name))
    return found, unlisted


def _filters(config: Mapping[str, Any]) -> list[str]:
    """The subjects a consumer reads: its ``filter_subject``, or its ``filter_subjects``
    (nats-server 2.10 and later); none when it reads the whole stream."""
    many = config.get("filter_subjects")
    subjects = [s for s in many if isinstance(s, str)] if isinstance(many, list) else []
    one = _str(config.get("filter_subject"))
    return [*subjects, one] if one else subjects


def _reads_only(config: Mapping[str, Any], prefix: str) -> bool:
    """Whether a consumer reads subjects under ``prefix`` and nothing else."""
    filters = _filters(config)
    return bool(filters) and all(s.startswith(prefix) for s in filters)


def _bounded(value: float) -> float:
    return min(value, LOAD_MAX)


def _shown(load: InstanceLoad) -> InstanceLoad:
    """A heartbeat with each number at most :data:`LOAD_MAX` (the routers' reading already
    made them finite and not negative, and the rates at most 1)."""
    gpu = load.gpu_free_mb
    return replace(
        load,
        qps=_bounded(load.qps),
        in_flight=min(load.in_flight, int(LOAD_MAX)),
        p50_ms=_bounded(load.p50_ms),
        p99_ms=_bounded(load.p99_ms),
        gpu_free_mb=None if gpu is None else _bounded(gpu),
        at=_bounded(load.at),
    )


async def _agents(
    js: JetStreamContext, tenant: str, registered: Iterable[AgentRecord]
) -> list[AgentState]:
    agents: dict[str, AgentState] = {
        r.name: AgentState(
            name=r.name,
            registered=True,
            version=str(r.manifest.version),
            capabilities=[c.action for c in r.manifest.capabilities],
            instances=[],
        )
        for r in registered
    }
    prefix = f"$KV.{AGENT_LOAD_BUCKET}."
    # A key's value is its newest message: with a bucket that keeps history, older ones are
    # past heartbeats of the same instance (or what a deletion replaced), not more instances.
    newest: dict[str, Msg] = {}
    with contextlib.suppress(NotFoundError):
        reading = f"{prefix}{tenant}.>"
        async for batch in read_batches(js, _KV_STREAM, subject=reading, batch=256):
            for message in batch:  # in stream order: a later one is newer
                newest[message.subject] = message
    for subject, message in newest.items():
        if message.headers and message.headers.get(_KV_OPERATION) in {"DEL", "PURGE"}:
            continue
        load = _instance_load(subject[len(prefix) :], message.data)
        if load is None:
            continue
        state = agents.get(load.agent)
        if state is None:
            state = agents[load.agent] = AgentState(load.agent, False, None, [], [])
        state.instances.append(load)
    return sorted(agents.values(), key=lambda a: a.name)


def _instance_load(key: str, data: bytes) -> InstanceLoad | None:
    """The heartbeat stored under ``key`` as the routers read it; ``None`` when it is none,
    or when its body is for another key than its own (routers ignore it then: who a
    heartbeat is for is its key, never what its body claims)."""
    try:
        load = InstanceLoad.from_json(data)
    except ValueError:
        return None
    if load.key != key:
        log.debug("agent_load_key_mismatch", key=key[:200], claims=load.key[:200])
        return None
    return _shown(load)


async def _tail(
    js: JetStreamContext,
    stream: str,
    state: StreamState | None,
    subject: str | None,
    count: int,
    *,
    keep: Callable[[Msg], bool] | None = None,
) -> list[Msg]:
    """The last ``count`` messages of ``stream`` (matching ``subject``, and ``keep`` when
    given), oldest first.

    Reads back from the end in growing windows (the filtered messages may be sparse), never
    more than ``_MAX_TAIL`` messages from the end.
    """
    if state is None or state.messages == 0 or count <= 0:
        return []
    window = count
    while True:
        start = max(state.first_seq, state.last_seq - window + 1)
        found: list[Msg] = []
        reading = read_batches(js, stream, subject=subject, start_seq=start, batch=min(window, 512))
        with contextlib.suppress(NotFoundError):
            async with contextlib.aclosing(reading) as batches:
                async for batch in batches:
                    found.extend(
                        m
                        for m in batch
                        if m.metadata.sequence.stream <= state.last_seq
                        and (keep is None or keep(m))
                    )
                    if batch and batch[-1].metadata.sequence.stream >= state.last_seq:
                        break  # the snapshot's end: a busy stream's newer messages are not read
        if len(found) >= count or start <= state.first_seq or window >= _MAX_TAIL:
            return found[-count:]
        window = min(_MAX_TAIL, window * 8)


def _time(message: Msg) -> str | None:
    stamp = message.metadata.timestamp
    return stamp.isoformat() if stamp else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dlq_entry(message: Msg) -> DlqEntry:
    headers: Mapping[str, str] = message.headers or {}
    projection = headers.get("Broker-Dlq-Projection")
    error = headers.get("Broker-Dlq-Error")
    if projection is None and H_ROUTE in headers:
        decision = _decision(headers[H_ROUTE])
        reason, detail = _str(decision.get("reason")), _str(decision.get("detail"))
        error = f"{reason}: {detail}" if reason and detail else reason or detail
        origin_stream: str | None = Stream.MESSAGES.value
        origin_seq = read_number(decision.get("message_seq"))
    else:
        origin_stream = headers.get("Broker-Dlq-Stream")
        origin_seq = read_number(headers.get("Broker-Dlq-Seq"))
    return DlqEntry(
        seq=message.metadata.sequence.stream,
        subject=message.subject,
        time=_time(message),
        source=projection or ("route" if message.subject.endswith(".route") else "unknown"),
        error=error,
        origin_stream=origin_stream,
        origin_seq=origin_seq,
    )


def _decision(raw: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _candidates(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [c for c in value[:20] if isinstance(c, dict)]


def _route(message: Msg) -> RouteEntry | None:
    headers: Mapping[str, str] = message.headers or {}
    raw = headers.get(H_ROUTE)
    if raw is None:
        return None
    decision = _decision(raw)
    trace = extract(headers)
    return RouteEntry(
        stream=message.metadata.stream,
        seq=message.metadata.sequence.stream,
        subject=message.subject,
        time=_str(decision.get("decided_at")) or _time(message),
        agent=_str(decision.get("agent")),
        capability=_str(decision.get("capability")),
        reason=_str(decision.get("reason")),
        detail=_str(decision.get("detail")),
        candidates=_candidates(decision.get("candidates")),
        message_seq=read_number(decision.get("message_seq")),
        message_subject=_str(decision.get("message_subject")),
        attempt=read_number(decision.get("attempt")),
        policy_version=_str(decision.get("policy_version")),
        trace_id=trace.trace_id_hex if trace is not None else None,
        mirror=decision.get("mirror") is True,
    )
