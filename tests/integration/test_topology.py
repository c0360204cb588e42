"""The compose.yaml topology as local processes (no Docker engine here): a 3-node NATS
cluster with the durability of deploy/nats, two ``broker serve`` ingress processes with R3
streams and no workers of their own, one ``broker worker`` into PostgreSQL and one
``broker router`` -- each started with the command and environment compose.yaml gives it,
addresses swapped for local ones -- and every service's compose healthcheck run against
them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import sqlalchemy as sa
import yaml

from broker.devcluster import BrokerChild
from broker.embedded import NatsCluster
from tests._wait import await_until, wait_for
from tests.e2e._broker import BrokerProcess, free_port, start_broker
from tests.integration.conftest import replica_url, schema_engine

pytestmark = pytest.mark.integration

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"
#: Options start_broker sets itself (loopback, a free port, the test's directory).
LOCAL_SERVE_OPTIONS = {"--host", "--port", "--data-dir"}


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def local_env(service: dict[str, Any], **overrides: str) -> dict[str, str]:
    """The service's ``BROKER_*`` environment with local addresses (no tracing collector)."""
    env = {k: str(v) for k, v in service["environment"].items() if k.startswith("BROKER_")}
    env.update(overrides)
    return env


def serve_args(service: dict[str, Any]) -> tuple[str, ...]:
    args = [str(word) for word in service["command"]]
    assert args[0] == "serve"
    kept: list[str] = []
    words = iter(args[1:])
    for word in words:
        if word in LOCAL_SERVE_OPTIONS:
            next(words)
        else:
            kept.append(word)
    return tuple(kept)


def run_healthcheck(
    service: dict[str, Any], env: dict[str, str], *, port: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The service's compose healthcheck, run here: ``python``/``broker`` from this venv."""
    test = [str(word) for word in service["healthcheck"]["test"]]
    assert test[0] == "CMD"
    argv = test[1:]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "broker":
        argv[:1] = [sys.executable, "-m", "broker"]
    if port is not None:
        argv = [word.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for word in argv]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run(argv, env={**full_env, **env}, capture_output=True, timeout=30)


def start(workdir: Path, name: str, args: list[str], env: dict[str, str]) -> BrokerChild:
    """``broker <args>`` with the service's environment (none of this shell's ``BROKER_*``)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    child = BrokerChild(name, tuple(args), {**full_env, **env}, workdir / f"{name}.log")
    child.start()
    return child


@pytest.fixture
def durable_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nodes with ``sync_interval: always``, as deploy/nats/*.conf."""
    cluster = NatsCluster(tmp_path / "cluster", 3, sync_interval="always").start()
    yield cluster
    cluster.stop()


def _replica_rows(engine: sa.Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        try:
            rows = conn.execute(sa.text("SELECT seq, subject FROM replica_messages")).all()
        except sa.exc.ProgrammingError:  # the worker has not created its tables yet
            return []
    return [(int(seq), str(subject)) for seq, subject in rows]


async def _stream_replicas(url: str, stream: str = "MESSAGES") -> int:
    nc = await nats.connect(url.split(","))
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.config.num_replicas or 1)
    finally:
        await nc.close()


async def test_compose_topology_delivers_a_published_message_to_the_postgres_replica(
    durable_cluster: NatsCluster, pg_schema: str, tmp_path: Path
) -> None:
    """Publish over HTTP/2 to each ingress; the worker projects both into PostgreSQL."""
    services = compose_services()
    nats_url = durable_cluster.url()
    urls = {"BROKER_NATS_URL": nats_url}
    ingress_env = local_env(services["ingress"], **urls)
    # Started together against a fresh cluster, as compose does: both provision the same
    # streams at once, and provisioning retries a step that timed out (streams.provision).
    ingresses: list[BrokerProcess] = []
    others: list[BrokerChild] = []
    engine = schema_engine(pg_schema)
    try:
        for i in range(services["ingress"]["deploy"]["replicas"]):
            ingresses.append(
                start_broker(
                    tmp_path / f"ingress-{i}",
                    args=serve_args(services["ingress"]),
                    env=ingress_env,
                    wait=False,
                )
            )
        for ingress in ingresses:
            ingress.wait_ready(timeout=90)
        assert await _stream_replicas(nats_url) == 3
        worker_port = free_port()
        metrics_ports = {"worker": worker_port, "router": free_port(avoid={worker_port})}
        worker_env = local_env(
            services["worker"],
            **urls,
            BROKER_REPLICA_URL=replica_url(pg_schema),
            BROKER_METRICS_HOST="127.0.0.1",
            BROKER_METRICS_PORT=str(metrics_ports["worker"]),
        )
        router_env = local_env(
            services["router"],
            **urls,
            BROKER_METRICS_HOST="127.0.0.1",
            BROKER_METRICS_PORT=str(metrics_ports["router"]),
        )
        others.append(start(tmp_path, "worker", services["worker"]["command"], worker_env))
        others.append(start(tmp_path, "router", services["router"]["command"], router_env))

        sequences: list[int] = []
        for n, ingress in enumerate(ingresses):
            async with httpx.AsyncClient(
                base_url=ingress.base_url, http1=False, http2=True, timeout=15
            ) as client:
                response = await client.post(
                    f"/v1/publish/topology.check{n}",
                    json={"hello": "cluster", "via": n},
                    headers={"Idempotency-Key": f"topology-{n}"},
                )
            assert response.http_version == "HTTP/2"
            assert response.status_code in {200, 201, 202}, response.text
            assert response.json()["stream"] == "MESSAGES"
            sequences.append(int(response.json()["seq"]))

        def projected() -> bool:
            for process in others:
                assert process.running, f"{process.name} exited:\n{process.log_tail()}"
            return set(sequences) <= {seq for seq, _ in _replica_rows(engine)}

        assert wait_for(projected, timeout=30, interval=0.2), others[0].log_tail()
        rows = dict(_replica_rows(engine))
        for n, seq in enumerate(sequences):
            assert rows[seq].endswith(f"topology.check{n}")
        # the worker's partition leases are as durable as the data they guard
        assert await _stream_replicas(nats_url, "KV_projection_leases") == 3
        # Outside `broker serve`, worker and router serve their own /metrics (compose scrapes
        # them); counts reach it within a flush interval.
        async with httpx.AsyncClient(timeout=5) as plain:

            async def scraped(child: str, wanted: str) -> bool:
                url = f"http://127.0.0.1:{metrics_ports[child]}/metrics"
                return wanted in (await plain.get(url)).text

            applied = 'broker_projection_applied_total{projection="replica_messages"}'
            assert await await_until(lambda: scraped("worker", applied), timeout=10)
            decisions = "broker_route_decision_duration_seconds_count"
            assert await await_until(lambda: scraped("router", decisions), timeout=10)

        checks = {
            "ingress": run_healthcheck(services["ingress"], ingress_env, port=ingresses[0].port),
            "worker": run_healthcheck(services["worker"], worker_env),
            "router": run_healthcheck(services["router"], router_env),
        }
        for name, result in checks.items():
            assert result.returncode == 0, (name, result.stdout[-2000:], result.stderr[-2000:])
        for process in others:
            assert process.running, f"{process.name} exited:\n{process.log_tail()}"
    finally:
        for process in others:
            process.stop()
        for ingress in ingresses:
            ingress.stop()
        engine.dispose()
