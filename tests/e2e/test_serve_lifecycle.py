"""How ``broker serve`` stops its children: one SIGTERM to each, one deadline for all of
them together, then SIGKILL, each logged under its own name."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from broker.server import default_metrics_dir
from tests._wait import wait_for
from tests.e2e._broker import alive, children, start_broker

pytestmark = pytest.mark.e2e

#: The children's deadline in the test, seconds (``--stop-timeout``).
STOP_TIMEOUT = 4


def _direct_children(pid: int) -> dict[int, str]:
    """Each child of ``pid`` with its role: ingress, router, projection_worker, nats."""
    roles: dict[int, str] = {}
    for child in children(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        if b"nats-server" in argv[0]:
            roles[child] = "nats"
        elif b"broker.http.granian_process" in argv:
            roles[child] = "ingress"
        elif argv[2:4] == [b"broker", b"router"]:
            roles[child] = "router"
        elif argv[2:4] == [b"broker", b"worker"]:
            roles[child] = "projection_worker"
    return roles


def _events(log: Path, event: str) -> list[dict[str, object]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def test_hung_children_share_one_stop_deadline_and_are_killed_by_name(tmp_path: Path) -> None:
    """The ingress, two routers and a projection worker all ignore SIGTERM (SIGSTOPped).
    The broker used to wait 30 s for each in turn (four of them: two minutes), and logged
    each as `worker`; now all four share one deadline and are logged as what they are."""
    broker = start_broker(
        tmp_path,
        args=("--routers", "2", "--projection-workers", "1", "--stop-timeout", str(STOP_TIMEOUT)),
        env={"BROKER_ROUTING_EMBEDDER": "hashing"},  # no model to load
    )
    stopped: list[int] = []
    try:
        assert wait_for(
            lambda: (
                len(_events(broker.log_path, "router_started")) == 2
                and len(_events(broker.log_path, "worker_started")) == 1
            ),
            timeout=60,
            interval=0.2,
        ), broker.log_tail()
        roles = _direct_children(broker.proc.pid)
        assert sorted(roles.values()) == [
            "ingress",
            "nats",
            "projection_worker",
            "router",
            "router",
        ], roles
        descendants = children(broker.proc.pid)
        for pid, role in roles.items():
            if role != "nats":
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)

        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(8 * STOP_TIMEOUT) == 0, broker.log_tail()
        elapsed = time.monotonic() - started
    finally:
        for pid in stopped:  # a stopped process ignores even the signal its parent's death sends
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        broker.stop()

    # One deadline, not four in a row (that would be 16 s or more).
    assert STOP_TIMEOUT - 0.5 <= elapsed < 2 * STOP_TIMEOUT, f"stopped after {elapsed:.1f} s"
    killed = _events(broker.log_path, "child_killed_after_timeout")
    assert sorted(str(record["child"]) for record in killed) == [
        "ingress",
        "projection_worker-0",
        "router-0",
        "router-1",
    ], killed
    assert sorted(int(str(record["pid"])) for record in killed) == sorted(stopped)
    assert wait_for(lambda: not any(alive(pid) for pid in descendants), timeout=15), [
        pid for pid in descendants if alive(pid)
    ]


def test_the_metrics_files_live_in_memory_while_the_broker_runs_and_go_with_it(
    tmp_path: Path,
) -> None:
    """The processes' memory-mapped metrics files were in ``<data-dir>/metrics``, on the
    disk JetStream fills: a process writing a new page of one on a full disk died of SIGBUS
    (the ingress, in a crash loop). They are in /dev/shm now, and removed at the stop."""
    where = default_metrics_dir(tmp_path / "data")
    assert where.parent == Path("/dev/shm")
    broker = start_broker(tmp_path, args=("--projection-workers", "0"))
    try:
        assert wait_for(lambda: any(where.glob("*.db")), timeout=20), broker.log_tail()
        assert not (tmp_path / "data" / "metrics").exists()
    finally:
        assert broker.stop() == 0
    assert not where.exists()
