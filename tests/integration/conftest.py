"""Fixtures of the integration tier: a provisioned server, a connected publisher, and a
fresh PostgreSQL schema (also used by the fault suite, tests/faults)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import nats
import pytest
import pytest_asyncio
import sqlalchemy as sa
from nats.aio.client import Client as NatsClient

from broker.publisher import Publisher
from broker.settings import Settings
from broker.streams import provision
from projections.checkpoints import create_sql_engine

#: The PostgreSQL every test that needs one uses (see the developer guide).
PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest_asyncio.fixture
async def publisher(nats_url: str) -> AsyncIterator[Publisher]:
    """A :class:`Publisher` connected to a fresh server with every broker stream provisioned."""
    nc = await nats.connect(nats_url)
    await provision(nc.jetstream(), Settings())
    await nc.close()
    pub = Publisher([nats_url])
    pub.start()
    assert await pub.wait_connected(5)
    yield pub
    await pub.close()


@pytest_asyncio.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection to :func:`nats_url`'s server, closed afterwards."""
    client = await nats.connect(nats_url)
    yield client
    await client.close()


def replica_url(schema: str) -> str:
    """``BROKER_REPLICA_URL`` of a replica that lives in ``schema``."""
    return f"{PG}?options=-csearch_path%3D{schema}"


def schema_engine(schema: str) -> sa.Engine:
    """An engine whose connections see ``schema`` first."""
    return sa.create_engine(
        PG.replace("postgresql://", "postgresql+psycopg://"),
        connect_args={"options": f"-csearch_path={schema}"},
    )


@contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """A new PostgreSQL schema named ``<prefix>_<random>``, dropped with everything in it on
    the way out. No PostgreSQL answering fails the test: it never skips (nor silently
    passes) a test that needs the database."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.fail(f"no PostgreSQL at 127.0.0.1:5432 (user postgres, database test): {e}")
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for a replica, dropped afterwards."""
    with postgres_schema("topo") as schema:
        yield schema


class ReplicaDb(NamedTuple):
    """A replica database: its ``BROKER_REPLICA_URL`` and an engine on it."""

    url: str
    engine: sa.Engine


@contextmanager
def replica_db(kind: str, prefix: str, tmp_path: Path | None = None) -> Iterator[ReplicaDb]:
    """A replica database of ``kind``: ``sqlite``, a file in ``tmp_path``; ``postgresql``, a
    fresh schema ``<prefix>_<random>`` of the PostgreSQL on this machine (dropped after; see
    :func:`postgres_schema`). For fixtures parametrized over both."""
    if kind == "sqlite":
        assert tmp_path is not None
        url = f"sqlite:///{tmp_path}/replica.db"
        engine = create_sql_engine(url)
        try:
            yield ReplicaDb(url, engine)
        finally:
            engine.dispose()
        return
    with postgres_schema(prefix) as schema:
        url = replica_url(schema)
        engine = create_sql_engine(url)
        try:
            yield ReplicaDb(url, engine)
        finally:
            engine.dispose()
