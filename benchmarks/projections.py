"""Projection benchmark: events/s into the SQL replica vs a raw pull fetch + ack.

In one run, on one nats-server holding N messages (JSON, ``--payload-bytes``, spread over
64 subjects):

* **raw**: a durable pull consumer fetching batches of ``--batch`` and acking each batch
  (``AckPolicy.ALL``), nothing else -- the floor any projection pays;
* **sqlite** / **postgresql**: the ``replica_messages`` projection through the runtime (same
  batch size): decode, bulk insert, checkpoint in the same transaction, commit, ack;
* **scaling** (``--workers 1,2,4``): that many ``broker worker`` processes sharing the
  PostgreSQL replica, timed from start until every message is in the table.

Targets (issue 6): replica >= 0.5x raw; the scaling factor is reported as measured.

Usage: ``python benchmarks/projections.py [--messages 20000] [--workers 1,2,4]
[--postgres postgresql://postgres@127.0.0.1:5432/test]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
import sqlalchemy as sa
from nats.js.api import AckPolicy, ConsumerConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.embedded import NatsServer, ServerSpec  # noqa: E402
from broker.settings import Settings  # noqa: E402
from broker.streams import provision  # noqa: E402
from projections.checkpoints import SqlCheckpointStore, create_sql_engine  # noqa: E402
from projections.replica import MessagesReplica  # noqa: E402
from projections.runtime import ProjectionRunner  # noqa: E402


async def fill(url: str, n: int, payload_bytes: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js, Settings())
    body = b'{"text":"' + b"x" * max(0, payload_bytes - 11) + b'"}'
    for start in range(0, n, 5000):
        acks = [
            await js.publish_async(
                f"msg.default.bench.s{i % 64}",
                body,
                headers={"Content-Type": "application/json", "Nats-Msg-Id": f"b{i}"},
            )
            for i in range(start, min(n, start + 5000))
        ]
        await asyncio.gather(*acks)
    await nc.close()


async def raw(url: str, n: int, batch: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"raw_{uuid.uuid4().hex[:6]}"
    sub = await js.pull_subscribe(
        "msg.>",
        durable=name,
        stream="MESSAGES",
        config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=-1),
    )
    began, got = time.perf_counter(), 0
    while got < n:
        messages = await sub.fetch(batch, timeout=5)
        await messages[-1].ack()
        got += len(messages)
    elapsed = time.perf_counter() - began
    await js.delete_consumer("MESSAGES", name)
    await nc.close()
    return n / elapsed


async def through_runtime(url: str, engine: sa.Engine, n: int, batch: int) -> float:
    nc = await nats.connect(url)
    projection = MessagesReplica()
    with engine.begin() as tx:
        projection.setup(tx)
    store = SqlCheckpointStore(engine)
    runner = ProjectionRunner(nc.jetstream(), projection, store, worker="bench", batch=batch)
    stop = asyncio.Event()
    began = time.perf_counter()
    task = asyncio.create_task(runner.run(stop))
    while runner.stats.last_seq < n:
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    elapsed = time.perf_counter() - began
    stop.set()
    await task
    await nc.close()
    return n / elapsed


def pg_engine(base: str, schema: str) -> sa.Engine:
    return create_sql_engine(f"{base}?options=-csearch_path%3D{schema}")


def scaling(url: str, pg: str, n: int, workers: int) -> float:
    """Events/s with ``workers`` worker processes sharing one PostgreSQL replica."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_sql_engine(pg)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    replica_url = f"{pg}?options=-csearch_path%3D{schema}"
    env = {**os.environ, "BROKER_LOG_LEVEL": "warning"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "worker",
                "--nats-url",
                url,
                "--replica-url",
                replica_url,
                "--projection",
                "replica_messages",
                "--worker-id",
                f"bench{i}-{schema}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for i in range(workers)
    ]
    engine = pg_engine(pg, schema)
    first: tuple[float, int] | None = None  # from the first row: process start-up excluded
    try:
        deadline = time.monotonic() + 300
        while True:
            time.sleep(0.02)
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise SystemExit(f"a worker exited or the run took too long ({workers} workers)")
            try:
                with engine.connect() as conn:
                    count = conn.execute(sa.text("SELECT count(*) FROM replica_messages")).scalar()
            except sa.exc.ProgrammingError:
                continue  # table not created yet
            count = int(count or 0)
            if first is None and count > 0:
                first = (time.perf_counter(), count)
            if count >= n:
                break
        assert first is not None
        return (n - first[1]) / max(time.perf_counter() - first[0], 1e-9)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--workers", default="1,2,4", help="worker counts for the scaling run")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(ServerSpec(store_dir=Path(tmp) / "nats")).start()
        try:
            asyncio.run(fill(server.url, n, args.payload_bytes))
            raw_rate = asyncio.run(raw(server.url, n, args.batch))
            sqlite = create_sql_engine(f"sqlite:///{tmp}/replica.db")
            sqlite_rate = asyncio.run(through_runtime(server.url, sqlite, n, args.batch))
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            admin = create_sql_engine(args.postgres)
            with admin.begin() as conn:
                conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
            try:
                pg_rate = asyncio.run(
                    through_runtime(server.url, pg_engine(args.postgres, schema), n, args.batch)
                )
            finally:
                with admin.begin() as conn:
                    conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
            counts = [int(w) for w in args.workers.split(",") if w]
            rates = {w: scaling(server.url, args.postgres, n, w) for w in counts}
            report(args, raw_rate, sqlite_rate, pg_rate, rates)
        finally:
            server.stop()


def report(
    args: argparse.Namespace,
    raw_rate: float,
    sqlite_rate: float,
    pg_rate: float,
    rates: dict[int, float],
) -> None:
    print(f"\nprojections: {args.messages} messages of {args.payload_bytes} B, batch {args.batch}")
    print(f"raw fetch + ack               {raw_rate:>9.0f} events/s")
    ratio = sqlite_rate / raw_rate
    print(f"replica_messages -> SQLite    {sqlite_rate:>9.0f} events/s   {ratio:.2f}x")
    ratio = pg_rate / raw_rate
    print(f"replica_messages -> Postgres  {pg_rate:>9.0f} events/s   {ratio:.2f}x  (target 0.5x)")
    first = next(iter(rates.values()))
    for workers, rate in rates.items():
        print(f"{workers} worker(s) -> Postgres      {rate:>9.0f} events/s   {rate / first:.2f}x")


if __name__ == "__main__":
    main()
