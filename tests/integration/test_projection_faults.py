"""The projection runtime under faults, against real NATS, PostgreSQL and SQLite: a value
the database refuses goes to the DLQ, a database that refuses every write holds the batch,
a dead letter is never blocked by the event's own headers or size, the lag gauge follows a
stalled runner, and JSON text that only looks like U+0000 is stored."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import string
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
import typer
from prometheus_client import REGISTRY

from broker.embedded import NatsServer, ServerSpec
from broker.publisher import Publisher
from broker.reader import read_messages
from broker.settings import Settings
from broker.streams import Stream, provision
from projections.base import Event
from projections.checkpoints import SqlCheckpointStore, create_sql_engine
from projections.replica import MessagesReplica, RoutesReplica
from projections.runtime import DLQ_STUB, ProjectionRunner
from tests._wait import await_until
from tests.integration._counting import CountingProjection, applied, counts
from tests.integration.conftest import ReplicaDb as Db
from tests.integration.conftest import replica_db

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """A SQLite file, or a fresh schema of the PostgreSQL on this machine."""
    with replica_db(request.param, "faults", tmp_path) as found:
        yield found


@pytest.fixture
def pg() -> Iterator[Db]:
    with replica_db("postgresql", "faults") as found:
        yield found


def setup(engine: sa.Engine, projection: Any) -> None:
    with engine.begin() as tx:
        projection.setup(tx)


async def run_until(runner: ProjectionRunner, seq: int, timeout: float = 30) -> bool:
    """Run ``runner`` until it has applied (or dead-lettered) up to ``seq``; then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))

    async def reached() -> bool:
        return runner.stats.last_seq >= seq

    try:
        return await await_until(reached, timeout=timeout)
    finally:
        stop.set()
        await task


async def dead_letters(publisher: Publisher) -> list[Any]:
    return [m async for m in read_messages(publisher.js, Stream.DLQ)]


# --- whose fault a database error is ---------------------------------------------------------


async def test_an_event_postgresql_cannot_index_goes_to_dlq_and_the_rest_applies(
    publisher: Publisher, pg: Db
) -> None:
    """A ~3,400-byte subject is too large for the btree index on replica_messages.subject
    (SQLSTATE 54000, an OperationalError): the event is at fault, not the database, so it is
    dead-lettered and the events after it are applied instead of waiting behind it for ever."""
    rnd = random.Random(1)
    long_subject = "msg.t1." + ".".join(
        "".join(rnd.choices(string.ascii_letters + string.digits, k=60)) for _ in range(55)
    )
    replica = MessagesReplica()
    setup(pg.engine, replica)
    js = publisher.js
    json_type = {"Content-Type": "application/json"}
    await js.publish("msg.t1.before", b'{"a": 1}', headers=json_type)
    poison = await js.publish(long_subject, b'{"a": 2}', headers=json_type)
    last = await js.publish("msg.t1.after", b'{"a": 3}', headers=json_type)
    runner = ProjectionRunner(js, replica, SqlCheckpointStore(pg.engine), max_attempts=2)
    assert await run_until(runner, last.seq)
    with pg.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT subject FROM replica_messages ORDER BY seq")).all()
    assert [r[0] for r in stored] == ["before", "after"]
    dead = await dead_letters(publisher)
    assert [(m.headers or {})["Broker-Dlq-Seq"] for m in dead] == [str(poison.seq)]
    assert "index row size" in (dead[0].headers or {})["Broker-Dlq-Error"]


async def test_a_read_only_database_holds_the_batch_and_dead_letters_nothing(
    publisher: Publisher, nats_url: str, pg: Db
) -> None:
    """A standby after a failover refuses every write (SQLSTATE 25006, an InternalError):
    nothing is wrong with the events, so they wait for a writable database instead of going
    to the DLQ (from where a replay would store them a second time)."""
    setup(pg.engine, CountingProjection())
    store = SqlCheckpointStore(pg.engine)
    standby = {"on": True}

    @sa.event.listens_for(pg.engine, "begin")
    def _read_only(conn: sa.Connection) -> None:
        if standby["on"]:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    nc = await nats.connect(nats_url)
    acks = [await nc.jetstream().publish(f"msg.default.s{i}", b"{}") for i in range(3)]
    await nc.close()
    runner = ProjectionRunner(publisher.js, CountingProjection(), store, max_attempts=1)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))

    async def failing() -> bool:
        return runner.stats.errors >= 2

    try:
        assert await await_until(failing, timeout=20)
        assert (runner.stats.last_seq, runner.stats.dead_lettered) == (0, 0)
        standby["on"] = False  # promoted: writable again

        async def applied_all() -> bool:
            return runner.stats.last_seq >= acks[-1].seq

        assert await await_until(applied_all, timeout=20)
    finally:
        stop.set()
        await task
    assert runner.stats.dead_lettered == 0
    assert await dead_letters(publisher) == []
    assert counts(pg.engine) == (3, 3)


# --- dead letters the event's own headers or size cannot block -----------------------------


