"""What ``broker serve`` runs with: the settings it reads from options and ``BROKER_*``
variables, and its router processes' share of the cores' math threads when there are
several (one router keeps the whole machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.server import THREAD_VARIABLES, available_cores, router_env
from broker.settings import Settings


def cores() -> int:
    return available_cores()


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", None),  # no quota: the affinity
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # a core and a half: rounded up
        ("50000 100000\n", 1),
        ("garbage", None),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_cores(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert available_cores(path) == (affinity if expected is None else min(affinity or 1, expected))
    assert available_cores(tmp_path / "missing") == affinity


def test_one_router_inherits_the_environment_as_it_is() -> None:
    assert router_env(1, {"PATH": "/bin"}) is None
    assert router_env(0) is None


@pytest.mark.parametrize("routers", [2, 3, 64])
def test_several_routers_share_the_cores_between_their_thread_pools(routers: int) -> None:
    env = router_env(routers, {"PATH": "/bin"})
    assert env is not None
    assert env["PATH"] == "/bin"
    share = max(1, cores() // routers)
    assert {name: env[name] for name in THREAD_VARIABLES} == dict.fromkeys(
        THREAD_VARIABLES, str(share)
    )


def test_a_thread_count_the_operator_set_is_kept() -> None:
    env = router_env(4, {"OPENBLAS_NUM_THREADS": "3"})
    assert env is not None
    assert env["OPENBLAS_NUM_THREADS"] == "3"
    assert env["OMP_NUM_THREADS"] == str(max(1, cores() // 4))


ENVIRONMENT = {
    "BROKER_HOST": ("host", "0.0.0.0"),
    "BROKER_PORT": ("port", 9123),
    "BROKER_WORKERS": ("workers", 3),
    "BROKER_NATS_PORT": ("nats_port", 4999),
    "BROKER_STREAM_REPLICAS": ("stream_replicas", 3),
    "BROKER_PROJECTION_WORKERS": ("projection_workers", 0),
    "BROKER_ROUTERS": ("routers", 2),
}


def serve_settings(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str]
) -> Settings:
    """The settings ``broker serve`` would run with (nothing is started)."""
    from typer.testing import CliRunner

    import broker.server
    from broker.cli import app

    seen: list[Settings] = []

    def run_broker(settings: Settings, **_: object) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(broker.server, "run_broker", run_broker)
    result = CliRunner().invoke(app, ["serve", *args], env=env)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_serve_reads_every_documented_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: every setting is a ``broker serve`` option or a ``BROKER_*`` variable. The
    counts of routers and workers were options only: the variables were ignored."""
    env = {name: str(value) for name, (_, value) in ENVIRONMENT.items()}
    settings = serve_settings(monkeypatch, env, [])
    assert {field: getattr(settings, field) for field, _ in ENVIRONMENT.values()} == dict(
        ENVIRONMENT.values()
    )


def test_an_option_beats_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = serve_settings(monkeypatch, {"BROKER_ROUTERS": "2"}, ["--routers", "4"])
    assert settings.routers == 4
    assert serve_settings(monkeypatch, {}, []).routers == 1


def test_the_replica_url_stays_off_the_workers_command_line() -> None:
    """It may carry a password; the worker reads it from BROKER_REPLICA_URL instead."""
    from broker.cli import _settings_env
    from broker.server import _worker_args
    from broker.settings import Settings

    url = "postgresql://app:s3cret@db:5432/replica"
    settings = Settings(replica_url=url, nats_url="nats://127.0.0.1:4222")
    assert not [arg for arg in _worker_args(settings) if "s3cret" in arg]
    assert _settings_env(settings)["BROKER_REPLICA_URL"] == url


def test_the_nats_password_stays_off_the_childrens_command_lines_and_the_banner() -> None:
    """The worker and routers read BROKER_NATS_URL, which serve exports; the banner and the
    start log show the servers without user or password."""
    from broker.cli import _settings_env
    from broker.server import _router_args, _worker_args, banner
    from broker.settings import Settings

    url = "nats://app:p@ss-s3cret@n1:4222,nats://app:p@ss-s3cret@n2:4222"
    settings = Settings(nats_url=url)
    for args in (_worker_args(settings), _router_args(settings)):
        assert not [arg for arg in args if "s3cret" in arg or "n1:4222" in arg]
    assert _settings_env(settings)["BROKER_NATS_URL"] == url
    shown = banner(settings)
    assert "s3cret" not in shown
    assert "(NATS nats://***@n1:4222,nats://***@n2:4222)" in shown


def test_a_replica_password_stays_off_the_banner_and_the_dev_clusters_command_lines(
    tmp_path: Path,
) -> None:
    """serve's banner showed the replica URL whole, and the dev cluster passed it to its
    workers on their command lines (ps)."""
    from broker.devcluster import Topology, TopologySpec
    from broker.server import banner
    from broker.settings import Settings

    url = "postgresql://app:s3cret@db:5432/replica"
    shown = banner(Settings(nats_url="nats://127.0.0.1:4222", replica_url=url))
    assert "s3cret" not in shown
    assert "SQL replica: postgresql://***@db:5432/replica" in shown
    cluster = Topology(TopologySpec(data_dir=tmp_path, replica_url=url, projection_workers=1))
    cluster._make_children()
    (worker,) = cluster.workers
    assert not [arg for arg in worker.args if "s3cret" in arg]
    assert worker.env["BROKER_REPLICA_URL"] == url
