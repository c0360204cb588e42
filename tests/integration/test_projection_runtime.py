"""The projection runtime against real NATS and SQLite: exactly once through SIGKILL at
every gap, poison events to DLQ, partitions split across worker processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nats
import pytest
import sqlalchemy as sa
from nats.aio.msg import Msg

from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.reader import read_messages
from broker.streams import Stream
from broker.telemetry import metrics
from projections.checkpoints import SqlCheckpointStore, create_sql_engine
from projections.runtime import CRASH_ENV, ProjectionRunner
from tests._wait import await_until, wait_for
from tests.integration._counting import CountingProjection, applied, counts
from tests.integration.conftest import replica_db

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def publish(
    nats_url: str, n: int, *, subjects: int = 1, poison: set[int] | None = None
) -> None:
    nc = await nats.connect(nats_url, connect_timeout=10)
    js = nc.jetstream(timeout=30)
    acks = [
        await js.publish_async(
            f"msg.default.s{i % subjects}",
            b"poison" if poison and i in poison else b'{"i": %d}' % i,
        )
        for i in range(n)
    ]
    await asyncio.gather(*acks)
    await nc.close()


def reached(runner: ProjectionRunner, seq: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return runner.stats.last_seq >= seq

    return check


def start_worker(
    nats_url: str, db: Db, worker: str, partitions: int, **env: str
) -> subprocess.Popen[bytes]:
    """A worker process running the counting projection; its log goes to a file (an unread
    pipe would block a chatty worker)."""
    log = (db.logs / f"worker-{worker}.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration._counting",
            nats_url,
            db.url,
            worker,
            str(partitions),
            "2",
        ],
        cwd=ROOT,
        env={**os.environ, "BROKER_LOG_LEVEL": "info", **env},
        stdout=log,
        stderr=log,
    )


class Db(NamedTuple):
    url: str
    engine: sa.Engine
    logs: Path


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """The counting projection's database: a SQLite file, or a fresh schema in the
    PostgreSQL server on this machine (dropped afterwards, also when the test fails;
    unreachable = failure: :func:`~tests.integration.conftest.replica_db`)."""
    with replica_db(request.param, "t", tmp_path) as replica:
        with replica.engine.begin() as tx:
            CountingProjection().setup(tx)
        yield Db(replica.url, replica.engine, tmp_path)


async def test_batches_apply_once_and_the_checkpoint_follows(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    engine = db.engine
    await publish(nats_url, 1000, subjects=7)
    store = SqlCheckpointStore(engine)
    projection = CountingProjection(partitions=4)
    runner = ProjectionRunner(publisher.js, projection, store, batch=128)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    assert await await_until(reached(runner, 1000), timeout=20)
    stop.set()
    await task
    assert counts(engine) == (1000, 1000)
    assert await store.load(projection.name) == dict.fromkeys(range(4), 1000)
    # A second runner from the same checkpoints applies nothing again.
    again = ProjectionRunner(publisher.js, projection, store, worker="1", batch=128)
    stop = asyncio.Event()
    task = asyncio.create_task(again.run(stop))
    await publish(nats_url, 10)
    assert await await_until(reached(again, 1010), timeout=20)
    stop.set()
    await task
    assert counts(engine) == (1010, 1010)


class LosingRunner(ProjectionRunner):
    """Loses the first delivery of its second batch, as a reply lost in the network would."""

    lost: int | None = None

    async def _fetch(self, sub: Any) -> list[Msg]:
        messages = await super()._fetch(sub)
        if messages and self.lost is None and self.stats.batches == 1:
            self.lost = messages[0].metadata.sequence.stream
            return messages[1:]
        return messages


async def test_a_delivery_that_never_arrives_is_applied_after_a_restart_not_skipped(
    publisher: Publisher, nats_url: str, tmp_path: Path
) -> None:
    """Found by the fault suite (a paused stream leader): acking past a lost delivery with
    AckPolicy.ALL would skip it for good. The runner sees the gap in the consumer sequence
    and starts again from its checkpoint."""
    engine = create_sql_engine(f"sqlite:///{tmp_path}/replica.db")
    with engine.begin() as tx:
        CountingProjection().setup(tx)
    await publish(nats_url, 100, subjects=3)
    store = SqlCheckpointStore(engine)
    runner = LosingRunner(publisher.js, CountingProjection(partitions=2), store, batch=10)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    assert await await_until(reached(runner, 100), timeout=20)
    stop.set()
    await task
    assert runner.lost is not None
    assert runner.stats.gaps == 1
    assert counts(engine) == (100, 100)  # the lost one included, nothing twice
    engine.dispose()


@pytest.mark.parametrize("crash_at", ["before_commit:3", "after_commit:3"])
async def test_sigkill_between_steps_loses_and_duplicates_nothing(
    publisher: Publisher, nats_url: str, db: Db, crash_at: str
) -> None:
    engine = db.engine
    await publish(nats_url, 2000, subjects=5)
    crashing = start_worker(nats_url, db, "w1", 4, **{CRASH_ENV: crash_at})
    assert crashing.wait(timeout=60) == -signal.SIGKILL
    rows, _ = counts(engine)
    assert 0 < rows < 2000  # it died part-way
    survivor = start_worker(nats_url, db, "w1", 4)
    try:
        assert wait_for(lambda: counts(engine)[0] >= 2000, timeout=60)
        await publish(nats_url, 100, subjects=5)
        assert wait_for(lambda: counts(engine)[0] >= 2100, timeout=60)
    finally:
        survivor.terminate()
        survivor.wait(timeout=20)
    assert counts(engine) == (2100, 2100)  # 0 lost, 0 duplicated


async def test_a_poison_event_goes_to_dlq_and_the_rest_applies(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    engine = db.engine
    await publish(nats_url, 10, poison={4})
    store = SqlCheckpointStore(engine)
    runner = ProjectionRunner(publisher.js, CountingProjection(), store, max_attempts=2)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    assert await await_until(reached(runner, 10), timeout=20)
    stop.set()
    await task
    assert counts(engine) == (9, 9)
    dead = [m async for m in read_messages(publisher.js, Stream.DLQ)]
    assert len(dead) == 1
    headers = dead[0].headers or {}
    assert headers["Broker-Dlq-Seq"] == "5"
    assert headers["Broker-Dlq-Error"] == "poison event"
    assert dead[0].data == b"poison"
    assert await store.load("test.counting") == {0: 10}


def balanced(nats_url: str, expected: dict[str, int]) -> Callable[[], Awaitable[bool]]:
    """Whether the live leases of the counting projection are held as ``expected``."""

    async def check() -> bool:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value("projection_leases")
            held: dict[str, int] = {}
            for key in await kv.keys():
                if key.startswith("test_counting.lease."):
                    entry = await kv.get(key)
                    owner = (entry.value or b"").decode()
                    held[owner] = held.get(owner, 0) + 1
            return held == expected
        except Exception:
            return False
        finally:
            await nc.close()

    return check


def _owners(engine: sa.Engine) -> set[str]:
    from tests.integration._counting import applied

    with engine.connect() as conn:
        return {r[0] for r in conn.execute(sa.select(applied.c.worker).distinct())}


async def test_three_workers_split_partitions_and_converge_after_one_dies(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    engine = db.engine
    workers = {w: start_worker(nats_url, db, w, 6) for w in ("a", "b", "c")}
    try:
        assert await await_until(balanced(nats_url, {"a": 2, "b": 2, "c": 2}), timeout=30)
        await publish(nats_url, 600, subjects=24)
        assert wait_for(lambda: counts(engine)[0] >= 600, timeout=60)
        assert _owners(engine) == {"a", "b", "c"}  # every worker applied a share
        workers["c"].send_signal(signal.SIGKILL)
        workers["c"].wait(timeout=10)
        assert await await_until(balanced(nats_url, {"a": 3, "b": 3}), timeout=30)
        await publish(nats_url, 600, subjects=24)
        # c's partitions expire (lease TTL 2 s) and move to a and b.
        assert wait_for(lambda: counts(engine)[0] >= 1200, timeout=60), counts(engine)
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)
    assert counts(engine) == (1200, 1200)


async def test_dead_letters_are_listed_and_replayed_from_the_cli(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """`broker dlq list` shows the poison event; `broker dlq replay` appends it again."""
    await _poison_once(publisher, nats_url, db)
    cli = [sys.executable, "-m", "broker", "dlq"]
    listed = await asyncio.to_thread(
        subprocess.run,
        [*cli, "list", "--nats-url", nats_url, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert (entry["projection"], entry["seq"], entry["error"]) == (
        "test.counting",
        2,
        "poison event",
    )
    replayed = await asyncio.to_thread(
        subprocess.run,
        [*cli, "replay", str(entry["dlq_seq"]), "--nats-url", nats_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == "replayed as seq 4"
    missing = await asyncio.to_thread(
        subprocess.run,
        [*cli, "replay", "999", "--nats-url", nats_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert missing.returncode == 2
    assert "no DLQ message 999" in missing.stderr
    assert "Traceback" not in missing.stderr
    again = await publisher.js.get_msg("MESSAGES", 4)
    assert again.data == b"poison"
    assert (again.headers or {})["Broker-Replayed-From-Dlq"] == str(entry["dlq_seq"])


async def _poison_once(publisher: Publisher, nats_url: str, db: Db) -> None:
    await publish(nats_url, 3, poison={1})
    runner = ProjectionRunner(
        publisher.js, CountingProjection(), SqlCheckpointStore(db.engine), max_attempts=1
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    assert await await_until(reached(runner, 3), timeout=20)
    stop.set()
    await task


async def test_replica_changes_reach_the_changes_stream_once(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """With change events on, each inserted replica row becomes one `c` event in CHANGES,
    relayed from the outbox; relaying again publishes nothing new."""
    from projections.outbox import CHANGES_STREAM, ensure_changes_stream, relay_once
    from projections.replica import MessagesReplica

    await publish(nats_url, 5, subjects=2)
    projection = MessagesReplica(changes=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    runner = ProjectionRunner(publisher.js, projection, SqlCheckpointStore(db.engine))
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    assert await await_until(reached(runner, 5), timeout=20)
    stop.set()
    await task
    await ensure_changes_stream(publisher.js)
    assert await relay_once(publisher.js, db.engine) == 5
    assert await relay_once(publisher.js, db.engine) == 0
    events = [json.loads(m.data) async for m in read_messages(publisher.js, CHANGES_STREAM)]
    assert [(e["op"], e["table"], e["source"]["seq"]) for e in events] == [
        ("c", "replica_messages", seq) for seq in range(1, 6)
    ]
    assert (events[0]["after"]["seq"], events[0]["after"]["subject"]) == (1, "s0")


async def test_changes_relayed_one_at_a_time_each_reach_the_changes_stream(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """The relay empties the outbox after each change: SQLite then hands the next row the id 1
    again, which must not make JetStream drop that change as a duplicate."""
    from projections.outbox import CHANGES_STREAM, ensure_changes_stream, relay_once
    from projections.replica import MessagesReplica

    projection = MessagesReplica(changes=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    await ensure_changes_stream(publisher.js)
    runner = ProjectionRunner(publisher.js, projection, SqlCheckpointStore(db.engine))
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        for seq in range(1, 4):
            await publish(nats_url, 1)
            assert await await_until(reached(runner, seq), timeout=20)
            assert await relay_once(publisher.js, db.engine) == 1
    finally:
        stop.set()
        await task
    events = [json.loads(m.data) async for m in read_messages(publisher.js, CHANGES_STREAM)]
    assert [e["source"]["seq"] for e in events] == [1, 2, 3]


async def test_a_missing_table_holds_the_batch_until_it_is_back(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """The projection's table is gone (dropped, or its privilege revoked): the events are not
    at fault, so they wait for it instead of going to the DLQ with the checkpoint past them."""
    with db.engine.begin() as tx:
        applied.drop(tx)
    await publish(nats_url, 3)
    runner = ProjectionRunner(
        publisher.js, CountingProjection(), SqlCheckpointStore(db.engine), max_attempts=1
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        assert await await_until(lambda: _true(runner.stats.errors >= 2), timeout=20)
        assert (runner.stats.last_seq, runner.stats.dead_lettered) == (0, 0)
        with db.engine.begin() as tx:
            CountingProjection().setup(tx)
        assert await await_until(reached(runner, 3), timeout=20)
    finally:
        stop.set()
        await task
    assert runner.stats.dead_lettered == 0
    assert counts(db.engine) == (3, 3)


async def _true(value: bool) -> bool:
    return value


async def test_messages_that_aged_out_are_no_lag_and_a_reset_over_them_ends(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """MESSAGES keeps messages for BROKER_MESSAGES_MAX_AGE_SECONDS: once those a projection
    had not applied are gone, its lag is 0 (nothing left to apply), and a rebuild over a
    stream that no longer holds them finishes instead of waiting for them."""
    from broker.cli_projections import _reset
    from projections.runtime import progress

    info = await publisher.js.stream_info(Stream.MESSAGES)
    config = info.config
    config.max_age = 1.0
    config.duplicate_window = 1.0
    await publisher.js.update_stream(config)
    await publish(nats_url, 5)

    async def aged_out() -> bool:
        return (await publisher.js.stream_info(Stream.MESSAGES)).state.messages == 0

    assert await await_until(aged_out, timeout=20)
    store = SqlCheckpointStore(db.engine)
    assert (await progress(publisher.js, CountingProjection(), store)).lag == 0
    await asyncio.wait_for(_reset(nats_url, db.url, "replica_messages"), 30)


async def test_large_messages_are_fetched_in_batches_bounded_by_bytes(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """By count alone, 1,024 messages near the 1 MiB limit overflow the client's buffer: a
    fetch asks for about BATCH_BYTES of payload, by the size of recent messages."""
    from projections.runtime import BATCH_BYTES

    big = b"x" * 600_000
    for n in range(30):
        await publisher.publish(Outbound(f"msg.default.big{n}", big, {}))
    runner = ProjectionRunner(publisher.js, CountingProjection(), SqlCheckpointStore(db.engine))
    sizes: list[int] = []
    process = runner.process

    async def counted(messages: Sequence[Msg], owned: frozenset[int]) -> None:
        sizes.append(len(messages))
        await process(messages, owned)

    runner.process = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        assert await await_until(reached(runner, 30), timeout=30)
    finally:
        stop.set()
        await task
    assert sum(sizes) == 30
    assert max(sizes) * len(big) <= BATCH_BYTES
    assert runner.stats.gaps == runner.stats.errors == 0
    assert counts(db.engine) == (30, 30)


class _Ticks:
    """Counts how often a task of its own gets the event loop."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)


