"""The ingress's granian stops at once when told to while its workers are still starting.

Each worker inherited granian's main-process signal handler until it had loaded the app
(about a second): a SIGTERM then set flags nothing read, the worker went on to serve, and
granian waited its kill timeout for it (28 s at a normal stop of ``broker serve``; 6 s here,
with ``--stop-timeout 8``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.embedded import free_port

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    return any(not s.startswith("Z") for s in out.stdout.split())


@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9])
def test_a_stop_while_workers_load_the_app_is_not_waited_out(tmp_path: Path, delay: float) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {
        "BROKER_HOST": "127.0.0.1",
        "BROKER_PORT": str(free_port()),
        "BROKER_WORKERS": "2",
        # nothing listens there: the workers need no NATS to start or to stop
        "BROKER_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "BROKER_DATA_DIR": str(tmp_path),
    }
    with (tmp_path / "granian.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker.http.granian_process", "--stop-timeout", "8"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        time.sleep(delay)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while _group_alive(process.pid) and time.monotonic() - stopped < 20:
            time.sleep(0.05)
        took = time.monotonic() - stopped
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log_text = (tmp_path / "granian.log").read_text(errors="replace")
    assert took < 4, f"stopped after {took:.1f} s; the log ends with:\n{log_text[-2000:]}"
    assert "refused to gracefully stop" not in log_text, log_text[-2000:]
