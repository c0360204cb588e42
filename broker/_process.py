"""Process plumbing: make children die with their parent on Linux; read their logs."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# Resolved once at import: a preexec_fn runs between fork and exec, where looking a
# library up (ctypes.util.find_library spawns processes) is neither safe nor cheap.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); returns whether it took effect. It is what keeps
    an embedded nats-server or an ingress worker from outliving a SIGKILLed broker. If the
    parent already died before the call, the signal is sent at once.
    """
    if _prctl is None:
        return False
    parent = os.getppid()
    if int(_prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) != 0:
        return False
    if parent == 1 or os.getppid() != parent:  # orphaned before the prctl took effect
        os.kill(os.getpid(), sig)
    return True


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_log_since(path: Path, offset: int) -> str:
    """What a child wrote to its log file after ``offset`` (empty if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
