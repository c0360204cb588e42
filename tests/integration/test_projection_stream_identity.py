"""A stream deleted and made again is told apart from the one the checkpoints were recorded
in by its creation time, kept beside the checkpoints (``broker_stream_identity``): a worker
started after the new stream has grown past the old checkpoints holds instead of skipping
the new stream's first messages, until ``broker projections reset``. Real nats-server,
SQLite and the PostgreSQL on this machine."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from broker.cli_projections import _reset
from broker.embedded import NatsServer
from broker.settings import Settings
from broker.streams import Stream, provision
from projections.checkpoints import (
    SqlCheckpointReader,
    SqlCheckpointStore,
    StreamIdentity,
    create_sql_engine,
)
from projections.replica import MessagesReplica
from projections.runtime import ProjectionRunner, progress
from tests._wait import await_until
from tests.integration.conftest import ReplicaDb as Db
from tests.integration.conftest import replica_db

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HELD = "projection_checkpoint_ahead_of_stream"
#: ``broker_checkpoints`` as the DDL before stream identities made it (and nothing else).
OLD_DDL = (
    "CREATE TABLE broker_checkpoints (projection VARCHAR(128) NOT NULL, "
    "partition INTEGER NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (projection, partition))"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """A SQLite file, or a fresh schema of the PostgreSQL on this machine (dropped after)."""
    with replica_db(request.param, "identity", tmp_path) as found:
        yield found


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    """JetStream of a fresh server with every broker stream provisioned."""
    nc = await nats.connect(nats_url)
    await provision(nc.jetstream(), Settings())
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
def pg() -> Iterator[Db]:
    with replica_db("postgresql", "identity") as found:
        yield found


async def publish(js: JetStreamContext, n: int, tag: str) -> None:
    for i in range(n):
        await js.publish(f"msg.default.{tag}{i}", b'{"i": %d}' % i)


async def make_again(js: JetStreamContext) -> None:
    """Delete MESSAGES and provision it again: same name, sequences from 1, a new stream."""
    await js.delete_stream(Stream.MESSAGES)
    await provision(js, Settings())


def stored_subjects(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT subject FROM replica_messages ORDER BY seq"))
        return [r[0] for r in rows]


def status(nats_url: str, url: str) -> dict[str, Any]:
    """`broker projections status -o json`'s row of replica_messages (fails on an error)."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "broker", "projections", "status"),
            *("--nats-url", nats_url, "--replica-url", url, "-o", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["projection"]: r for r in json.loads(done.stdout)}
    return rows["replica_messages"]


class Run:
    """A runner on its own store and engine, as a freshly started worker has them."""

    def __init__(self, js: JetStreamContext, url: str) -> None:
        self.engine = create_sql_engine(url)
        self.projection = MessagesReplica()
        with self.engine.begin() as tx:
            self.projection.setup(tx)
        self.store = SqlCheckpointStore(self.engine)
        self.runner = ProjectionRunner(js, self.projection, self.store, batch=100, lag_every=0.1)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.runner.run(self.stop))

    async def applied_up_to(self, seq: int, timeout: float = 20) -> bool:
        async def reached() -> bool:
            return self.runner.stats.last_seq >= seq

        return await await_until(reached, timeout=timeout)

    async def close(self) -> None:
        if not self.stop.is_set():
            self.stop.set()
            await asyncio.wait_for(self.task, 20)
            await self.store.close()


