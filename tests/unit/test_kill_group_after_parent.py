"""``kill_group_after_parent``: a process group whose supervisor was SIGKILLed is gone within
its grace, even when its members ignore the stop signal (as a granian worker that missed
its SIGTERM did, for granian's 28 s kill timeout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests._wait import wait_for
from tests.e2e._broker import alive

pytestmark = pytest.mark.unit

# The supervisor: starts the group leader in its own session, says its pid, waits.
SUPERVISOR = """
import subprocess, sys
leader = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                          stdout=sys.stdout)
leader.wait()
"""
# The group leader: watches its parent, forks a worker; both ignore SIGTERM, as if stuck.
LEADER = """
import os, signal, sys, time
from broker._process import kill_group_after_parent
signal.signal(signal.SIGTERM, signal.SIG_IGN)
kill_group_after_parent(os.getppid(), 0.5)
worker = os.fork()
if worker == 0:
    while True:
        time.sleep(1)
print(os.getpid(), worker, flush=True)
while True:
    time.sleep(1)
"""


def test_the_group_is_killed_once_its_parent_is_gone() -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, LEADER],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    assert supervisor.stdout is not None
    leader, worker = map(int, supervisor.stdout.readline().split())
    try:
        time.sleep(1.0)  # while the parent lives, nothing happens
        assert alive(leader)
        assert alive(worker)
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(5)
        began = time.monotonic()
        assert wait_for(lambda: not alive(leader) and not alive(worker), timeout=5)
        assert time.monotonic() - began < 3  # the 0.5 s grace and a poll, not a kill timeout
    finally:
        for pid in (leader, worker):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
