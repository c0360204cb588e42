"""A child told to die with its parent does, also when its parent dies between the fork and
the child's ``prctl(PR_SET_PDEATHSIG)`` and a subreaper (``systemd --user``, ``tini -s``, a CI
runner) adopts it, not PID 1."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

#: Run in a process of its own: it makes itself a subreaper (which a pytest process should
#: not stay), forks a parent that starts ``sleep`` and is SIGKILLed while that child is still
#: in its preexec_fn, then reports what became of the child it adopted.
_SCRIPT = r"""
import ctypes, os, signal, subprocess, sys, time
from pathlib import Path
from broker._process import parent_death_hook

PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
parent = os.fork()
if parent == 0:
    dies_with_us = parent_death_hook()  # made here, before the fork: this process's pid

    def preexec():
        time.sleep(1.0)  # widens the fork -> prctl window: the parent is killed in it
        dies_with_us()

    subprocess.Popen(["sleep", "60"], preexec_fn=preexec)
    os._exit(0)
time.sleep(0.3)
os.kill(parent, signal.SIGKILL)
os.waitpid(parent, 0)
deadline = time.monotonic() + 5  # the orphan's preexec_fn ends 0.7 s from now
while time.monotonic() < deadline:
    pid, status = os.waitpid(-1, os.WNOHANG)  # the orphan is this subreaper's child now
    if pid:
        print("exited", os.waitstatus_to_exitcode(status), flush=True)
        sys.exit(0)
    time.sleep(0.05)
for entry in Path("/proc").iterdir():
    try:
        ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    if ppid == os.getpid():
        os.kill(int(entry.name), signal.SIGKILL)
        print("survived", flush=True)
        sys.exit(0)
print("lost", flush=True)
"""


def test_a_child_orphaned_before_its_prctl_dies_also_under_a_subreaper() -> None:
    """The parent's pid was read in the child, after the fork: by then it named the
    subreaper that had adopted the orphan, which passed for the parent, and the child ran
    on. It is now read before the fork, and the orphan kills itself."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # Killed by SIGTERM (parent_death_hook's signal); it was "survived".
    assert done.stdout.split() == ["exited", str(-signal.SIGTERM)], done.stdout + done.stderr
