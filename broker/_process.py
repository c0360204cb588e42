"""Process plumbing: make children die with their parent on Linux; read their logs."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
# Resolved once at import: a preexec_fn runs between fork and exec, where looking a
# library up (ctypes.util.find_library spawns processes) is neither safe nor cheap.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: signal.Signals = signal.SIGTERM, *, parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); returns whether it took effect. It is what keeps
    an embedded nats-server or an ingress worker from outliving a SIGKILLed broker. If the
    parent already died before the call, the signal is sent at once.

    ``parent`` is the pid of the process that started this one, read *before* the fork (see
    :func:`parent_death_hook`). Read here, after the fork, it would already name whoever
    adopted an orphan: PID 1, or a subreaper (``systemd --user``, ``tini -s``, a CI runner),
    and a child whose parent died before the prctl would outlive it. ``None``: this
    process's parent now (for a process that calls it for itself, after its start).
    """
    if _prctl is None:
        return False
    expected = os.getppid() if parent is None else parent
    if int(_prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) != 0:
        return False
    if expected == 1 or os.getppid() != expected:  # orphaned before the prctl took effect
        os.kill(os.getpid(), sig)
    return True


def parent_death_hook(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child die with this process (:func:`die_with_parent`):
    this process's pid is read now, before the fork, so that a child whose parent dies
    before its prctl knows it, also when a subreaper adopts it."""
    parent = os.getpid()

    def hook() -> None:
        die_with_parent(sig, parent=parent)

    return hook


def kill_group_after_parent(parent: int, grace: float) -> threading.Thread:
    """Kill this process's whole process group ``grace`` seconds after ``parent`` (the pid of
    the process that started this one) is gone, whatever else is still running.

    For a process that leads its own group and forks workers (granian): the SIGTERM that
    :func:`die_with_parent` sends starts its graceful stop, but a worker that misses its own
    stop signal keeps the group alive until granian's kill timeout (about 28 s; seen once in
    about fifteen SIGKILLs of a broker under load, the worker idle in its event loop). With
    the broker gone nothing supervises them: ``grace`` is what the requests in flight get.
    A daemon thread that polls the parent pid twice a second."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        time.sleep(grace)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    watcher = threading.Thread(target=watch, name="kill-group-after-parent", daemon=True)
    watcher.start()
    return watcher


class StopDeadline:
    """Ends this process, with exit code 1, if it has not stopped ``seconds`` after it was
    told to (:meth:`arm`, from its SIGTERM or SIGINT handler), after writing to stderr what
    each of ``loop``'s tasks was waiting on and every thread's stack.

    A router's or a projection worker's graceful stop waits on NATS, PostgreSQL or a model,
    each with bounds of its own; this is the bound on all of them together, and on what none
    of them covers (a task that ignores its cancellation). Under ``broker serve`` a child
    that does not stop is killed after 30 s, but one whose broker was SIGKILLed is told to
    stop by the kernel (:func:`die_with_parent`) and has nothing else to end it. Leaving
    unacknowledged messages is safe: JetStream delivers them again. The tasks are what tell
    where an asyncio process hangs (its thread only shows the loop waiting); they are read
    from this timer's thread while the loop may run, at most once, just before the exit."""

    def __init__(
        self, seconds: float, what: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.seconds = seconds
        self.what = what
        self.loop = loop
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start counting (again calls change nothing)."""
        if self._timer is None:
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.name = "stop-deadline"
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        sys.stderr.write(
            f"{self.what} did not stop within {self.seconds:g} s of being told to; what its "
            "tasks wait on and its threads' stacks follow, then it exits with code 1\n"
        )
        if self.loop is not None:
            with contextlib.suppress(Exception):
                sys.stderr.write(_tasks_waiting(self.loop))
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1)


def task_frames(task: asyncio.Task[Any]) -> list[str]:
    """Where ``task`` waits, as ``file:line function``: its coroutine and each one it awaits,
    innermost last (``Task.get_stack`` gives only the outermost of a suspended coroutine)."""
    frames = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            frames.append(f"{code.co_filename}:{frame.f_lineno} {code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return frames


def _tasks_waiting(loop: asyncio.AbstractEventLoop) -> str:
    """Each of ``loop``'s unfinished tasks and where it waits (:func:`task_frames`)."""
    lines = []
    for task in asyncio.all_tasks(loop):
        lines.append(f"task {task.get_name()}:")
        lines.extend(f"  {frame}" for frame in task_frames(task))
    return "\n".join(lines) + "\n"


def with_deadline(stop: Callable[[], None], seconds: float | None, what: str) -> Callable[[], None]:
    """What a SIGINT or SIGTERM handler does: ``stop()``, and from the first call a
    :class:`StopDeadline` of ``seconds`` (none when ``None``) that reports on the running
    loop's tasks (called in a coroutine) when it ends the process."""
    if seconds is None:
        return stop
    deadline = StopDeadline(seconds, what, asyncio.get_running_loop())

    def stopping() -> None:
        stop()
        deadline.arm()

    return stopping


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


#: Container allocations (net of frees) between two young-generation collections, instead
#: of CPython's 700. See :func:`tune_gc`.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> int:
    """Tune the cycle collector for a long-running broker process that has finished
    starting (modules imported, connections made); returns how many objects were frozen.

    - Everything alive now is collected once, then frozen (``gc.freeze``): start-up leaves
      about 100 000 objects (modules, classes, the OpenTelemetry SDK when tracing is on)
      that live until exit, and every full collection walked all of them again: about 30 ms
      each in the loaded ingress, every few thousand requests.
    - Young collections run every :data:`GC_YOUNG_THRESHOLD` allocations instead of 700.
      Under load the objects of the requests in flight (a few thousand) were traversed at
      every young collection, one per about 40 requests; most of a request's objects are
      freed by reference counting anyway, and only garbage in cycles waits longer.

    Measured in the ingress (BENCHMARKS.md, Observability): about 2 us less CPU per publish
    with telemetry off and 4 us less with metrics on. Frozen objects are still freed by
    reference counting; only the cycle detector stops visiting them.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    return gc.get_freeze_count()