class _Watching(CountingProjection):
    """Notes the loop's ticks at each single-event apply."""

    def __init__(self, ticks: _Ticks) -> None:
        super().__init__()
        self.ticks = ticks
        self.seen: list[int] = []

    def apply(self, batch: Sequence[Any], tx: sa.Connection) -> None:
        if len(batch) == 1:
            self.seen.append(self.ticks.count)
        super().apply(batch, tx)


async def test_the_loop_keeps_running_while_a_poisoned_batch_is_applied_one_by_one(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """After a batch is refused, its events are committed one at a time on the loop's own
    thread (the inline store); other tasks (the lease renewals) run between them, not only
    after the whole batch (a second or more for 1 024 events)."""
    await publish(nats_url, 50, poison={0})
    ticks = _Ticks()
    ticker = asyncio.create_task(ticks.run())
    projection = _Watching(ticks)
    runner = ProjectionRunner(
        publisher.js, projection, SqlCheckpointStore(db.engine), batch=100, max_attempts=1
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        assert await await_until(reached(runner, 50), timeout=20)
    finally:
        stop.set()
        await task
        ticker.cancel()
    assert counts(db.engine) == (49, 49)
    singles = projection.seen
    assert len(singles) >= 5, singles  # the poison leads the first batch fetched
    assert all(b > a for a, b in itertools.pairwise(singles)), singles


async def test_an_event_dead_lettered_again_after_a_crash_is_counted_once(
    publisher: Publisher, db: Db
) -> None:
    """A worker killed after dead-lettering an event and before its commit meets the event
    again: JetStream drops the second dead letter as a duplicate, and the count (the
    worker's and ``broker_dlq_messages_total``) stays at the one the DLQ holds."""
    from projections.base import Event

    runner = ProjectionRunner(publisher.js, CountingProjection(), SqlCheckpointStore(db.engine))
    event = Event("MESSAGES", 7, "msg.default.s0", None, {}, b"poison")
    before = metrics.render().decode()
    for _ in range(2):
        await runner._dead_letter(event, ValueError("poison event"))
    dead = [m async for m in read_messages(publisher.js, Stream.DLQ)]
    assert len(dead) == 1
    assert runner.stats.dead_lettered == 1
    assert _dlq_count(metrics.render().decode()) - _dlq_count(before) == 1


def _dlq_count(page: str) -> float:
    line = 'broker_dlq_messages_total{source="test.counting"}'
    found = [row for row in page.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


async def test_a_runner_deletes_its_consumer_when_it_stops_or_owns_nothing(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """Left to its 5-minute inactivity threshold, a stopped worker's consumer lingered, and
    ``broker status`` showed its unread backlog as a lag growing with the stream."""
    await publish(nats_url, 10)
    projection = CountingProjection(partitions=4)
    owned = {"partitions": frozenset(range(4))}
    runner = ProjectionRunner(
        publisher.js,
        projection,
        SqlCheckpointStore(db.engine),
        owned=lambda: owned["partitions"],
        worker="gone",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    assert await await_until(reached(runner, 10), timeout=20)

    async def consumers() -> set[str]:
        infos = await publisher.js.consumers_info(projection.stream)
        return {info.name for info in infos}

    assert runner.consumer_name in await consumers()
    owned["partitions"] = frozenset()  # another worker took them all

    async def deleted() -> bool:
        return runner.consumer_name not in await consumers()

    assert await await_until(deleted, timeout=10)
    owned["partitions"] = frozenset(range(4))
    await publish(nats_url, 5)
    assert await await_until(reached(runner, 15), timeout=20)
    assert runner.consumer_name in await consumers()
    stop.set()
    await task
    assert runner.consumer_name not in await consumers()
