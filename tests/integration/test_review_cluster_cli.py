"""``broker dev-cluster --nats-base-port``, the CLI as a user runs it: an ingress port
among the nodes' own ports is a usage error at once, not a failed start after the nodes
ran."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("offset", [0, 2001, 4002])
def test_an_ingress_port_that_a_node_listens_on_is_a_usage_error(
    tmp_path: Path, offset: int
) -> None:
    """``--nats-base-port 4080`` puts node n0's monitoring on 8080, the ingress's default
    port: the nodes started, took it, and the ingress then exited ("port in use"), the
    dev cluster with code 4 after the whole start. Now exit code 2 before anything starts."""
    base = 14_080
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    data = tmp_path / "dev"
    started = time.monotonic()
    ports = ("--nats-base-port", str(base), "--port", str(base + offset))
    light = ("--projection-workers", "0", "--routers", "0")
    result = subprocess.run(
        [sys.executable, "-m", "broker", "dev-cluster", "--data-dir", str(data), *ports, *light],
        capture_output=True,
        env=env,
        timeout=120,
    )
    stderr = " ".join(result.stderr.decode().replace("│", " ").split())
    assert result.returncode == 2, stderr[-2000:]
    assert f"--port {base + offset}" in stderr, stderr[-2000:]
    assert "--nats-base-port" in stderr
    assert not (data / "nats").exists()
    assert time.monotonic() - started < 60
