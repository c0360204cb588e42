"""A batch the database refuses is logged by its error's type and the database's own
message and SQLSTATE, never SQLAlchemy's full message, which ends in the bound parameters:
the batch's rows, other tenants' payloads among them (payloads are never logged)."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Iterator

import nats
import pytest
from structlog.testing import capture_logs

from broker.reader import read_messages
from broker.settings import Settings
from broker.streams import Stream, provision
from projections.checkpoints import SqlCheckpointStore
from projections.replica import MessagesReplica
from projections.runtime import ProjectionRunner
from tests._wait import await_until
from tests.integration.conftest import ReplicaDb, replica_db

pytestmark = pytest.mark.integration

OTHER_TENANT_SECRET = "acme-payroll-7f3e2a"
POISON_SECRET = "poison-payload-91bd0c"


@pytest.fixture
def pg() -> Iterator[ReplicaDb]:
    with replica_db("postgresql", "errlogs") as found:
        yield found


async def test_a_refused_batch_is_logged_without_its_rows(nats_url: str, pg: ReplicaDb) -> None:
    """One event's subject is too long for PostgreSQL's btree index (SQLSTATE 54000). The
    batch it is in, and then the event alone, fail: the log says which error, and holds
    neither another tenant's payload from the same batch nor the event's own."""
    rnd = random.Random(3)
    long_subject = "msg.t1." + ".".join(
        "".join(rnd.choices(string.ascii_letters + string.digits, k=60)) for _ in range(55)
    )
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, Settings())
        json_type = {"Content-Type": "application/json"}
        await js.publish(
            "msg.acme.pay", b'{"note": "%s"}' % OTHER_TENANT_SECRET.encode(), headers=json_type
        )
        await js.publish(
            long_subject, b'{"note": "%s"}' % POISON_SECRET.encode(), headers=json_type
        )
        last = await js.publish("msg.t1.after", b'{"a": 3}', headers=json_type)
        replica = MessagesReplica()
        with pg.engine.begin() as tx:
            replica.setup(tx)
        runner = ProjectionRunner(js, replica, SqlCheckpointStore(pg.engine), max_attempts=1)
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(runner.run(stop))

            async def applied() -> bool:
                return runner.stats.last_seq >= last.seq

            try:
                assert await await_until(applied, timeout=30)
            finally:
                stop.set()
                await task
        dead = [m async for m in read_messages(js, Stream.DLQ)]
    finally:
        await nc.close()

    logged = repr(logs)
    assert OTHER_TENANT_SECRET not in logged
    assert POISON_SECRET not in logged
    assert long_subject[7:200] not in logged
    assert "[parameters" not in logged
    assert "INSERT INTO" not in logged
    (failed,) = [e for e in logs if e["event"] == "projection_batch_failed"]
    assert failed["error_type"].startswith("OperationalError (psycopg.")
    assert "index row size" in failed["error"]
    assert "[SQLSTATE 54000]" in failed["error"]
    (dead_lettered,) = [e for e in logs if e["event"] == "projection_event_dead_lettered"]
    assert "[SQLSTATE 54000]" in dead_lettered["error"]
    # The dead letter's error says the same: what failed, not the batch's rows.
    (entry,) = dead
    error = (entry.headers or {})["Broker-Dlq-Error"]
    assert "index row size" in error
    assert "[parameters" not in error
