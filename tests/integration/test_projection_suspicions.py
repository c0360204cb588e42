"""Projection runtime edge cases against real NATS, SQLite and PostgreSQL: worker ids that
differ only by ``-``/``_``, a stream deleted and made again under its checkpoints, and
``broker projections status`` on a database it may only read."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from broker.cli_projections import _reset
from broker.publisher import Publisher
from broker.settings import Settings
from broker.streams import Stream, provision
from projections.checkpoints import SqlCheckpointStore, create_sql_engine
from projections.replica import MessagesReplica
from projections.runtime import ProjectionRunner, progress
from projections.worker import Worker, WorkerOptions
from tests._wait import await_until
from tests.integration._counting import CountingProjection, counts
from tests.integration.conftest import PG, postgres_schema, replica_url

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def publish(nats_url: str, n: int, tag: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for i in range(n):
        await js.publish(f"msg.default.{tag}{i % 8}", b'{"i": %d}' % i)
    await nc.close()


def status(nats_url: str, url: str, timeout: float = 20) -> dict[str, Any]:
    """`broker projections status -o json`'s row of replica_messages (fails on an error)."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "broker", "projections", "status"),
            *("--nats-url", nats_url, "--replica-url", url, "-o", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["projection"]: r for r in json.loads(done.stdout)}
    return rows["replica_messages"]


async def test_workers_w_dash_1_and_w_underscore_1_keep_a_consumer_each(
    publisher: Publisher, nats_url: str, tmp_path: Path
) -> None:
    """`w-1` and `w_1` hold separate leases, so they need separate consumers: with one
    shared name each deleted the other's consumer on every subscribe (delivery gaps)."""
    url = f"sqlite:///{tmp_path}/replica.db"
    workers = [
        Worker(
            WorkerOptions(
                nats_urls=[nats_url],
                replica_url=url,
                projections=[CountingProjection(2, worker_id)],
                worker_id=worker_id,
                batch=50,
                lease_ttl=2.0,
            )
        )
        for worker_id in ("w-1", "w_1")
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]

    async def one_consumer_each() -> bool:
        names = {c.name for c in await publisher.js.consumers_info(Stream.MESSAGES)}
        owned = [w.running and w.running[0].leases.owned() for w in workers]
        return all(owned) and names == {"proj_test_counting_w-1", "proj_test_counting_w_1"}

    try:
        assert await await_until(one_consumer_each, timeout=30)
        await publish(nats_url, 400, "s")
        engine = create_sql_engine(url)

        async def all_applied() -> bool:
            return counts(engine)[1] >= 400

        assert await await_until(all_applied, timeout=60)
        assert counts(engine) == (400, 400)
        assert [w.running[0].runner.stats.gaps for w in workers] == [0, 0]
        engine.dispose()
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)


async def test_a_stream_made_again_under_its_checkpoints_is_reported_and_held_until_reset(
    publisher: Publisher, nats_url: str, tmp_path: Path
) -> None:
    """MESSAGES deleted and made again restarts at seq 1, under replica_messages' checkpoint
    (5): the runner logs an error and applies nothing -- also once the stream grows past 5
    -- and status shows a negative lag with the way out, until `projections reset`."""
    url = f"sqlite:///{tmp_path}/replica.db"
    engine = create_sql_engine(url)
    projection = MessagesReplica()
    with engine.begin() as tx:
        projection.setup(tx)
    store = SqlCheckpointStore(engine)
    runner = ProjectionRunner(publisher.js, projection, store, batch=100, lag_every=0.1)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(runner.run(stop))
        await publish(nats_url, 5, "a")

        async def applied_5() -> bool:
            return runner.stats.last_seq == 5

        assert await await_until(applied_5, timeout=20)
        await publisher.js.delete_stream(Stream.MESSAGES)
        await provision(publisher.js, Settings())
        await publish(nats_url, 2, "b")

        def reports() -> int:
            return sum(e["event"] == "projection_checkpoint_ahead_of_stream" for e in logs)

        async def reported() -> bool:
            return reports() > 0

        assert await await_until(reported, timeout=20)
        row = status(nats_url, url)
        assert (row["applied_seq"], row["lag"]) == (5, -3)
        assert "broker projections reset replica_messages" in row["problem"]
        # The stream grows past the old checkpoint: still held, the first 5 never skipped.
        await publish(nats_url, 5, "c")
        seen = reports()

        async def checked_again() -> bool:
            return reports() > seen + 1

        assert await await_until(checked_again, timeout=20)
        assert runner.stats.applied == 5
        assert (await runner.lag()) < 0
        stop.set()
        await task
    report = next(e for e in logs if e["event"] == "projection_checkpoint_ahead_of_stream")
    assert report["log_level"] == "error"
    assert (report["checkpoint"], report["stream_last_seq"]) == (5, 2)
    await store.close()

    rebuilt = await asyncio.wait_for(_reset(nats_url, url, "replica_messages"), 60)
    assert rebuilt.applied == 7
    assert (await progress(publisher.js, projection, SqlCheckpointStore(engine))).lag == 0
    row = status(nats_url, url)
    assert (row["applied_seq"], row["lag"], row["problem"]) == (7, 0, "")
    engine.dispose()


@pytest.fixture
def read_only_url() -> Iterator[str]:
    """A PostgreSQL URL of a role that may only read a fresh (empty) schema."""
    role = f"ro_{uuid.uuid4().hex[:10]}"
    admin = create_sql_engine(PG)
    with postgres_schema("ro") as schema:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
            conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}'))
            grant = f"GRANT SELECT ON TABLES TO {role}"
            conn.execute(sa.text(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" {grant}'))
        try:
            yield replica_url(schema).replace("postgres@", f"{role}@", 1)
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f"DROP OWNED BY {role}"))
                conn.execute(sa.text(f"DROP ROLE {role}"))
            admin.dispose()


async def test_status_needs_only_a_read_only_postgresql_role(
    publisher: Publisher, nats_url: str, read_only_url: str
) -> None:
    """No `broker_checkpoints` yet and no right to create it: nothing applied, lag = all."""
    await publish(nats_url, 3, "a")
    row = await asyncio.to_thread(status, nats_url, read_only_url)
    assert (row["applied_seq"], row["lag"]) == (0, 3)


async def test_status_reads_sqlite_read_only_and_past_a_writer(
    publisher: Publisher, nats_url: str, tmp_path: Path
) -> None:
    """A SQLite file opened read-only (no table yet), and a writable one whose writer holds
    its transaction: status reads both at once (it took the write lock before, and waited
    30 s for it)."""
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE other (a)").connection.commit()
    read_only = f"sqlite:///file:{tmp_path}/empty.db?mode=ro&uri=true"
    row = await asyncio.to_thread(status, nats_url, read_only)
    assert (row["applied_seq"], row["lag"]) == (0, 0)

    SqlCheckpointStore(create_sql_engine(f"sqlite:///{tmp_path}/busy.db")).engine.dispose()
    writer = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO broker_checkpoints VALUES ('replica_messages', 0, 9)")
    try:
        row = await asyncio.to_thread(status, nats_url, f"sqlite:///{tmp_path}/busy.db", 20)
        assert (row["applied_seq"], row["lag"]) == (0, 0)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
