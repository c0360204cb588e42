"""SIGHUP held from ``broker serve``'s first moment until it installs its own handler.

SIGHUP's default action ends a process. ``broker serve`` installs its handler (a reload, or
a stop when its terminal closed: :func:`broker.server.run_broker`) only once the CLI has
been imported and its arguments read, about 0.7 s in. :func:`hold_sighup`, called by the
entry point before those imports, records a SIGHUP instead, with the terminal's descriptors
as they were at start, so that the broker can tell a closed terminal (stop) from a reload
(nothing to do yet: every file a reload reads again is read after this, at start).

Standard library only, and nothing else imported: it runs before the rest of the broker.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["hold_sighup", "sighup_held", "terminal_at_start"]


class _Held:
    """What :func:`hold_sighup` recorded (a plain flag: a signal handler must not lock)."""

    armed = False
    signalled = False
    terminal: tuple[int, ...] = ()

    @classmethod
    def record(cls, signum: int, frame: FrameType | None) -> None:
        cls.signalled = True


def hold_sighup() -> None:
    """From now until the broker's own handler replaces it, a SIGHUP is recorded, not fatal;
    the descriptors that are a terminal now are noted."""
    if not hasattr(signal, "SIGHUP") or sys.platform == "win32":  # pragma: no cover
        return
    _Held.terminal = tuple(fd for fd in (0, 1, 2) if os.isatty(fd))
    signal.signal(signal.SIGHUP, _Held.record)
    _Held.armed = True


def sighup_held() -> bool:
    """Whether a SIGHUP came while it was held (read once: the answer is cleared)."""
    held, _Held.signalled = _Held.signalled, False
    return held


def terminal_at_start() -> tuple[int, ...] | None:
    """The descriptors (of 0, 1, 2) that were a terminal when :func:`hold_sighup` ran, or
    ``None`` when it did not run (a caller that is not the entry point)."""
    return _Held.terminal if _Held.armed else None
