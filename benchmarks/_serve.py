"""``python -m broker serve`` for the benchmarks: start it, wait for ``/readyz``, stop it.

One launcher for every benchmark that measures a real broker process. The broker runs with
the interpreter running the benchmark, from ``cwd`` (``-m broker`` imports from the working
directory first, so another checkout there runs that checkout's code), logs to
``<workdir>/broker.log`` and gets a free port unless it is given one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from broker.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


class ServeError(RuntimeError):
    """The broker exited, or did not become ready in time; the message ends with its log."""


@dataclass
class Serve:
    """A ``broker serve`` process started by :func:`start_serve`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _terminated: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once ``/readyz`` answers 200; :class:`ServeError` if the process exits first
        or ``timeout`` seconds pass (the process is then stopped)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(http1=False, http2=True, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServeError(
                        f"broker exited with {self.proc.returncode}; its log ends with:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                time.sleep(0.1)
        self.stop()
        raise ServeError(
            f"broker not ready within {timeout:g} s; its log ends with:\n{self.log_tail()}"
        )

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM, once) without waiting: :meth:`stop` waits."""
        if self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (unless :meth:`terminate` sent it), then SIGKILL after ``timeout`` s."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_serve(
    workdir: Path,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    cwd: Path = ROOT,
    inherit_broker_env: bool = False,
    new_session: bool = False,
    prefix: Sequence[str] = (),
) -> Serve:
    """Start ``python -m broker serve --host 127.0.0.1 --port P --data-dir <workdir>/data
    ARGS`` without waiting for it (see :meth:`Serve.wait_ready`). The environment is this
    process's, without its ``BROKER_*`` and ``OTEL_*`` variables unless
    ``inherit_broker_env``, with ``BROKER_LOG_LEVEL=warning`` and ``env`` on top.
    ``new_session``: in a session of its own, so a Ctrl-C in the terminal reaches only the
    benchmark, which then stops the broker itself. ``prefix``: a command that runs it
    (``valgrind …``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    environment = {
        k: v
        for k, v in os.environ.items()
        if inherit_broker_env or not k.startswith(("BROKER_", "OTEL_"))
    }
    environment.update({"BROKER_LOG_LEVEL": "warning", "BROKER_LOG_FORMAT": "json"})
    environment.update(env or {})
    cmd = [*prefix, sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--data-dir", str(workdir / "data"), *args]
    log_path = workdir / "broker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=cwd,
            start_new_session=new_session,
        )
    return Serve(proc, port, log_path)
