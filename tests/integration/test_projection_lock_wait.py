"""A worker whose PostgreSQL statement waits on someone else's lock keeps its leases: the
commit runs on the loop that renews them, so a wait longer than the lease TTL (an analyst's
``LOCK TABLE``, an ``ALTER TABLE``) let every partition of every projection it held expire."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import nats
import pytest
import sqlalchemy as sa
from nats.js.errors import KeyNotFoundError

from broker.publisher import Publisher
from projections.base import Projection
from projections.checkpoints import create_sql_engine
from projections.leases import BUCKET
from projections.replica import MessagesReplica
from projections.worker import Worker, WorkerOptions
from tests._wait import await_until
from tests.integration._counting import CountingProjection
from tests.integration.conftest import ReplicaDb as Db
from tests.integration.conftest import replica_db

pytestmark = pytest.mark.integration

TTL = 3.0


@pytest.fixture
def pg() -> Iterator[Db]:
    with replica_db("postgresql", "lockwait") as found:
        yield found


def started(
    nats_url: str, pg: Db, projections: list[Projection]
) -> tuple[Worker, threading.Thread, asyncio.AbstractEventLoop]:
    """A worker ``w1`` of ``projections`` with the short TTL, run on a thread of its own."""
    options = WorkerOptions(
        nats_urls=[nats_url],
        replica_url=pg.url,
        projections=projections,
        worker_id="w1",
        batch=50,
        lease_ttl=TTL,
    )
    worker = Worker(options)
    return (worker, *run_in_thread(worker))


def run_in_thread(worker: Worker) -> tuple[threading.Thread, asyncio.AbstractEventLoop]:
    """Run ``worker`` on a loop of its own thread: a worker blocked in the database must
    not block the test that watches its leases."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    thread.start()
    return thread, loop


async def test_a_statement_waiting_on_a_table_lock_does_not_cost_the_leases(
    publisher: Publisher, nats_url: str, pg: Db
) -> None:
    worker, thread, loop = started(nats_url, pg, [MessagesReplica()])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    locker = create_sql_engine(pg.url)
    try:

        async def holds_all() -> bool:
            return bool(worker.running) and len(worker.running[0].leases.owned()) == 16

        assert await await_until(holds_all, timeout=30)
        await js.publish("msg.default.before", b"{}")

        async def applied(n: int) -> bool:
            with pg.engine.connect() as conn:
                count = conn.execute(sa.text("SELECT count(*) FROM replica_messages"))
                return int(count.scalar_one()) >= n

        assert await await_until(lambda: applied(1), timeout=20)
        kv = await js.key_value(BUCKET)
        released = threading.Event()

        def hold_lock() -> None:
            with locker.begin() as conn:
                conn.execute(sa.text("LOCK TABLE replica_messages IN ACCESS EXCLUSIVE MODE"))
                locked.set()
                released.wait(3 * TTL)

        locked = threading.Event()
        holder = asyncio.get_running_loop().run_in_executor(None, hold_lock)
        assert await asyncio.to_thread(locked.wait, 10)
        await js.publish("msg.default.during", b"{}")  # its commit waits on the lock
        missing: list[float] = []
        start = time.monotonic()
        while time.monotonic() - start < 3 * TTL - 0.5:
            try:
                entry = await kv.get("replica_messages.lease.0")
                if entry.value != b"w1":
                    missing.append(round(time.monotonic() - start, 1))
            except KeyNotFoundError:
                missing.append(round(time.monotonic() - start, 1))
            await asyncio.sleep(0.25)
        released.set()
        await holder
        assert missing == [], f"lease of partition 0 gone at {missing[:3]}… s into the lock"
        assert await await_until(lambda: applied(2), timeout=20)
    finally:
        loop.call_soon_threadsafe(worker.stop)
        await asyncio.to_thread(thread.join, 30)
        locker.dispose()
        await nc.close()


async def test_a_lock_on_the_table_every_projection_writes_does_not_cost_the_leases(
    publisher: Publisher, nats_url: str, pg: Db
) -> None:
    """``broker_checkpoints`` locked (a ``VACUUM FULL``, say) under traffic: each of the four
    projections' commits waits on it in turn, on the one loop; with a third of the TTL each
    they held it for longer than the TTL, and every lease went (seen in a review)."""
    projections = [CountingProjection(partitions=2, name=f"c{i}") for i in range(4)]
    worker, thread, loop = started(nats_url, pg, list(projections))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    locker = create_sql_engine(pg.url)
    feeding = asyncio.Event()

    async def feed() -> None:
        sent = 0
        while not feeding.is_set():
            await js.publish(f"msg.default.s{sent % 7}", b"{}")
            sent += 1
            await asyncio.sleep(0.05)

    feeder = asyncio.create_task(feed())
    try:

        async def holds_all() -> bool:
            running = list(worker.running)
            return len(running) == 4 and all(len(r.leases.owned()) == 2 for r in running)

        assert await await_until(holds_all, timeout=30)
        kv = await js.key_value(BUCKET)
        released, locked = threading.Event(), threading.Event()

        def hold_lock() -> None:
            with locker.begin() as conn:
                conn.execute(sa.text("LOCK TABLE broker_checkpoints IN ACCESS EXCLUSIVE MODE"))
                locked.set()
                released.wait(4 * TTL)

        holder = asyncio.get_running_loop().run_in_executor(None, hold_lock)
        assert await asyncio.to_thread(locked.wait, 10)
        missing: list[tuple[str, float]] = []
        start = time.monotonic()
        while time.monotonic() - start < 3 * TTL:
            for projection in projections:
                key = f"{projection.name}.lease.0"
                try:
                    held = (await kv.get(key)).value == b"w1"
                except KeyNotFoundError:
                    held = False
                if not held:
                    missing.append((key, round(time.monotonic() - start, 1)))
            await asyncio.sleep(0.25)
        released.set()
        await holder
        assert missing == [], missing[:8]
    finally:
        feeding.set()
        await feeder
        loop.call_soon_threadsafe(worker.stop)
        await asyncio.to_thread(thread.join, 30)
        locker.dispose()
        await nc.close()