async def raw_publish(url: str, subject: str, header_block: bytes, payload: bytes) -> None:
    """Publish as any client may: header names nats-server accepts, nats-py would refuse."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO
    total = len(header_block) + len(payload)
    writer.write(
        b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
        + f"HPUB {subject} {len(header_block)} {total}\r\n".encode()
        + header_block
        + payload
        + b"\r\nPING\r\n"
    )
    await writer.drain()
    assert await reader.readline() == b"PONG\r\n"
    writer.close()
    await writer.wait_closed()


async def test_a_poison_event_with_a_header_name_nats_py_refuses_is_dead_lettered(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """``X/Trace`` is stored by nats-server but refused by nats-py on publish: copied into
    the dead letter, it made the DLQ publish fail and the runner fetch the event for ever."""
    setup(db.engine, CountingProjection())
    block = b"NATS/1.0\r\nX/Trace: 1\r\nContent-Type: text/plain\r\n\r\n"
    await raw_publish(nats_url, "msg.default.bad", block, b"poison")
    last = await publisher.js.publish("msg.default.good", b"{}")
    runner = ProjectionRunner(
        publisher.js, CountingProjection(), SqlCheckpointStore(db.engine), max_attempts=1
    )
    assert await run_until(runner, last.seq)
    assert counts(db.engine) == (1, 1)
    (dead,) = await dead_letters(publisher)
    headers = dead.headers or {}
    assert dead.data == b"poison"
    assert headers["Broker-Dlq-Seq"] == "1"
    assert headers["Content-Type"] == "text/plain"
    assert "X/Trace" not in headers
    assert DLQ_STUB not in headers


class PrefixPoison(CountingProjection):
    """Fails on every event whose payload starts with ``poison``."""

    def apply(self, batch: Sequence[Event], tx: sa.Connection) -> None:
        if any(e.data.startswith(b"poison") for e in batch):
            raise ValueError("poison event")
        super().apply(batch, tx)


async def test_an_event_too_large_for_its_dead_letter_goes_as_a_stub(tmp_path: Path) -> None:
    """An event near the server's max_payload has no room for the dead-letter headers: a stub
    (the error, the essential headers, no payload) goes to the DLQ and the projection moves
    on; `broker dlq replay` refuses the stub instead of appending an empty event."""
    from broker.cli_projections import _dlq_replay

    limit = 64 * 1024
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats", max_payload=limit)).start()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await provision(js, Settings())
        engine = create_sql_engine(f"sqlite:///{tmp_path}/replica.db")
        setup(engine, CountingProjection())
        headers = {"Content-Type": "application/octet-stream", "X-Note": "n" * 100}
        big = b"poison" + b"x" * (limit - 200)  # fits, its dead letter does not
        await js.publish("msg.default.big", big, headers=headers)
        last = await js.publish("msg.default.good", b"{}")
        runner = ProjectionRunner(js, PrefixPoison(), SqlCheckpointStore(engine), max_attempts=1)
        assert await run_until(runner, last.seq)
        assert counts(engine) == (1, 1)
        dead = [m async for m in read_messages(js, Stream.DLQ)]
        assert len(dead) == 1
        kept = dead[0].headers or {}
        assert dead[0].data in (b"", None)
        assert "max_payload" in kept[DLQ_STUB]
        assert kept["Broker-Dlq-Error"] == "poison event"
        assert (kept["Broker-Dlq-Seq"], kept["Broker-Dlq-Subject"]) == ("1", "msg.default.big")
        assert kept["Content-Type"] == "application/octet-stream"
        assert "X-Note" not in kept
        with pytest.raises(typer.BadParameter, match="holds no event"):
            await _dlq_replay(server.url, dead[0].metadata.sequence.stream)
        engine.dispose()
    finally:
        await nc.close()
        server.stop()


# --- the lag gauge ---------------------------------------------------------------------------


def gauge(projection: str) -> float | None:
    return REGISTRY.get_sample_value("broker_projection_lag_messages", {"projection": projection})


async def test_the_lag_gauge_follows_a_stalled_runner_and_clears_without_partitions(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """Set only after a batch that succeeded, the gauge froze at 0 while every batch failed
    and the backlog grew; it now follows the consumer on a timer, and a runner that owns no
    partition any more reports none."""
    name = f"test.lag_{uuid.uuid4().hex[:8]}"
    setup(db.engine, CountingProjection())
    owned = {"partitions": frozenset({0})}
    runner = ProjectionRunner(
        publisher.js,
        CountingProjection(name=name),
        SqlCheckpointStore(db.engine),
        owned=lambda: owned["partitions"],
        lag_every=0.1,
    )
    js = publisher.js
    first = [await js.publish(f"msg.default.a{i}", b"{}") for i in range(5)]
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))

    def lag_is(value: float) -> Any:
        async def check() -> bool:
            return gauge(name) == value

        return check

    try:

        async def caught_up() -> bool:
            return runner.stats.last_seq >= first[-1].seq

        assert await await_until(caught_up, timeout=20)
        assert await await_until(lag_is(0), timeout=10)
        with db.engine.begin() as tx:
            applied.drop(tx)  # every batch now fails: the store is not there
        for i in range(20):
            await js.publish(f"msg.default.b{i}", b"{}")
        assert await await_until(lag_is(20), timeout=20), gauge(name)
        assert runner.stats.last_seq == first[-1].seq  # nothing applied meanwhile
        owned["partitions"] = frozenset()  # another worker took the partition
        assert await await_until(lag_is(0), timeout=10), gauge(name)
    finally:
        stop.set()
        await task


# --- the CLI ---------------------------------------------------------------------------------


def test_reset_of_a_projection_whose_stream_is_empty_rebuilds_from_0_events(
    publisher: Publisher, nats_url: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "projections",
            "reset",
            "replica_routes",
            "--yes",
            "--nats-url",
            nats_url,
            "--replica-url",
            f"sqlite:///{tmp_path}/replica.db",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "replica_routes: rebuilt from 0 events" in done.stdout
    assert "Traceback" not in done.stderr


async def test_an_interrupted_reset_says_how_far_it_got_and_leaves_no_consumer(
    publisher: Publisher, nats_url: str, tmp_path: Path
) -> None:
    """Ctrl-C during a rebuild: it stops at a batch boundary, says how far it got (exit
    130, no traceback), removes its consumer, and the replica holds exactly the events its
    checkpoints say: what the workers go on from."""
    total = 40_000
    js = publisher.js
    for start in range(0, total, 2_000):
        acks = [
            await js.publish_async(f"msg.default.r{i % 7}", b'{"n": %d}' % i)
            for i in range(start, start + 2_000)
        ]
        await asyncio.gather(*acks)
    url = f"sqlite:///{tmp_path}/replica.db"
    command = [sys.executable, "-m", "broker", "projections", "reset", "replica_messages"]
    reset = await asyncio.create_subprocess_exec(
        *command,
        *("--yes", "--nats-url", nats_url, "--replica-url", url),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    engine = create_sql_engine(url)

    def applied_seq() -> int:
        try:
            with engine.connect() as conn:
                query = "SELECT max(seq) FROM broker_checkpoints WHERE projection = :p"
                return int(conn.execute(sa.text(query), {"p": "replica_messages"}).scalar() or 0)
        except sa.exc.OperationalError:  # not made yet
            return 0

    async def rebuilding() -> bool:
        return await asyncio.to_thread(applied_seq) > 0

    try:
        assert await await_until(rebuilding, timeout=60, interval=0.02)
        reset.send_signal(signal.SIGINT)
        _, said_on_stderr = await asyncio.wait_for(reset.communicate(), 60)
    finally:
        if reset.returncode is None:
            reset.kill()
    stderr = said_on_stderr.decode()
    assert reset.returncode == 130, stderr
    assert "Traceback" not in stderr
    said = re.search(r"interrupted after (\d+) events, at seq (\d+) of (\d+)", stderr)
    assert said is not None, stderr
    events, seq, of = (int(n) for n in said.groups())
    assert of == total
    assert 0 < seq < total
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*), max(seq) FROM replica_messages")).one()
    engine.dispose()
    assert tuple(rows) == (events, seq)
    assert applied_seq() == seq
    consumers = [c.name for c in await js.consumers_info(Stream.MESSAGES)]
    assert not [name for name in consumers if name.endswith("_reset")], consumers


# --- JSON text that only looks like U+0000 -------------------------------------------------


def test_json_with_a_literal_backslash_u0000_is_stored_as_is(db: Db) -> None:
    """``{"pattern": "\\\\u0000"}`` holds a backslash and ``u0000``, no U+0000: both replicas
    store it; a real U+0000 is still refused (messages) or left undecoded (routes)."""
    text = b'{"pattern": "\\\\u0000"}'
    nul = b'{"pattern": "\\u0000"}'
    json_type = {"Content-Type": "application/json"}
    messages, routes = MessagesReplica(), RoutesReplica()
    batch = [
        Event("MESSAGES", 1, "msg.t1.code", None, json_type, text),
        Event("MESSAGES", 2, "msg.t1.nul", None, json_type, nul),
    ]
    decided = [
        Event("ROUTES", 1, "route.t1.agent.decided", None, json_type, text),
        Event("ROUTES", 2, "route.t1.agent.decided", None, json_type, nul),
    ]
    with db.engine.begin() as tx:
        messages.setup(tx)
        routes.setup(tx)
        messages.apply(batch, tx)
        routes.apply(decided, tx)
    with db.engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT payload_json, decode_error FROM replica_messages ORDER BY seq")
        ).all()
        bodies = conn.execute(sa.text("SELECT body FROM replica_routes ORDER BY seq")).all()
    payloads = [as_json(r[0]) for r in stored]
    assert payloads[0] == {"pattern": "\\u0000"}
    assert stored[0][1] is None
    assert payloads[1] is None
    assert "U+0000" in stored[1][1]
    assert [as_json(r[0]) for r in bodies] == [{"pattern": "\\u0000"}, None]


def as_json(value: Any) -> Any:
    """A JSON column as read back: decoded by the driver (PostgreSQL) or text (SQLite)."""
    return json.loads(value) if isinstance(value, str) else value
