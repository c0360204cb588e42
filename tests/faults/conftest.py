"""The fault suite's topology: a 3-node JetStream cluster (``sync_interval: always``, as
deploy/nats) with every stream at 3 replicas, the HTTP/2 ingress, and one projection worker
into a PostgreSQL schema of its own -- one per module, started once, brought back to health
before each test (the tests kill, pause and restart its parts)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from broker.devcluster import Topology, TopologySpec
from tests.faults._audit import wait_stream_current
from tests.faults._scenario import FaultOutcome
from tests.integration.conftest import postgres_schema, replica_url, schema_engine

REPLICAS = 3
_OUTCOMES = pytest.StashKey[list[FaultOutcome]]()


@pytest.fixture(scope="module")
def fault_schema() -> Iterator[str]:
    """The replica's PostgreSQL schema, created for the module and dropped after it."""
    with postgres_schema("faults") as schema:
        yield schema


@pytest.fixture(scope="module")
def replica_engine(fault_schema: str) -> Iterator[sa.Engine]:
    engine = schema_engine(fault_schema)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, fault_schema: str) -> Iterator[Topology]:
    spec = TopologySpec(
        data_dir=Path(tmp_path_factory.mktemp("faults")),
        port=0,
        projection_workers=1,
        routers=0,
        replicas=REPLICAS,
        sync_interval="always",
        replica_url=replica_url(fault_schema),
        env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
    )
    topology = Topology(spec).start(timeout=120)
    yield topology
    topology.stop()


@pytest_asyncio.fixture
async def healthy(topology: Topology) -> AsyncIterator[Topology]:
    """The module's topology with every node running (none paused) and current, and every
    broker process ready: what an earlier test broke is repaired first."""
    for node in topology.cluster.nodes:
        node.resume()
    topology.revive()
    topology.wait_ready(timeout=90)
    await wait_stream_current(topology.nats_url, REPLICAS)
    yield topology


@pytest.fixture
def outcomes(request: pytest.FixtureRequest) -> list[FaultOutcome]:
    """Where a test leaves its measured outcome for the end-of-run summary."""
    return request.config.stash.setdefault(_OUTCOMES, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    measured = terminalreporter.config.stash.get(_OUTCOMES, [])
    if not measured:
        return
    terminalreporter.section("faults: what clients saw and what survived")
    for outcome in measured:
        terminalreporter.write_line(outcome.summary())
