"""Run ``broker serve`` as a user does: a real process, a real port, real HTTP/2."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from broker._process import process_alive
from broker.cli import EXIT_STARTUP
from broker.embedded import free_port
from broker.server import default_metrics_dir


def children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


alive = process_alive

#: Starts of one broker, each on a newly drawn port, before a taken port fails the test.
PORT_TRIES = 3
#: What ``broker serve`` logs when its ``--port`` is taken.
_PORT_TAKEN = "Address already in use"


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    scheme: str = "http"
    extra: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def old_workers_stopped(self) -> int:
        """How many of granian's workers have been replaced after a reload so far. granian
        starts a worker's successor first and stops the old one about 3.5 s later; both take
        connections meanwhile, so what a reload changed holds for every connection only from
        the old worker's stop on."""
        try:
            return self.log_path.read_text(errors="replace").count('"Stopped old worker')
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 45.0, *, verify: ssl.SSLContext | bool = True) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(http2=True, http1=self.scheme == "https", verify=verify, timeout=2) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"broker exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    if c.get(f"{self.base_url}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"broker not ready within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.returncode != 0 and self.data_dir is not None:
            # Killed, it could not remove its metrics files from /dev/shm (a clean stop does).
            shutil.rmtree(default_metrics_dir(self.data_dir), ignore_errors=True)
        return self.proc.returncode


def start_broker(
    workdir: Path,
    *,
    nats_url: str | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    scheme: str = "http",
    wait: bool = True,
) -> BrokerProcess:
    """Start ``python -m broker serve`` on a free port; waits for /readyz unless told not to.

    A port drawn free can be taken by another test's process before the broker binds it
    (the suite runs in parallel); the broker then exits saying so, and is started again on
    another port (up to :data:`PORT_TRIES` times) when this waits for it."""
    for attempt in range(1, PORT_TRIES + 1):
        broker = _start_once(workdir, nats_url, args, env, scheme)
        if not wait:
            return broker
        try:
            broker.wait_ready()
        except AssertionError:
            if attempt < PORT_TRIES and port_was_taken(broker):
                continue
            raise
        return broker
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def port_was_taken(broker: BrokerProcess) -> bool:
    """Whether ``broker`` exited because its HTTP port was taken (``broker serve`` then says
    so and exits with its start-up failure status)."""
    return broker.proc.poll() == EXIT_STARTUP and _PORT_TAKEN in broker.log_tail(200)


def _start_once(
    workdir: Path,
    nats_url: str | None,
    args: tuple[str, ...],
    env: dict[str, str] | None,
    scheme: str,
) -> BrokerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(workdir / "data"),
        *args,
    ]
    if nats_url:
        cmd += ["--nats-url", nats_url]
    log_path = workdir / f"broker-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    full_env.update({"BROKER_LOG_FORMAT": "json", **(env or {})})
    with log_path.open("wb") as log:
        # Its own process group, like a shell job, so a test can send a terminal's Ctrl-C.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    return BrokerProcess(proc, port, log_path, scheme, data_dir=workdir / "data")


async def stored_count(url: str, subject: str) -> int:
    """How many messages of ``MESSAGES`` the NATS at ``url`` holds on ``subject`` (a filter)."""
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("MESSAGES", subjects_filter=subject)
    finally:
        await nc.close()
    return sum((info.state.subjects or {}).values())


def within(seconds: float, condition: Callable[[], bool], *, every: float = 0.2) -> bool:
    """Whether ``condition()`` holds within ``seconds``, asked every ``every`` seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()
