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


LOAD = """
import sys
from broker.telemetry import metrics
for agent in sys.argv[1:]:
    metrics.agent_load("t", agent, instances=2, in_flight=1, qps=3, p99_seconds=0.1,
                       error_ratio=0)
metrics.forget_agent("t", "gone")
"""
LOAD_ONLY = """
import sys
from broker.telemetry import metrics
metrics.agent_load("t", "gone", instances=1, in_flight=0, qps=1, p99_seconds=0, error_ratio=0)
"""


def test_a_gone_agents_load_gauges_are_left_out_of_the_exposition(tmp_path: Path) -> None:
    """An agent a router forgot is not reported (its values stay in the shared files, which
    cannot drop them), while another router that still sees an instance keeps it shown;
    an old build_info label set set to 0 is left out too."""
    run(LOAD, tmp_path, "gone", "live")
    run(SET, tmp_path, "2.9.0")
    set_twice = SET + "metrics.build_info('1.0', 'abc', '2.10.0')\n"
    run(set_twice, tmp_path, "2.9.0")  # one process: 2.9.0 set to 0, then 2.10.0 to 1
    text = run(RENDER, tmp_path).stdout
    assert 'broker_agent_instances{agent="live",tenant="t"} 2.0' in text
    assert 'agent="gone"' not in text
    assert 'nats_server_version="2.9.0",version="1.0"} 1.0' in text  # the first process's
    assert 'nats_server_version="2.9.0",version="1.0"} 0.0' not in text
    run(LOAD_ONLY, tmp_path)  # another router sees an instance of it: shown again
    text = run(RENDER, tmp_path).stdout
    assert 'broker_agent_instances{agent="gone",tenant="t"} 1.0' in text
