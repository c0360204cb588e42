"""``broker_build_info`` across ``broker serve``'s processes: what an exited worker set goes
with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SET = """
import sys
from broker.telemetry import metrics
metrics.build_info("1.0", "abc", sys.argv[1])
"""
RENDER = """
import sys
from broker.telemetry import metrics, multiproc
for pid in sys.argv[1:]:
    multiproc.process_exited(int(pid))
sys.stdout.write(metrics.render().decode())
"""


def run(code: str, directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def test_an_exited_workers_build_info_is_forgotten(tmp_path: Path) -> None:
    """A worker that saw nats-server 2.9 and exited no longer reports it once ``serve``
    forgets its live gauges; a live one's label set stays."""
    run(SET, tmp_path, "2.9.0")
    run(SET, tmp_path, "2.10.0")  # exits too, but is not forgotten: stands for a live one
    files = sorted(p.name for p in tmp_path.glob("gauge_live*.db"))
    assert len(files) == 2, files  # one file per process, as for any live gauge
    old_pid = next(
        name.rsplit("_", 1)[1].removesuffix(".db")
        for name in files
        if "2.9.0" in (tmp_path / name).read_bytes().decode("latin-1")
    )
    text = run(RENDER, tmp_path, old_pid).stdout
    assert 'nats_server_version="2.10.0",version="1.0"} 1.0' in text
    assert "2.9.0" not in text
