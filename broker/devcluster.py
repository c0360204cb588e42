"""A whole broker topology on one machine, as real processes: a NATS JetStream cluster on
loopback, the HTTP/2 ingress (``broker serve`` against that cluster), projection workers
(``broker worker``) and routers (``broker router``) -- the processes ``compose.yaml`` runs,
without Docker.

``broker dev-cluster`` runs one in the foreground; the topology and fault tests start one,
kill, pause and restart its parts, and check what survived. Layout under ``data_dir``::

    nats/n0 … nats/n<N-1>   each node's JetStream store, config, log and pid file
    ingress/                ``broker serve --data-dir`` (its metrics files)
    replica.db              the SQL replica, unless a replica URL is given
    logs/<child>.log        each broker process's output (ingress, worker-0, router-0 …)

Every child gets ``PR_SET_PDEATHSIG`` (it dies with this process, even on SIGKILL) and its
own session, so a terminal's Ctrl-C reaches only the process that owns the topology, which
then stops the children in order: routers and workers, the ingress, the NATS nodes.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import structlog

from broker._process import parent_death_hook, read_log_since
from broker.embedded import (
    NatsCluster,
    NatsServer,
    free_port,
    max_payload_for,
    max_payload_problem,
)
from broker.errors import EmbeddedServerError
from broker.settings import Settings

__all__ = ["BrokerChild", "RestartBackoff", "Topology", "TopologySpec"]

log = structlog.get_logger(__name__)

_POLL = 0.1
#: How often a worker or router that exits during start-up is started again.
_START_RETRIES = 3
#: The broker's own default ``BROKER_MAX_MESSAGE_BYTES``.
_DEFAULT_MAX_MESSAGE_BYTES: int = Settings.model_fields["max_message_bytes"].default


@dataclass
class BrokerChild:
    """One ``broker <command>`` process with its output appended to ``log_path``.

    ``ready_event`` is the log event the command writes once it works (``worker_started``);
    ``None`` for the ingress, whose readiness is its ``/readyz``. :meth:`start` may be called
    again after the process exited (a restart).
    """

    name: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path
    ready_event: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_offset: int = field(default=0, repr=False)

    def start(self) -> None:
        """Spawn the process (without waiting for it to work).

        Call from the main thread: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked
        the child ends, so a child spawned from a short-lived thread would die with it.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"start {self.name} from the main thread (PR_SET_PDEATHSIG)")
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as output:
            self._log_offset = output.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                preexec_fn=parent_death_hook(),  # noqa: PLW1509 - only a prctl, safe before exec
                start_new_session=True,
            )
        log.debug("broker_child_started", child=self.name, pid=self.proc.pid)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the command's clean stop), SIGKILL after ``timeout``; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("broker_child_killed_after_timeout", child=self.name, pid=proc.pid)
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def output(self) -> str:
        """What the process wrote since its last start."""
        return read_log_since(self.log_path, self._log_offset)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:]) or "(no output)"

    def logged_ready(self) -> bool:
        """The command logged its ``ready_event`` since its last start."""
        return self.ready_event is not None and f'"{self.ready_event}"' in self.output()


@dataclass
class RestartBackoff:
    """When each supervised process (a node, the ingress, a worker, a router) that exited may
    be started again: ``first`` seconds after it was found exited, twice as long each time
    it exits again within ``steady`` seconds of its last start, at most ``cap``; one that
    stayed up ``steady`` seconds starts over from ``first``. Without it, a process that dies
    at every start (a bad setting, a port taken) was started again at every check, forever.

    Plain bookkeeping on the caller's clock (``time.monotonic()``), keyed by process name.
    """

    first: float = 0.5
    cap: float = 30.0
    steady: float = 30.0
    _delay: dict[str, float] = field(default_factory=dict, repr=False)
    _started: dict[str, float] = field(default_factory=dict, repr=False)
    _due: dict[str, float] = field(default_factory=dict, repr=False)

    def exited(self, name: str, now: float) -> float | None:
        """Note that ``name`` was found exited at ``now``: the seconds until its next start,
        or ``None`` when that start is already scheduled (it was noted before)."""
        if name in self._due:
            return None
        started = self._started.get(name)
        if started is None or now - started >= self.steady:
            delay = self.first
        else:
            delay = min(self.cap, max(self.first, 2 * self._delay.get(name, 0.0)))
        self._delay[name] = delay
        self._due[name] = now + delay
        return delay

    def due(self, name: str, now: float) -> bool:
        """Whether ``name``'s next start (scheduled by :meth:`exited`) may happen now."""
        return now >= self._due.get(name, now)

    def started(self, name: str, now: float) -> None:
        """``name`` was started again at ``now``."""
        self._due.pop(name, None)
        self._started[name] = now


