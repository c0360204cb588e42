"""A test projection that records every event it applies (duplicates included), and a
``python -m`` entry point that runs it in a worker process for the crash and scaling tests.

``python -m tests.integration._counting NATS_URL DB_URL WORKER_ID PARTITIONS LEASE_TTL``
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import sqlalchemy as sa

from projections.base import Event

metadata = sa.MetaData()
applied = sa.Table(
    "applied",
    metadata,
    sa.Column("seq", sa.BigInteger, nullable=False),  # no key: a duplicate shows as a 2nd row
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("worker", sa.String(100), nullable=False),
)


class CountingProjection:
    """Appends one row per applied event; an event whose body is ``poison`` fails."""

    stream = "MESSAGES"
    subjects: Sequence[str] = ("msg.>",)

    def __init__(self, partitions: int = 1, worker: str = "w", name: str = "test.counting") -> None:
        self.name = name
        self.partitions = partitions
        self.worker = worker

    def setup(self, tx: sa.Connection) -> None:
        metadata.create_all(tx)

    def apply(self, batch: Sequence[Event], tx: sa.Connection) -> None:
        if any(e.data == b"poison" for e in batch):
            raise ValueError("poison event")
        tx.execute(
            applied.insert(),
            [{"seq": e.seq, "subject": e.subject, "worker": self.worker} for e in batch],
        )

    def reset(self, tx: sa.Connection) -> None:
        tx.execute(applied.delete())


def counts(engine: sa.Engine) -> tuple[int, int]:
    """(rows, distinct sequences) in the applied table."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(applied.c.seq)))
        ).one()
    return int(row[0]), int(row[1])


def main(argv: list[str]) -> None:
    from broker.logs import configure_logging
    from projections.worker import WorkerOptions, run_worker

    nats_url, db_url, worker_id, partitions, ttl = argv
    configure_logging()
    options = WorkerOptions(
        nats_urls=[nats_url],
        replica_url=db_url,
        projections=[CountingProjection(int(partitions), worker_id)],
        worker_id=worker_id,
        batch=100,
        lease_ttl=float(ttl),
    )
    asyncio.run(run_worker(options))


if __name__ == "__main__":
    main(sys.argv[1:])
