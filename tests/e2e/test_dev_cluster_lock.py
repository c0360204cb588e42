"""``broker dev-cluster``'s lifecycle: one dev cluster per data dir, and a process that dies
at every start is started again less and less often."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests._wait import wait_for
from tests.e2e._broker import alive, children, free_port

pytestmark = pytest.mark.e2e

READY_LINE = "Ctrl-C stops everything."
#: The lightest dev cluster: the nodes and the ingress only.
LIGHT = ("--projection-workers", "0", "--routers", "0")


def _dev_cluster(
    tmp_path: Path, tag: str, data: Path, *args: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / f"{tag}.stdout", tmp_path / f"{tag}.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "dev-cluster", "--data-dir", str(data), *args],
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
    return proc, out, err


def _wait_started(proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
    started = wait_for(lambda: READY_LINE in out.read_text() or proc.poll() is not None, 90)
    assert started, err.read_text()[-3000:]
    assert proc.poll() is None, err.read_text()[-3000:]


def _stop(proc: subprocess.Popen[bytes], err: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0, err.read_text()[-3000:]


def _nats_pids(pid: int) -> list[int]:
    return sorted(
        child
        for child in children(pid)
        if b"nats-server" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
    )


def test_a_second_dev_cluster_on_the_same_data_dir_exits_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    """The second one used to stop the first one's nodes (their pid files named them stale)
    and start its own on their stores."""
    data = tmp_path / "cluster"
    port = free_port()
    first, out, err = _dev_cluster(tmp_path, "first", data, "--port", str(port), *LIGHT)
    try:
        _wait_started(first, out, err)
        nodes = _nats_pids(first.pid)
        assert len(nodes) == 3, nodes

        second, _, second_err = _dev_cluster(
            tmp_path, "second", data, "--port", str(free_port()), *LIGHT
        )
        assert second.wait(60) == 4, second_err.read_text()[-3000:]
        message = " ".join(second_err.read_text().split())
        assert f"another broker (pid {first.pid}) is running on the data dir {data}" in message
        # On the first one's own port too: the data dir is named, not only the port.
        third, _, third_err = _dev_cluster(tmp_path, "third", data, "--port", str(port), *LIGHT)
        assert third.wait(60) == 4, third_err.read_text()[-3000:]
        assert f"on the data dir {data}" in third_err.read_text()

        assert all(alive(pid) for pid in nodes)
        assert _nats_pids(first.pid) == nodes
        assert "exited; started again" not in err.read_text()
        with httpx.Client(http1=False, http2=True, timeout=15) as client:
            published = client.post(
                f"http://127.0.0.1:{port}/v1/publish/lock.check", json={"still": "here"}
            )
        assert published.status_code == 200, published.text
    finally:
        _stop(first, err)


def _restart_delays(err: Path, child: str) -> list[tuple[datetime, float]]:
    """When the dev cluster found ``child`` exited, and the delay it chose before its start."""
    found = []
    for line in err.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "restart_delayed" and record.get("child") == child:
                when = datetime.fromisoformat(str(record["timestamp"]))
                found.append((when, float(record["delay_s"])))
    return found


def test_a_node_that_dies_at_every_start_is_started_again_less_and_less_often(
    tmp_path: Path,
) -> None:
    """Node n1's client port is taken by someone else, so it exits at every start. It used
    to be started again at every check (each 2 s), forever; now after 0.5 s, 1 s, 2 s, 4 s…"""
    data = tmp_path / "cluster"
    port = free_port()
    proc, out, err = _dev_cluster(tmp_path, "dev", data, "--port", str(port), *LIGHT)
    try:
        _wait_started(proc, out, err)
        match = re.search(r"^\s*n1\s+nats://127\.0\.0\.1:(\d+)", out.read_text(), re.MULTILINE)
        assert match, out.read_text()
        node_port = int(match.group(1))
        pid = int((data / "nats" / "n1" / "nats-server.pid").read_text())
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

            def taken() -> bool:
                try:
                    squatter.bind(("127.0.0.1", node_port))
                except OSError:  # its other threads may hold the listener a moment longer
                    return False
                return True

            os.kill(pid, signal.SIGKILL)
            assert wait_for(taken, 10, 0.01)
            squatter.listen()
            restarted = wait_for(lambda: len(_restart_delays(err, "n1")) >= 4, 60, 0.2)
            assert restarted, err.read_text()[-3000:]
        delays = _restart_delays(err, "n1")
        assert [delay for _, delay in delays[:4]] == [0.5, 1.0, 2.0, 4.0]
        for (found, delay), (again, _) in itertools.pairwise(delays[:4]):
            assert (again - found).total_seconds() >= delay, delays
        assert "n1 exited; started again" in err.read_text()
    finally:
        _stop(proc, err)