@dataclass(frozen=True)
class TopologySpec:
    """What to run. ``port`` 0 and ``nats_base_port`` 0 choose free ports."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    #: granian worker processes of the ingress (``broker serve --workers``).
    ingress_workers: int = 1
    projection_workers: int = 1
    routers: int = 0
    nodes: int = 3
    replicas: int = 3
    #: Node i listens on base+i (clients), base+2000+i (routes), base+4000+i (monitoring).
    nats_base_port: int = 0
    #: JetStream ``sync_interval``; ``always`` as in deploy/nats (fsync before every ack).
    sync_interval: str | None = "always"
    #: SQL replica of the workers; ``None``: SQLite at ``data_dir/replica.db``.
    replica_url: str | None = None
    #: The broker processes' ``BROKER_MAX_MESSAGE_BYTES`` (it replaces the one in ``env``);
    #: the nodes' ``max_payload`` follows it as the embedded server's does.
    max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES
    #: The children's environment (default: this process's); ``BROKER_LOG_FORMAT`` is json.
    env: Mapping[str, str] | None = None


class Topology:
    """A running :class:`TopologySpec`: ``with Topology(spec) as topology: ...``.

    After :meth:`start`, ``cluster`` holds the NATS nodes (kill, pause, restart them),
    ``ingress``, ``workers`` and ``routers`` the broker processes.
    """

    def __init__(self, spec: TopologySpec) -> None:
        if spec.replicas > spec.nodes:
            raise ValueError(f"{spec.replicas} stream replicas need as many nodes")
        if problem := max_payload_problem(spec.max_message_bytes):
            raise ValueError(problem)
        self.spec = spec
        self.data_dir = spec.data_dir.resolve()
        self.cluster = _cluster(self.data_dir / "nats", spec)
        if spec.port in self.cluster.known_ports:
            raise ValueError(f"port {spec.port} is one of the NATS nodes' ports")
        self.port = spec.port or free_port(spec.host, avoid=self.cluster.known_ports)
        self.cluster.avoid_ports({self.port})  # bound by the ingress once the nodes run
        self.replica_url = spec.replica_url or f"sqlite:///{self.data_dir / 'replica.db'}"
        self.ingress: BrokerChild | None = None
        self.workers: list[BrokerChild] = []
        self.routers: list[BrokerChild] = []

    # --- addresses ------------------------------------------------------------------

    @property
    def nats_url(self) -> str:
        """Every node's client URL, comma-separated (``--nats-url``)."""
        return self.cluster.url()

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def children(self) -> list[BrokerChild]:
        """Every broker process, in start order."""
        return [*([self.ingress] if self.ingress else []), *self.workers, *self.routers]

    def node(self, server_name: str) -> NatsServer:
        """The node whose ``server_name`` JetStream reports (e.g. a stream's leader)."""
        for node in self.cluster.nodes:
            if node.spec.server_name == server_name:
                return node
        raise KeyError(f"no node named {server_name!r}")

    # --- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> Self:
        """Start the nodes, then the ingress (which provisions the streams), then the workers
        and routers; return once all are ready. :class:`EmbeddedServerError` (everything
        started is stopped again) if a part exits or is not ready in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            self.cluster.start(ready_timeout=max(1.0, deadline - time.monotonic()))
            self._make_children()
            assert self.ingress is not None
            self.ingress.start()
            # The ingress provisions the streams; workers and routers need them first.
            self._wait([self.ingress], deadline)
            for child in [*self.workers, *self.routers]:
                child.start()
            self._wait(self.children, deadline)
        except BaseException:
            self.stop()
            raise
        log.info("topology_started", nats_url=self.nats_url, ingress=self.base_url)
        return self

    def stop(self) -> None:
        """Stop routers and workers, then the ingress, then the nodes (each cleanly)."""
        for child in reversed(self.children):
            child.stop()
        self.cluster.stop()

    def _make_children(self) -> None:
        spec, url = self.spec, self.nats_url
        env = {
            **(os.environ if spec.env is None else spec.env),
            "BROKER_LOG_FORMAT": "json",
            "BROKER_MAX_MESSAGE_BYTES": str(spec.max_message_bytes),
        }
        logs = self.data_dir / "logs"
        ingress_args = (
            "serve",
            *("--host", spec.host, "--port", str(self.port)),
            *("--workers", str(spec.ingress_workers), "--replicas", str(spec.replicas)),
            *("--nats-url", url, "--data-dir", str(self.data_dir / "ingress")),
            *("--projection-workers", "0", "--routers", "0"),
        )
        self.ingress = BrokerChild("ingress", ingress_args, env, logs / "ingress.log")
        # The replica URL may hold a password: in the environment, not on a command line (ps).
        worker_args = ("worker", "--nats-url", url, "--data-dir", str(self.data_dir))
        worker_env = {**env, "BROKER_REPLICA_URL": self.replica_url}
        self.workers = [
            BrokerChild(
                f"worker-{i}", worker_args, worker_env, logs / f"worker-{i}.log", "worker_started"
            )
            for i in range(spec.projection_workers)
        ]
        self.routers = [
            BrokerChild(
                f"router-{i}",
                ("router", "--nats-url", url),
                env,
                logs / f"router-{i}.log",
                "router_started",
            )
            for i in range(spec.routers)
        ]

    # --- readiness ------------------------------------------------------------------

    def ingress_ready(self) -> bool:
        """``/readyz`` answers 200: NATS connected and every stream present."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return False  # HTTPException: something else (not HTTP) answers on the port

    def child_ready(self, child: BrokerChild) -> bool:
        if not child.running:
            return False
        return self.ingress_ready() if child is self.ingress else child.logged_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every node is healthy and every broker process ready."""
        deadline = time.monotonic() + timeout
        for node in self.cluster.nodes:
            node.wait_ready(max(0.1, deadline - time.monotonic()))
        self._wait(self.children, deadline)

    def _wait(self, children: list[BrokerChild], deadline: float) -> None:
        """Wait for ``children`` to be ready. A worker or router that exits meanwhile is
        started again a few times, as compose's ``restart: unless-stopped`` would (a worker
        can exit when the cluster has not yet elected a leader for a bucket it just
        created); an ingress that exits is a failed start (e.g. a stream conflict)."""
        waiting = list(children)
        restarts = dict.fromkeys((child.name for child in children), 0)
        while waiting:
            for child in list(waiting):
                if child.proc is not None and child.proc.poll() is not None:
                    if child is not self.ingress and restarts[child.name] < _START_RETRIES:
                        restarts[child.name] += 1
                        log.warning(
                            "broker_child_restarted",
                            child=child.name,
                            exit_code=child.returncode,
                            output=child.log_tail(1),
                        )
                        child.start()
                        continue
                    raise EmbeddedServerError(
                        f"{child.name} exited with {child.proc.returncode}:\n"
                        f"{child.log_tail()}\n(log: {child.log_path})"
                    )
                if self.child_ready(child):
                    waiting.remove(child)
            if not waiting:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(child.name for child in waiting)
                raise EmbeddedServerError(
                    f"not ready in time: {names}:\n{waiting[0].log_tail()}\n"
                    f"(log: {waiting[0].log_path})"
                )
            time.sleep(_POLL)

    # --- supervision ----------------------------------------------------------------

    def revive(self, backoff: RestartBackoff | None = None) -> list[str]:
        """Start again every node and broker process that exited; the names restarted.

        With ``backoff`` (a supervisor calling this again and again), a process is started
        only once its delay has passed, and the delay is logged when it is first found
        exited; without it, at once (a test repairing what it broke).
        Nodes are launched without waiting for them (they turn healthy once they rejoin);
        see :meth:`wait_ready`.
        """
        now = time.monotonic()
        restarted: list[str] = []
        for node in self.cluster.nodes:
            name = node.spec.server_name or str(node.spec.store_dir)
            if not node.is_running() and _may_start(backoff, name, None, now):
                node.launch()
                restarted.append(name)
        for child in self.children:
            if child.proc is not None and not child.running:
                if not _may_start(backoff, child.name, child.returncode, now):
                    continue
                log.warning("broker_child_restarted", child=child.name, exit_code=child.returncode)
                child.start()
                restarted.append(child.name)
        return restarted


def _may_start(backoff: RestartBackoff | None, name: str, code: int | None, now: float) -> bool:
    """Whether the exited process ``name`` is to be started now (noting the start if so)."""
    if backoff is None:
        return True
    delay = backoff.exited(name, now)
    if delay is not None:
        log.warning("restart_delayed", child=name, exit_code=code, delay_s=delay)
    if not backoff.due(name, now):
        return False
    backoff.started(name, now)
    return True


def _cluster(store: Path, spec: TopologySpec) -> NatsCluster:
    """The nodes, on loopback; on fixed ports from ``nats_base_port`` when it is set. Their
    ``max_payload`` carries the broker's largest message with its headers: at NATS's 8 MiB
    default, the ingress took a message of a raised limit and NATS refused it (413)."""
    return NatsCluster(
        store,
        spec.nodes,
        sync_interval=spec.sync_interval,
        base_port=spec.nats_base_port,
        max_payload=max_payload_for(spec.max_message_bytes),
    )
