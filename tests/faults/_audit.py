"""What survived a fault: the MESSAGES stream read whole, the replica rows, the cluster's
view of the stream (leader, replicas current)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import nats
import nats.errors
import orjson
import sqlalchemy as sa
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamInfo

from broker.devcluster import Topology
from broker.envelope import NATS_MSG_ID, idempotency_key
from broker.reader import read_batches
from broker.streams import Stream


async def connect(nats_url: str) -> NatsClient:
    return await nats.connect(
        nats_url.split(","), connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )


async def stream_info(nats_url: str, stream: str = Stream.MESSAGES) -> StreamInfo:
    nc = await connect(nats_url)
    try:
        return await nc.jetstream(timeout=5).stream_info(stream)
    finally:
        await nc.close()


async def stream_leader(nats_url: str, stream: str = Stream.MESSAGES) -> str:
    """The ``server_name`` of the node that leads ``stream`` (JetStream's stream info)."""
    info = await stream_info(nats_url, stream)
    assert info.cluster is not None, "MESSAGES is not clustered"
    assert info.cluster.leader, info.cluster
    return info.cluster.leader


def ingress_node(topology: Topology) -> str:
    """The node the ingress's NATS connection is on (each node's monitoring ``/connz``)."""
    for node in topology.cluster.nodes:
        with urllib.request.urlopen(f"{node.monitor_url}/connz?limit=4096", timeout=5) as reply:
            connections = json.load(reply).get("connections") or []
        if any(str(c.get("name", "")).startswith("broker-ingress-") for c in connections):
            return node.spec.server_name or "?"
    return "none"


async def wait_stream_current(nats_url: str, replicas: int, timeout: float = 60.0) -> None:
    """Wait until the stream has a leader and every other replica is online and current."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            info = await stream_info(nats_url)
        except Exception as e:  # no leader yet, a node still starting
            last = e
        else:
            cluster = info.cluster
            last = cluster
            peers = (cluster.replicas or []) if cluster else []
            if (
                cluster is not None
                and cluster.leader
                and len(peers) == replicas - 1
                and all(p.current and not p.offline for p in peers)
            ):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"MESSAGES not led and current within {timeout} s: {last!r}")


@dataclass
class StreamAudit:
    """The whole MESSAGES stream against what clients were told."""

    messages: int = 0
    #: stream sequence -> idempotency key (``Nats-Msg-Id``)
    keys: dict[int, str] = field(default_factory=dict)
    #: acknowledged keys not stored at the sequence their ack named
    lost: list[str] = field(default_factory=list)
    #: keys stored more than once (by Nats-Msg-Id), with their count
    duplicate_keys: dict[str, int] = field(default_factory=dict)
    #: payload ids stored more than once, with their count
    duplicate_ids: dict[str, int] = field(default_factory=dict)
    #: messages whose payload is not the JSON every client of the scenario sends:
    #: ``(stream sequence, idempotency key, the payload's first bytes)``
    undecodable: list[tuple[int, str | None, bytes]] = field(default_factory=list)


async def audit_stream(nats_url: str, acked: dict[str, int]) -> StreamAudit:
    """Read MESSAGES from its first sequence to its end and count losses and duplicates.

    A cluster just healed can still be settling its meta leader: a JetStream API call (the
    read's consumer) may time out then, with the stream itself led and current. The read
    changes nothing, so it is made again, from scratch, up to three times."""
    for attempt in range(3):
        try:
            return await _audit_stream_once(nats_url, acked)
        except nats.errors.TimeoutError:
            if attempt == 2:
                raise
            await asyncio.sleep(2)
    raise AssertionError("unreachable")


async def _audit_stream_once(nats_url: str, acked: dict[str, int]) -> StreamAudit:
    audit = StreamAudit()
    by_key: Counter[str] = Counter()
    by_id: Counter[str] = Counter()
    nc = await connect(nats_url)
    try:
        js = nc.jetstream(timeout=10)
        async for batch in read_batches(js, Stream.MESSAGES, batch=1024, fetch_timeout=5):
            for message in batch:
                audit.messages += 1
                key = (message.headers or {}).get(NATS_MSG_ID)
                if key is not None:
                    key = idempotency_key("default", key)  # stored as <tenant>:<key>
                    audit.keys[message.metadata.sequence.stream] = key
                    by_key[key] += 1
                try:
                    payload = orjson.loads(message.data)
                except orjson.JSONDecodeError:  # reported, not a crash of the audit
                    seq = message.metadata.sequence.stream
                    audit.undecodable.append((seq, key, message.data[:80]))
                    continue
                if isinstance(payload, dict) and "id" in payload:
                    by_id[str(payload["id"])] += 1
    finally:
        await nc.close()
    audit.lost = sorted(key for key, seq in acked.items() if audit.keys.get(seq) != key)
    audit.duplicate_keys = {key: n for key, n in by_key.items() if n > 1}
    audit.duplicate_ids = {key: n for key, n in by_id.items() if n > 1}
    return audit


@dataclass
class ReplicaAudit:
    """The replica's ``replica_messages`` rows against the stream."""

    rows: int
    #: stream sequences (of the scenario) without their row
    lost: list[int]
    #: rows beyond one per message id, plus rows whose message id is not the stream's
    duplicated: int
    #: the projection checkpoints when the audit ended (``partition: seq``)
    checkpoints: dict[int, int] = field(default_factory=dict)


def replica_rows(engine: sa.Engine, prefix: str) -> dict[int, str | None]:
    """``seq -> msg_id`` of the replica rows whose message id starts with ``prefix``."""
    query = sa.text("SELECT seq, msg_id FROM replica_messages WHERE msg_id LIKE :p")
    with engine.connect() as conn:
        try:
            rows = conn.execute(query, {"p": f"{prefix}%"}).all()
        except sa.exc.ProgrammingError:  # the worker has not created its tables yet
            return {}
    return {int(seq): msg_id for seq, msg_id in rows}


def replica_max_seq(engine: sa.Engine) -> int:
    query = sa.text("SELECT COALESCE(MAX(seq), 0) FROM replica_messages")
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


async def audit_replica(
    engine: sa.Engine, stream: StreamAudit, prefix: str, timeout: float = 45.0
) -> ReplicaAudit:
    """Wait (up to ``timeout``) for the replica to hold every stream message whose key
    starts with ``prefix``, then compare row by row."""
    wanted = {seq: key for seq, key in stream.keys.items() if key.startswith(prefix)}
    deadline = time.monotonic() + timeout
    while True:
        rows = await asyncio.to_thread(replica_rows, engine, prefix)
        if wanted.keys() <= rows.keys() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    with engine.connect() as conn:
        count, distinct = conn.execute(
            sa.text(
                "SELECT COUNT(*), COUNT(DISTINCT msg_id) FROM replica_messages WHERE msg_id LIKE :p"
            ),
            {"p": f"{prefix}%"},
        ).one()
        checkpoints = conn.execute(
            sa.text(
                "SELECT partition, seq FROM broker_checkpoints "
                "WHERE projection = 'replica_messages'"
            )
        ).all()
    mismatched = sum(1 for seq, key in rows.items() if wanted.get(seq) != key)
    return ReplicaAudit(
        rows=len(rows),
        lost=sorted(wanted.keys() - rows.keys()),
        duplicated=int(count) - int(distinct) + mismatched,
        checkpoints={int(p): int(seq) for p, seq in checkpoints},
    )
