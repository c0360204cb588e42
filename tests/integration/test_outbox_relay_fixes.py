"""The outbox relay and the worker task that runs it, against real NATS, SQLite and
PostgreSQL: a relay batch holds about RELAY_BYTES of rows whatever their count, an event
over the server's max_payload goes as a stub instead of holding up the outbox, CHANGES
gets MESSAGES' replicas, and a relay that cannot start is restarted later each time
instead of in a tight loop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from nats.js.api import StreamConfig
from structlog.testing import capture_logs

from broker.embedded import NatsCluster, NatsServer, ServerSpec
from broker.reader import READ_BYTES, read_messages
from broker.settings import Settings
from broker.streams import provision
from projections.checkpoints import SqlCheckpointStore
from projections.outbox import CHANGES_STREAM, ensure_changes_stream, relay_once
from projections.replica import MessagesReplica, ensure_outbox, outbox
from projections.runtime import ProjectionRunner
from projections.worker import Worker, WorkerOptions
from tests._wait import await_until
from tests.integration.conftest import ReplicaDb, replica_db

pytestmark = pytest.mark.integration

#: What one relay batch holds at most: as many bytes as a projection's batch, 500 rows.
RELAY_BYTES = READ_BYTES
RELAY_ROWS = 500


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplicaDb]:
    with replica_db(request.param, "outbox", tmp_path) as found:
        yield found


def fill_outbox(engine: sa.Engine, count: int, after: dict[str, Any]) -> None:
    """``count`` change rows of replica_messages, source seqs 1..count, each ``after``."""
    with engine.begin() as tx:
        ensure_outbox(tx)
    rows = [
        {
            "projection": "replica_messages",
            "table_name": "replica_messages",
            "op": "c",
            "key": {"seq": seq},
            "before": None,
            "after": {**after, "seq": seq},
            "source_stream": "MESSAGES",
            "source_seq": seq,
        }
        for seq in range(1, count + 1)
    ]
    for start in range(0, count, 50):
        with engine.begin() as tx:
            tx.execute(outbox.insert(), rows[start : start + 50])


async def changes(js: Any) -> list[dict[str, Any]]:
    return [json.loads(m.data) async for m in read_messages(js, CHANGES_STREAM)]


async def test_a_relay_batch_holds_about_relay_bytes_of_rows(nats_url: str, db: ReplicaDb) -> None:
    """Rows of ~1 MB each: one relay takes no more than fit in RELAY_BYTES (it took 500
    whatever their size: 3.8 GB at ~0.7 MB a row), and the relays after it take the rest in
    order."""
    row_bytes = 1_000_000
    fill_outbox(db.engine, 20, {"payload_json": "x" * row_bytes})
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        await ensure_changes_stream(js)
        first = await relay_once(js, db.engine)
        assert 1 <= first <= RELAY_BYTES // row_bytes
        relayed = [first]
        while sent := await relay_once(js, db.engine):
            assert sent <= RELAY_BYTES // row_bytes
            relayed.append(sent)
        assert sum(relayed) == 20
        events = await changes(js)
        assert [e["source"]["seq"] for e in events] == list(range(1, 21))
        assert all(len(e["after"]["payload_json"]) == row_bytes for e in events)
    finally:
        await nc.close()


async def test_small_rows_are_relayed_up_to_relay_rows_at_a_time(
    nats_url: str, db: ReplicaDb
) -> None:
    fill_outbox(db.engine, RELAY_ROWS + 100, {"payload_json": {"n": 1}})
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        await ensure_changes_stream(js)
        assert await relay_once(js, db.engine) == RELAY_ROWS
        assert await relay_once(js, db.engine) == 100
        assert await relay_once(js, db.engine) == 0
        assert [e["source"]["seq"] for e in await changes(js)] == list(range(1, RELAY_ROWS + 101))
    finally:
        await nc.close()


async def test_a_change_event_over_max_payload_goes_as_a_stub(tmp_path: Path) -> None:
    """A 400 KB JSON message of 1e15s is 1.7 MB once the replica re-encodes it (as
    1000000000000000.0): its change event is over the server's 1 MiB max_payload, which
    refused it on every relay and held every later change behind it. It goes as a stub
    (what changed, no row data), logged, and the change after it follows."""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats", max_payload=1024 * 1024))
    server.start()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream(timeout=10)
        await provision(js, Settings())
        json_type = {"Content-Type": "application/json"}
        body = b"[" + b",".join([b"1e15"] * 90_000) + b"]"
        big = await js.publish("msg.default.big", body, headers=json_type)
        small = await js.publish("msg.default.small", b'{"a": 1}', headers=json_type)

        with replica_db("sqlite", "stub", tmp_path) as db:
            replica = MessagesReplica(changes=True)
            with db.engine.begin() as tx:
                replica.setup(tx)
            runner = ProjectionRunner(js, replica, SqlCheckpointStore(db.engine))
            stop = asyncio.Event()
            task = asyncio.create_task(runner.run(stop))

            async def applied() -> bool:
                return runner.stats.last_seq >= small.seq

            try:
                assert await await_until(applied, timeout=30)
            finally:
                stop.set()
                await task
            await ensure_changes_stream(js)
            with capture_logs() as logs:
                assert await relay_once(js, db.engine) == 2
            with db.engine.connect() as conn:
                left = conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar()
            assert left == 0

        stub, after = [m async for m in read_messages(js, CHANGES_STREAM)]
        event = json.loads(stub.data)
        assert {k: v for k, v in event.items() if k != "stub"} == {
            "op": "c",
            "table": "replica_messages",
            "key": {"seq": big.seq},
            "source": {"stream": "MESSAGES", "seq": big.seq},
        }
        assert "max_payload of 1048576" in event["stub"]
        assert (stub.headers or {})["Broker-Cdc-Stub"] == event["stub"]
        assert json.loads(after.data)["after"]["payload_json"] == {"a": 1}
        (logged,) = [e for e in logs if e["event"] == "outbox_event_stubbed"]
        assert (logged["source_seq"], logged["max_payload"]) == (big.seq, 1024 * 1024)
    finally:
        await nc.close()
        server.stop()


async def test_changes_gets_as_many_replicas_as_messages(nats_cluster: NatsCluster) -> None:
    """On an R3 cluster CHANGES is R3 too (it was R1: change events lost with one node)."""
    nc = await nats.connect([node.url for node in nats_cluster.nodes])
    try:
        js = nc.jetstream(timeout=20)
        await provision(js, Settings(stream_replicas=3))
        await ensure_changes_stream(js)
        info = await js.stream_info(CHANGES_STREAM)
        assert info.config.num_replicas == 3
    finally:
        await nc.close()


async def test_a_relay_that_cannot_start_is_restarted_later_each_time(
    nats_url: str, tmp_path: Path
) -> None:
    """Another stream takes cdc.>, so the relay cannot create CHANGES and ends at once. The
    worker restarted it at once, in a loop (5,500 restarts in 5 s); now it waits 0.5 s, then
    1 s, then 2 s... and says so."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await provision(js, Settings())
    await js.add_stream(StreamConfig(name="OTHER_CDC", subjects=["cdc.>"]))
    await nc.close()
    options = WorkerOptions(
        nats_urls=[nats_url],
        replica_url=f"sqlite:///{tmp_path / 'replica.db'}",
        projections=[MessagesReplica(changes=True)],
        worker_id="w1",
        changes=True,
    )
    worker = Worker(options)
    with capture_logs() as logs:
        started = time.monotonic()
        running = asyncio.create_task(worker.run())

        def ended() -> list[MutableMapping[str, Any]]:
            return [e for e in logs if e["event"] == "worker_task_ended"]

        async def ended_three_times() -> bool:
            return len(ended()) >= 3 or running.done()

        try:
            assert await await_until(ended_three_times, timeout=30)
            elapsed = time.monotonic() - started
        finally:
            worker.stop()
            await running
    assert elapsed >= 0.5 + 1.0  # the third end came after two waits
    first = ended()[:3]
    assert [e["task"] for e in first] == ["outbox"] * 3
    assert [e["restart_in"] for e in first] == [0.5, 1.0, 2.0]
    assert "subjects overlap" in first[0]["error"]


