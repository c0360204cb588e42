"""One contract, every CheckpointStore: SQLite, PostgreSQL (the real server on this machine)
and JetStream KV."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import sqlalchemy as sa

from projections.checkpoints import (
    CheckpointConflict,
    CheckpointStore,
    KvCheckpointStore,
    SqlCheckpointStore,
    StreamIdentity,
    create_sql_engine,
)

pytestmark = pytest.mark.integration
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards. Fails (does not skip) without a server."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_sql_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    yield schema
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def pg_engine(schema: str) -> sa.Engine:
    return sa.create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        connect_args={"options": f"-csearch_path={schema}"},
    )


@pytest_asyncio.fixture(params=["sqlite", "postgresql", "kv"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, nats_url: str
) -> AsyncIterator[CheckpointStore]:
    if request.param == "sqlite":
        s: CheckpointStore = SqlCheckpointStore(create_sql_engine(f"sqlite:///{tmp_path}/c.db"))
        yield s
        await s.close()
    elif request.param == "postgresql":
        schema = request.getfixturevalue("pg_schema")
        s = SqlCheckpointStore(pg_engine(schema))
        yield s
        await s.close()
    else:
        nc = await nats.connect(nats_url)
        yield KvCheckpointStore(nc.jetstream())
        await nc.close()


def _record(log: list[Any]) -> Any:
    def work(tx: Any) -> None:
        log.append(tx)

    return work


async def test_fresh_projection_has_applied_nothing(store: CheckpointStore) -> None:
    assert await store.load("p") == {}


async def test_commit_moves_checkpoints_and_runs_the_work(store: CheckpointStore) -> None:
    ran: list[Any] = []
    await store.commit("p", {0: (0, 10), 3: (0, 10)}, _record(ran))
    await store.commit("p", {0: (10, 25)}, _record(ran))
    assert await store.load("p") == {0: 25, 3: 10}
    assert len(ran) == 2
    assert await store.load("other") == {}


async def test_a_stale_expected_position_is_refused(store: CheckpointStore) -> None:
    await store.commit("p", {0: (0, 10)}, _record([]))
    with pytest.raises(CheckpointConflict):
        await store.commit("p", {0: (5, 20)}, _record([]))
    with pytest.raises(CheckpointConflict):
        await store.commit("p", {0: (0, 20)}, _record([]))  # someone already started it
    assert (await store.load("p"))[0] == 10


async def test_two_stores_racing_on_one_partition_cannot_both_win(
    store: CheckpointStore, tmp_path: Path
) -> None:
    """What two workers see: both read 10, both try to move to their batch's end."""
    await store.commit("p", {1: (0, 10)}, _record([]))
    await store.load("p")
    await store.commit("p", {1: (10, 20)}, _record([]))
    with pytest.raises(CheckpointConflict):
        await store.commit("p", {1: (10, 30)}, _record([]))
    assert await store.load("p") == {1: 20}


async def test_reset_forgets_checkpoints_and_runs_the_drop(store: CheckpointStore) -> None:
    await store.commit("p", {0: (0, 10)}, _record([]))
    await store.commit("q", {0: (0, 7)}, _record([]))
    dropped: list[Any] = []
    await store.reset("p", _record(dropped))
    assert dropped
    assert await store.load("p") == {}
    assert await store.load("q") == {0: 7}
    await store.commit("p", {0: (0, 3)}, _record([]))
    assert await store.load("p") == {0: 3}


async def test_the_stream_identity_is_kept_beside_the_checkpoints_until_a_reset(
    store: CheckpointStore,
) -> None:
    """The KV store recorded none, so a runner on it could not tell a stream made again."""
    assert await store.stream_identity("p") is None
    await store.commit("p", {0: (0, 4)}, _record([]))
    first, later = (
        StreamIdentity("MESSAGES", "2026-11-27T04:00:00Z"),
        StreamIdentity("MESSAGES", "x"),
    )
    await store.record_stream_identity("p", first)
    await store.record_stream_identity("q", later)
    assert await store.stream_identity("p") == first
    assert await store.load("p") == {0: 4}  # the identity is no partition
    await store.record_stream_identity("p", later)
    assert await store.stream_identity("p") == later
    await store.reset("p", _record([]))
    assert await store.stream_identity("p") is None
    assert await store.stream_identity("q") == later


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sql_work_rolls_back_with_a_refused_checkpoint(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The SQL stores' point: the projection's writes and the checkpoint are one transaction."""
    import asyncio

    if backend == "sqlite":
        engine = create_sql_engine(f"sqlite:///{tmp_path}/r.db")
    else:
        engine = pg_engine(request.getfixturevalue("pg_schema"))
    rows = sa.Table("rows", sa.MetaData(), sa.Column("n", sa.Integer))
    rows.create(engine)
    store = SqlCheckpointStore(engine)

    def insert(n: int) -> Any:
        return lambda tx: tx.execute(rows.insert().values(n=n))

    asyncio.run(store.commit("p", {0: (0, 5)}, insert(1)))
    with pytest.raises(CheckpointConflict):
        asyncio.run(store.commit("p", {0: (0, 9)}, insert(2)))
    with engine.connect() as conn:
        assert [r.n for r in conn.execute(sa.select(rows))] == [1]
    engine.dispose()


async def test_a_reset_takes_the_rows_of_a_commit_it_waited_for(
    pg_schema: str,
) -> None:
    """A worker's commit in flight as a reset begins (PostgreSQL, READ COMMITTED): the reset
    waits for it and then removes its rows with its checkpoint. It deleted the rows first,
    before the commit's were visible, then waited on the checkpoint row: the commit's rows
    outlived the reset, and the rebuild applied those events a second time."""
    import asyncio
    import threading

    engine = pg_engine(pg_schema)
    rows = sa.Table("rows", sa.MetaData(), sa.Column("n", sa.Integer))
    rows.create(engine)
    store = SqlCheckpointStore(engine)
    await store.commit("p", {0: (0, 5)}, lambda tx: tx.execute(rows.insert().values(n=1)))
    committing = threading.Event()
    go_on = threading.Event()

    def worker() -> None:  # the worker's next commit, held open until the reset waits
        def work(tx: Any) -> None:
            tx.execute(rows.insert().values(n=2))

        with engine.begin() as tx:
            work(tx)
            tx.execute(
                sa.text("UPDATE broker_checkpoints SET seq = 9 WHERE projection = 'p' AND seq = 5")
            )
            committing.set()
            assert go_on.wait(20)

    def waiting_on_a_lock() -> bool:  # the reset's delete of the checkpoint row
        query = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE 'DELETE FROM broker_checkpoints%'"
        )
        with engine.connect() as conn:
            return bool(conn.execute(query).scalar())

    thread = threading.Thread(target=worker)
    thread.start()
    assert committing.wait(20)
    reset = asyncio.create_task(store.reset("p", lambda tx: tx.execute(rows.delete())))
    deadline = asyncio.get_running_loop().time() + 20
    while not await asyncio.to_thread(waiting_on_a_lock):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    go_on.set()
    await asyncio.to_thread(thread.join)
    await reset
    with engine.connect() as conn:
        assert [r.n for r in conn.execute(sa.select(rows))] == []
    assert await store.load("p") == {}
    engine.dispose()