Start = Callable[[JetStreamContext, str], Run]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Starts :class:`Run`s; stops those a failing test left running."""
    started: list[Run] = []

    def run(js: JetStreamContext, url: str) -> Run:
        started.append(Run(js, url))
        return started[-1]

    yield run
    for r in started:
        await r.close()


def held_reports(logs: list[dict[str, Any]]) -> int:
    return sum(e["event"] == HELD for e in logs)


async def held(logs: list[dict[str, Any]], times: int = 2) -> bool:
    """Whether the hold was reported ``times`` times (checked again, still held)."""

    async def reported() -> bool:
        return held_reports(logs) >= times

    return await await_until(reported, timeout=20)


async def test_a_restarted_worker_holds_on_a_stream_made_again_and_grown_past_its_checkpoints(
    js: JetStreamContext, nats_url: str, db: Db, start: Start
) -> None:
    """Checkpoints at 5; MESSAGES deleted and made again while no worker runs, and 8
    messages published to it. A worker started then used to see only a checkpoint below the
    stream's end, and skipped the new seqs 1-5 for good. It sees that the stream's creation
    time is not the recorded one: it applies nothing and says so (log, status) until the
    reset, which applies all 8."""
    first = start(js, db.url)
    await publish(js, 5, "old")
    assert await first.applied_up_to(5)
    await first.close()

    await make_again(js)
    await publish(js, 8, "new")

    with capture_logs() as logs:
        restarted = start(js, db.url)
        assert await held(logs)
        assert restarted.runner.stats.applied == 0
        assert restarted.runner.stats.skipped == 0
        assert await restarted.runner.lag() < 0
        await restarted.close()
    report = next(e for e in logs if e["event"] == HELD)
    assert report["log_level"] == "error"
    assert report["checkpoint"] == 5
    assert report["action"] == "broker projections reset replica_messages"
    assert report["stream_created"] != report["checkpoints_stream_created"]
    assert stored_subjects(db.engine) == [f"old{i}" for i in range(5)]
    assert set((await SqlCheckpointStore(db.engine).load("replica_messages")).values()) == {5}

    row = await asyncio.to_thread(status, nats_url, db.url)
    assert (row["applied_seq"], row["lag"]) == (5, -1)
    assert row["problem"] == (
        "stream made again since its checkpoints: broker projections reset replica_messages"
    )

    rebuilt = await asyncio.wait_for(_reset(nats_url, db.url, "replica_messages"), 60)
    assert rebuilt.applied == 8
    assert stored_subjects(db.engine) == [f"new{i}" for i in range(8)]
    row = await asyncio.to_thread(status, nats_url, db.url)
    assert (row["applied_seq"], row["lag"], row["problem"]) == (8, 0, "")

    # After the reset the identity is the new stream's: a worker goes on from 8.
    await publish(js, 2, "more")
    with capture_logs() as logs:
        after = start(js, db.url)
        assert await after.applied_up_to(10)
        await after.close()
    assert held_reports(logs) == 0
    assert stored_subjects(db.engine)[-2:] == ["more0", "more1"]


async def test_a_nats_server_restart_keeps_the_stream_identity(
    nats_server: NatsServer, js: JetStreamContext, pg: Db, start: Start
) -> None:
    """The same stream after a server restart has the same creation time: a worker started
    afterwards goes on from its checkpoints and holds nothing."""
    first = start(js, pg.url)
    await publish(js, 5, "a")
    assert await first.applied_up_to(5)
    await first.close()
    recorded = await SqlCheckpointStore(pg.engine).stream_identity("replica_messages")

    nats_server.restart()
    nc = await nats.connect(nats_server.url)
    try:
        js2 = nc.jetstream()
        assert (await js2.stream_info(Stream.MESSAGES)).state.last_seq == 5
        await publish(js2, 3, "b")
        with capture_logs() as logs:
            again = start(js2, pg.url)
            assert await again.applied_up_to(8)
            await again.close()
    finally:
        await nc.close()
    assert held_reports(logs) == 0
    assert again.runner.stats.applied == 3
    assert await SqlCheckpointStore(pg.engine).stream_identity("replica_messages") == recorded


async def test_a_database_from_before_stream_identities_upgrades(
    js: JetStreamContext, nats_url: str, pg: Db, start: Start
) -> None:
    """``broker_checkpoints`` made by the old DDL, no identity table: status reads it
    without creating anything; a worker adds the table, records the stream it finds (no
    identity is "unknown", not a mismatch), goes on from its checkpoint, and from then on
    notices the stream being made again across a restart."""
    replica = MessagesReplica()
    with pg.engine.begin() as tx:
        tx.execute(sa.text(OLD_DDL))
        replica.setup(tx)
        tx.execute(
            sa.text("INSERT INTO broker_checkpoints VALUES ('replica_messages', :p, 3)"),
            [{"p": p} for p in range(replica.partitions)],
        )
    await publish(js, 6, "a")

    row = await asyncio.to_thread(status, nats_url, pg.url)
    assert (row["applied_seq"], row["lag"], row["problem"]) == (3, 3, "")
    with pg.engine.connect() as conn:
        assert not sa.inspect(conn).has_table("broker_stream_identity")

    with capture_logs() as logs:
        upgraded = start(js, pg.url)
        assert await upgraded.applied_up_to(6)
        await upgraded.close()
    assert held_reports(logs) == 0
    assert stored_subjects(pg.engine) == ["a3", "a4", "a5"]  # 1-3 were applied before
    created = (await js.stream_info(Stream.MESSAGES)).created
    assert created is not None
    assert await SqlCheckpointStore(pg.engine).stream_identity("replica_messages") == (
        StreamIdentity(Stream.MESSAGES, created.isoformat())
    )

    await make_again(js)
    await publish(js, 9, "b")
    with capture_logs() as logs:
        restarted = start(js, pg.url)
        assert await held(logs)
        assert restarted.runner.stats.applied == 0
        await restarted.close()


async def test_checkpoints_found_past_a_stream_before_any_identity_stay_held_after_a_restart(
    js: JetStreamContext, nats_url: str, pg: Db, start: Start
) -> None:
    """An old database whose stream was already made again and is still shorter than the
    checkpoints (8 > 2): nobody knows the old stream's creation time, so the worker records
    one that matches no stream. Restarted once the stream has grown past 8, it still holds."""
    replica = MessagesReplica()
    with pg.engine.begin() as tx:
        tx.execute(sa.text(OLD_DDL))
        replica.setup(tx)
        tx.execute(
            sa.text("INSERT INTO broker_checkpoints VALUES ('replica_messages', :p, 8)"),
            [{"p": p} for p in range(replica.partitions)],
        )
    await publish(js, 2, "a")
    with capture_logs() as logs:
        first = start(js, pg.url)
        assert await held(logs, 1)
        await first.close()
    assert next(e for e in logs if e["event"] == HELD)["stream_last_seq"] == 2

    await publish(js, 10, "b")
    with capture_logs() as logs:
        restarted = start(js, pg.url)
        assert await held(logs)
        assert restarted.runner.stats.applied == 0
        await restarted.close()
    row = await asyncio.to_thread(status, nats_url, pg.url)
    assert row["lag"] < 0
    assert "broker projections reset replica_messages" in row["problem"]

    rebuilt = await asyncio.wait_for(_reset(nats_url, pg.url, "replica_messages"), 60)
    assert rebuilt.applied == 12
    assert len(stored_subjects(pg.engine)) == 12


async def test_stores_record_replace_and_forget_the_identity(db: Db) -> None:
    """Recorded per projection, replaced when recorded again (also by two stores at once),
    read by the read-only reader, and forgotten by a reset with the checkpoints."""
    one, two = SqlCheckpointStore(db.engine), SqlCheckpointStore(db.engine)
    reader = SqlCheckpointReader(create_sql_engine(db.url, read_only=True))
    first, second = StreamIdentity("S", "2026-01-01T00:00:00+00:00"), StreamIdentity("S", "x")
    assert await one.stream_identity("p") is None
    await asyncio.gather(
        one.record_stream_identity("p", first), two.record_stream_identity("p", first)
    )
    await one.record_stream_identity("q", second)
    assert await two.stream_identity("p") == first
    assert await reader.stream_identity("p") == first
    await two.record_stream_identity("p", second)
    assert await one.stream_identity("p") == second
    await one.commit("p", {0: (0, 4)}, lambda tx: None)

    await one.reset("p", lambda tx: None)
    assert (await one.load("p"), await one.stream_identity("p")) == ({}, None)
    assert await one.stream_identity("q") == second
    await reader.close()


async def test_status_reports_a_stream_made_again_without_a_worker_running(
    js: JetStreamContext, pg: Db, start: Start
) -> None:
    """``progress`` (what status shows) compares the identities too, reading only."""
    first = start(js, pg.url)
    await publish(js, 3, "a")
    assert await first.applied_up_to(3)
    await first.close()
    await make_again(js)
    await publish(js, 7, "b")
    reader = SqlCheckpointReader(create_sql_engine(pg.url, read_only=True))
    done = await progress(js, MessagesReplica(), reader)
    assert (done.applied_seq, done.lag, done.ahead_of_stream, done.stream_replaced) == (
        3,
        -1,
        True,
        True,
    )
    await reader.close()