async def test_a_failed_relay_is_logged_by_its_error_not_its_statement(
    nats_url: str, tmp_path: Path
) -> None:
    """A relay the database refuses (here: no outbox table) logs the error's type and the
    database's own message, not SQLAlchemy's text with the statement and its bound
    parameters (the projections' rule: docs/sensitive-data.md)."""
    from projections.outbox import relay_outbox

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    nc = await nats.connect(nats_url)
    try:
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(relay_outbox(nc.jetstream(), engine, stop))

            async def failed() -> bool:
                return any(e["event"] == "outbox_relay_failed" for e in logs)

            assert await await_until(failed, timeout=10)
            stop.set()
            await task
    finally:
        await nc.close()
        engine.dispose()
    failed = next(e for e in logs if e["event"] == "outbox_relay_failed")
    assert failed["error_type"].startswith("OperationalError (sqlite3.OperationalError)")
    assert "no such table" in failed["error"]
    assert "[SQL:" not in failed["error"]
    assert "SELECT" not in failed["error"]


async def test_a_row_with_an_integer_past_64_bits_is_relayed_not_retried_forever(
    nats_url: str, db: ReplicaDb
) -> None:
    """A payload's integer past 64 bits, kept with every digit in the replica (or a float an
    earlier release wrote, which PostgreSQL's jsonb gives back as such an integer), is read
    back from the outbox as a Python int, which orjson refuses: the relay failed on that row
    at every poll and CHANGES got nothing more. It is relayed with every digit, and the rows
    after it follow."""
    import orjson

    big = 123456789012345678901234567890
    fill_outbox(db.engine, 1, {"payload_json": {"big": orjson.Fragment(str(big).encode())}})
    with db.engine.begin() as tx:  # a second, ordinary row behind it
        tx.execute(
            outbox.insert(),
            [
                {
                    "projection": "replica_messages",
                    "table_name": "replica_messages",
                    "op": "c",
                    "key": {"seq": 2},
                    "before": None,
                    "after": {"payload_json": {"n": 1}, "seq": 2},
                    "source_stream": "MESSAGES",
                    "source_seq": 2,
                }
            ],
        )
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        await ensure_changes_stream(js)
        assert await relay_once(js, db.engine) == 2
        events = await changes(js)
        assert [e["source"]["seq"] for e in events] == [1, 2]
        assert events[0]["after"]["payload_json"]["big"] == big
    finally:
        await nc.close()
