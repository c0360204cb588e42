"""``broker serve``: embedded NATS (or an external one), stream provisioning, granian.

The main process owns the embedded nats-server (a child that dies with it, even on
SIGKILL) and supervises granian's supervisor (the ingress), the projection workers and the
routers, starting each again when it exits; granian's worker processes run
:class:`broker.http.app.BrokerApp` and read their settings from ``BROKER_*`` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nats.errors
import structlog

from broker import _early
from broker.errors import BrokerError
from broker.natsconn import (
    NatsConnectFailed,
    connect,
    connect_options,
    explain_connect_error,
    nats_url_problem,
    redact_servers,
    redact_url,
)
from broker.settings import Settings
from broker.streams import provision
from broker.telemetry.multiproc import MULTIPROC_ENV, prepare_multiprocess_dir, process_exited

if TYPE_CHECKING:
    from broker.embedded import NatsServer

log = structlog.get_logger(__name__)


#: How long ``broker serve`` waits at start for NATS to answer (it may be starting beside
#: the broker, as in compose) before it gives up with exit code 4.
NATS_START_WAIT = 60.0


async def provision_streams(
    settings: Settings, *, update: bool = False, wait: float = NATS_START_WAIT
) -> None:
    """Connect once and create/check every broker stream and bucket; each failed attempt to
    reach NATS is a warning, and :class:`NatsConnectFailed` after ``wait`` seconds."""
    assert settings.nats_url is not None
    options = connect_options(settings, name="broker-provision")

    async def unreachable(error: Exception) -> None:
        log.warning("nats_unreachable", error=explain_connect_error(error, options))

    try:
        async with asyncio.timeout(wait):
            nc = await connect(
                options,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=unreachable,
            )
    except TimeoutError:
        servers = redact_servers(options.get("servers", []))
        raise NatsConnectFailed(f"no NATS server at {servers} answered within {wait:g} s") from None
    nats_version = nc._server_info.get("version")
    try:
        report = await provision(nc.jetstream(timeout=10.0), settings, update=update)
    finally:
        await nc.close()
    log.info(
        "streams_provisioned",
        nats_server_version=nats_version,
        created=report.created,
        updated=report.updated,
        unchanged=report.unchanged,
    )


def _replica_shown(settings: Settings) -> str:
    """The replica's URL as the banner shows it: without user or password."""
    if settings.replica_url is None:
        return str(settings.data_dir / "replica.db")
    return redact_url(settings.replica_url)


def banner(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    base = f"{scheme}://{settings.host}:{settings.port}"
    h2 = "--http2" if settings.tls_cert else "--http2-prior-knowledge"
    if settings.auth_configured:
        h2 += ' -H "Authorization: Bearer $BROKER_API_KEY"'
        access = "auth: API key or JWT required (docs/tenants.md)\n"
    else:
        access = f"auth: none (every request is tenant '{settings.tenant}'; see --auth-file)\n"
    return (
        f"\nbroker ready on {base} (NATS {redact_servers(settings.nats_url or '')})\n"
        + access
        + "publish a message:\n"
        f"  curl {h2} -H 'Content-Type: application/json' "
        f'-d \'{{"hello": "world"}}\' {base}/v1/publish/demo.greetings\n'
        f"API: {base}/openapi.json   health: {base}/readyz\n"
        f"schema registry: {base}/registry   replay: {base}/v1/streams/MESSAGES/messages\n"
        + (
            f"route to an agent: curl {h2} -H 'Content-Type: text/plain' -d 'hello' "
            f"'{base}/v1/route/demo.tasks'   ({settings.routers} router(s))\n"
            if settings.routers
            else ""
        )
        + (
            f"SQL replica: {_replica_shown(settings)} "
            f"({settings.projection_workers} projection worker(s))\n"
            if settings.projection_workers
            else ""
        )
    )


class _Stop:
    """Set by SIGINT/SIGTERM. A plain flag, not a threading.Event: a signal handler that
    takes a lock can deadlock against the code it interrupted."""

    requested = False

    @classmethod
    def handler(cls, signum: int, frame: object) -> None:
        cls.requested = True


class _Reload:
    """Set by SIGHUP (see :func:`_reload`); a plain flag, as :class:`_Stop`."""

    requested = False

    @classmethod
    def handler(cls, signum: int, frame: object) -> None:
        cls.requested = True


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m <args>`` as a child: in a session of its own, dying with us, and
    ignoring SIGHUP until it installs a handler of its own (granian and the routers do, to
    reload): a reload's SIGHUP that reached a child still importing ended it."""
    from broker._process import parent_death_hook

    dies_with_us = parent_death_hook()

    def child_setup() -> None:  # in the child, before exec: an ignored signal stays ignored
        dies_with_us()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    return subprocess.Popen(
        [sys.executable, "-m", *args],
        preexec_fn=child_setup,  # noqa: PLW1509 - a prctl and a signal disposition only
        start_new_session=True,
        env=env,
    )


#: The thread pools of the math libraries a router's model runs on (NumPy's BLAS, torch).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container's ``--cpus``), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no cgroup v2 quota here
    return cores


def router_env(routers: int, environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment of each of ``routers`` router processes: with more than one, each
    math-library thread pool gets a share of this machine's cores, unless set already.
    (On 2 cores, two routers each with a pool the size of the machine routed 175 msgs/s
    together, fewer than one router alone, 212; with one thread each, 253:
    ``benchmarks/router_embedding.py --scaling``.) ``None`` (inherit) for one router."""
    if routers <= 1:
        return None
    env = dict(os.environ if environ is None else environ)
    share = str(max(1, available_cores() // routers))
    for name in THREAD_VARIABLES:
        env.setdefault(name, share)
    return env


#: serve's children report through the ingress's /metrics (one multiprocess directory), so
#: none of them may take BROKER_METRICS_PORT from the environment and race for the port.
_NO_OWN_METRICS = ["--metrics-port", "0"]


def _worker_args(settings: Settings) -> list[str]:
    """The projection worker's command line. Not the NATS or replica URL: either may hold a
    password, and a command line is any local user's to read (``ps``); the worker reads them
    from ``BROKER_NATS_URL`` and ``BROKER_REPLICA_URL``, which serve exports with every other
    setting."""
    args = ["broker", "worker", *_NO_OWN_METRICS]
    args.append("--data-dir")
    args.append(str(settings.data_dir))
    return args


def _router_args(settings: Settings) -> list[str]:
    """A router's command line; its NATS URL comes from ``BROKER_NATS_URL``, as the
    worker's does."""
    args = ["broker", "router", *_NO_OWN_METRICS]
    args += ["--load-ttl", str(settings.agent_load_ttl_seconds)]
    if settings.routing_policy is not None:
        args += ["--policy", str(settings.routing_policy)]
    if settings.routing_embedder:
        args += ["--embedder", settings.routing_embedder]
    return args


#: Seconds ``broker serve`` gives its children, all together, to stop after SIGTERM.
STOP_TIMEOUT = 30.0


def stop_children(children: Sequence[tuple[str, subprocess.Popen[bytes]]], timeout: float) -> None:
    """SIGTERM every running child at once, wait for them all against one deadline
    ``timeout`` seconds away, then SIGKILL those still running; each is logged by its name.
    (Waiting for one child after another gave each its own deadline: four hung children held
    the stop for two minutes.)"""
    running = [(name, proc) for name, proc in children if proc.poll() is None]
    for _, proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for _, proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    late = [(name, proc) for name, proc in running if proc.poll() is None]
    for name, proc in late:
        log.warning("child_killed_after_timeout", child=name, pid=proc.pid, timeout_s=timeout)
        proc.kill()
    deadline = time.monotonic() + 5
    for _, proc in late:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))


#: A child that exits this soon after it started is crashing at start: it is started again
#: after a delay doubling from 1 s to at most :data:`_MAX_RESTART_DELAY`.
_QUICK_EXIT = 10.0
_MAX_RESTART_DELAY = 60.0
#: The exit code of a usage error (bad settings): starting it again would fail the same way.
_USAGE_ERROR = 2
#: ``broker serve``'s exit code when it cannot start, or a child cannot run.
_EXIT_STARTUP = 4
#: Seconds a child due to start again may wait for what keeps it from starting (the
#: ingress's port still taken) before the broker gives up on it, with exit code 4.
_BLOCKED_FOR = 60.0
#: How often a blocked start is tried again.
_BLOCKED_RETRY = 0.5


class _Child:
    """A child process started again whenever it exits: the ingress (granian's supervisor),
    a projection worker or a router. ``name`` is how its logs show it (``ingress``,
    ``router-1``). ``blocker``, when given, says what keeps it from being started again now,
    or ``None``: the ingress's is its port, still bound by someone else."""

    def __init__(
        self,
        name: str,
        start: Callable[[], subprocess.Popen[bytes]],
        *,
        blocker: Callable[[], str | None] | None = None,
    ) -> None:
        self.name = name
        self._start = start
        self._blocker = blocker
        self.proc = start()
        self.started = time.monotonic()
        self.first = True  # its first process is running (or was the last to exit)
        self.delay = 0.0  # before the next start, after quick exits
        self.due: float | None = None  # when it is started again
        self.blocked_since: float | None = None

    def check(self) -> int | None:
        """Start it again if it exited (after its delay); ``None``, or the broker's exit code
        (4) when it cannot run.

        A usage error (exit 2: its settings are wrong) of its *first* process stops the
        broker: every start would fail alike. A later one does not: a router that crashed
        (an OOM kill) after its routing policy file was edited into one that does not
        validate exits 2 at its restart, where the running router had kept its policy; it is
        logged as an error and started again with the same backoff until the file is fixed.
        """
        now = time.monotonic()
        if self.due is None:
            if self.proc.poll() is None:
                return None
            process_exited(self.proc.pid)  # its live gauges leave /metrics
            code = self.proc.returncode
            if code == _USAGE_ERROR and self.first:
                log.error("child_cannot_start", child=self.name, exit_code=code)
                return _EXIT_STARTUP
            quick = now - self.started < _QUICK_EXIT
            self.delay = min(_MAX_RESTART_DELAY, max(1.0, self.delay * 2)) if quick else 0.0
            self.due = now + self.delay
            if code == _USAGE_ERROR:
                log.error(
                    "child_restarted",
                    child=self.name,
                    exit_code=code,
                    delay_s=self.delay,
                    error="its settings do not validate now (see its message above); it is "
                    "started again until they do",
                )
            else:
                log.warning("child_restarted", child=self.name, exit_code=code, delay_s=self.delay)
        if now < self.due:
            return None
        if self._blocker is not None and (problem := self._blocker()) is not None:
            return self._blocked(problem, now)
        self.proc, self.started, self.due = self._start(), now, None
        self.first, self.blocked_since = False, None
        return None

    def _blocked(self, problem: str, now: float) -> int | None:
        """It is due but cannot start: try again shortly, for :data:`_BLOCKED_FOR` seconds."""
        if self.blocked_since is None:
            self.blocked_since = now
            log.warning("child_start_waits", child=self.name, problem=problem)
        if now - self.blocked_since >= _BLOCKED_FOR:
            log.error("child_cannot_start", child=self.name, error=problem, waited_s=_BLOCKED_FOR)
            return _EXIT_STARTUP
        self.due = now + _BLOCKED_RETRY
        return None


def _listening(host: str, port: int) -> bool:
    """Whether the ingress accepts connections (for the banner: printed once it does)."""
    target = "127.0.0.1" if host in {"0.0.0.0", ""} else "::1" if host == "::" else host
    try:
        with socket.create_connection((target, port), timeout=0.2):
            return True
    except OSError:
        return False


def _run_children(
    settings: Settings,
    embedded: NatsServer | None = None,
    *,
    announce: str = "",
    stop_timeout: float = STOP_TIMEOUT,
    terminal: _Terminal | None = None,
) -> int:
    """Run the ingress (granian), the projection workers and the routers until we are asked
    to stop (0) or one of them cannot run (4); the exit code. A child that dies is started
    again (with a growing delay when it dies at start; the ingress once its port is free),
    see :class:`_Child`; one whose first process exits with a usage error (its settings are
    wrong) stops the broker. The embedded nats-server, if it dies, is started again on its
    ports and store; if it cannot be, the broker stops. Stopping gives all the children
    ``stop_timeout`` seconds together (:func:`stop_children`)."""
    ingress_args = ["broker.http.granian_process", "--stop-timeout", str(stop_timeout)]
    routers = router_env(settings.routers)
    children = [
        _Child(
            "ingress",
            lambda: _spawn(ingress_args),
            blocker=lambda: port_problem(settings.host, settings.port),
        )
    ]
    children += [
        _Child(f"projection_worker-{i}", lambda: _spawn(_worker_args(settings)))
        for i in range(settings.projection_workers)
    ]
    children += [
        _Child(f"router-{i}", lambda: _spawn(_router_args(settings), routers))
        for i in range(settings.routers)
    ]
    previous = {sig: signal.signal(sig, _Stop.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    terminal = terminal or _Terminal()
    code: int | None = None
    write_errors = _WriteErrors()
    try:
        while not _Stop.requested and code is None:
            terminal.look()
            if _Reload.requested:
                _Reload.requested = False
                if terminal.hung_up_just_now():  # the terminal closed: stop, as on SIGTERM
                    _Stop.requested = True
                    break
                _reload(settings, children)
            if announce and _listening(settings.host, settings.port):
                print(announce, file=sys.stderr, flush=True)  # now a request gets an answer
                announce = ""
            if embedded is not None and not embedded.is_running():
                code = _restart_nats(embedded)
            elif embedded is not None and write_errors.due():
                try:
                    code = write_errors.check(embedded)
                except Exception as e:  # a check that fails must not end the broker
                    log.warning("embedded_nats_check_failed", error=repr(e)[:300])
            for child in children:
                if code is None and not _Stop.requested:
                    code = child.check()
            time.sleep(0.1)
        log.info("broker_stopping", timeout_s=stop_timeout)
        stop_children([(child.name, child.proc) for child in children], stop_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if code is None else code


def default_metrics_dir(data_dir: Path) -> Path:
    """Where serve's processes keep their metrics files: in memory (``/dev/shm``) where
    there is one, not beside JetStream's store and the SQLite replica. The files are
    memory-mapped, and a process that writes a new page of one on a full file system dies
    of SIGBUS, without a traceback: the store filling the data dir's disk took the ingress
    down (a crash loop) instead of its publishes answering 503. The same holds for a full
    ``/dev/shm``: it is used only with :data:`METRICS_SHM_FREE_BYTES` free (a container's is
    64 MiB unless given more)."""
    shm = Path("/dev/shm")
    try:
        roomy = os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= METRICS_SHM_FREE_BYTES
    except OSError:
        roomy = False
    if roomy:
        tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
        return shm / f"agent-broker-metrics-{tag}"
    return data_dir / "metrics"


#: Free bytes ``/dev/shm`` must have for the metrics files to go there.
METRICS_SHM_FREE_BYTES = 32 * 1024 * 1024


def hung_up(terminal: Sequence[int]) -> bool:
    """Whether the terminal of these descriptors (those that were one at start) hung up: the
    kernel then makes them fail as terminals."""
    return bool(terminal) and not any(os.isatty(fd) for fd in terminal)


class _Terminal:
    """The terminal ``broker serve`` runs in, if any, to tell SIGHUP's two meanings apart:
    the terminal closed (stop, as SIGHUP's default did), or a reload (:func:`_reload`).

    The kernel hangs up the terminal's descriptors and then sends SIGHUP, so a SIGHUP that
    comes within :data:`HANGUP_WINDOW` seconds of the descriptors being found hung up is the
    hang-up's. One that comes later is a reload: a ``broker serve &`` whose shell did not
    pass the hang-up on (``disown``) still reloads on ``kill -HUP``."""

    HANGUP_WINDOW = 2.0

    def __init__(self, fds: Sequence[int] | None = None) -> None:
        """``fds``: the descriptors that were a terminal at the process's start
        (:func:`broker._early.terminal_at_start`); by default, those that are one now."""
        self.fds = list(fds) if fds is not None else [fd for fd in (0, 1, 2) if os.isatty(fd)]
        self.gone_at: float | None = None

    def look(self) -> None:
        """Note when the terminal is first found hung up (cheap: three ``isatty`` calls), and
        leave it: what the broker writes goes to /dev/null from then on."""
        if self.fds and self.gone_at is None and hung_up(self.fds):
            self.gone_at = time.monotonic()
            _leave_terminal(self.fds)

    def hung_up_just_now(self) -> bool:
        self.look()
        return self.gone_at is not None and time.monotonic() - self.gone_at < self.HANGUP_WINDOW


def _leave_terminal(fds: Sequence[int]) -> None:
    """Point these descriptors (those that were the terminal) at /dev/null: writing to a
    hung-up terminal fails (EIO). A log file on stderr stays as it is."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)


def ingress_problem(settings: Settings) -> str | None:
    """Why the ingress could not start with the files it reads (TLS, the auth file) as they
    are now; checked at start and before a reload."""
    from broker.auth import AuthConfigError, Authenticator
    from broker.http.tls import tls_problem

    if problem := tls_problem(settings):
        return problem
    try:
        Authenticator.from_settings(settings)
    except AuthConfigError as e:
        return str(e)
    return None


def _reload(settings: Settings, children: Sequence[_Child]) -> None:
    """SIGHUP: the ingress reads its files again: TLS (certificate, key, client CA, CRLs) and
    the auth file (API keys, JWT settings and key). granian starts its workers anew, one after
    another, each reading them as it starts, once they pass the checks of the start; files
    that would not do are refused with the reason in the log, and the ingress keeps what it
    read before. The routers read their routing policy file again. Projection workers are
    left alone."""
    from broker.http.tls import warn_of_crls

    signalled = []
    # The ingress has files to read again only with TLS or an auth file (inline auth and
    # every other setting come from its environment, fixed at start).
    rereads = settings.tls_cert is not None or settings.auth_file is not None
    try:
        problem = ingress_problem(settings) if rereads else None
    except Exception as e:  # a check that fails must not end the broker: refuse the reload
        problem = f"the files could not be checked ({type(e).__name__}: {e})"
    if problem is not None:
        log.error(
            "reload_refused",
            child="ingress",
            error=problem,
            hint="the ingress keeps the files it read; fix them and send SIGHUP again",
        )
    elif settings.tls_cert is not None:
        with contextlib.suppress(Exception):  # warnings only
            warn_of_crls(settings)
    for child in children:
        if child.name.startswith("projection_worker"):
            continue
        if child.name == "ingress" and (not rereads or problem is not None):
            continue
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGHUP)
            signalled.append(child.name)
    log.info("reload", children=signalled)


class _WriteErrors:
    """Watches the embedded server for the write error of a full disk: logged once, and the
    server restarted once its store's file system has room again (at least
    :data:`_WRITE_ERROR_FREE_BYTES` and :data:`_WRITE_ERROR_FREE_INODES`), since nats-server
    itself never clears the error. While the error keeps coming back, each restart waits
    twice as long as the one before (10 s after the first, up to
    :data:`_WRITE_ERROR_MAX_WAIT`): each drops every client's connection."""

    def __init__(self) -> None:
        self.next_check = time.monotonic() + _WRITE_ERROR_EVERY
        self.seen: str | None = None
        self.wait = _WRITE_ERROR_EVERY
        self.restarted_at = -math.inf

    def due(self) -> bool:
        return time.monotonic() >= self.next_check

    def check(self, embedded: NatsServer) -> int | None:
        now = time.monotonic()
        self.next_check = now + _WRITE_ERROR_EVERY
        error = embedded.write_error()
        if error is None:
            self.seen = None
            if now - self.restarted_at > _WRITE_ERROR_MAX_WAIT:  # it held: back to the start
                self.wait = _WRITE_ERROR_EVERY
            return None
        if error != self.seen:
            self.seen = error
            log.error("embedded_nats_write_error", error=error[:300])
        if now < self.restarted_at + self.wait:
            return None
        try:
            room = os.statvfs(embedded.spec.store_dir)
        except OSError:
            return None
        free = room.f_bavail * room.f_frsize
        if free < _WRITE_ERROR_FREE_BYTES or room.f_favail < _WRITE_ERROR_FREE_INODES:
            return None
        log.warning(
            "embedded_nats_restarting_after_write_error", free_bytes=free, next_wait_s=self.wait
        )
        self.seen = None
        self.restarted_at = now
        self.wait = min(2 * self.wait, _WRITE_ERROR_MAX_WAIT)
        return _restart_nats(embedded, exited=False)


#: How often ``broker serve`` asks its embedded server for a stream write error.
_WRITE_ERROR_EVERY = 5.0
#: The longest wait between two restarts for a write error that keeps coming back.
_WRITE_ERROR_MAX_WAIT = 600.0
#: Free bytes on the store's file system before a server with a write error is restarted.
_WRITE_ERROR_FREE_BYTES = 64 * 1024 * 1024
#: Free inodes there, likewise (a file system out of inodes is full with bytes to spare).
_WRITE_ERROR_FREE_INODES = 1024


def _restart_nats(embedded: NatsServer, *, exited: bool = True) -> int | None:
    """Start the embedded nats-server again after it died (or stopped storing); 4 when it
    cannot be."""
    if exited:
        log.error("embedded_nats_exited", pid=embedded.pid)
    try:
        embedded.restart()
    except Exception as e:
        log.error("embedded_nats_restart_failed", error=str(e)[:300])
        return _EXIT_STARTUP
    log.warning("embedded_nats_restarted", url=embedded.url)
    return None


def host_problem(host: str) -> str | None:
    """Why the ingress cannot bind ``host``: granian takes an IP address only, not a name
    (``--host localhost`` passed the port check, which resolves names, and granian then
    failed with a traceback after NATS had started)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return (
            f"--host {host!r} is not an IP address: the ingress binds an address such as "
            "127.0.0.1, ::1 or 0.0.0.0 (all interfaces), not a host name"
        )
    return None


def port_problem(host: str, port: int) -> str | None:
    """Why the ingress could not bind ``host:port``, checked before anything starts (and
    before the ingress is started again)."""
    if problem := host_problem(host):
        return problem
    if not 1 <= port <= 65535:
        return f"--port {port} is not a port number (1-65535)"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
    return None


def replica_problem(url: str | None) -> str | None:
    """Why the projection workers could not use the replica URL ``url``: it does not parse,
    names no SQLAlchemy dialect, or its driver is not installed. Checked before anything
    starts: each worker used to exit with a traceback and be started again every minute,
    forever. Nothing is connected to (the database may start after the broker).

    An in-memory SQLite database (``sqlite://``, ``sqlite:///:memory:``) is refused too:
    each process would read and write its own, empty when it starts and gone when it
    stops, so no replica would be kept and ``broker projections status`` would show
    nothing applied."""
    if url is None:
        return None
    import sqlalchemy.exc

    from projections.checkpoints import create_sql_engine

    try:
        engine = create_sql_engine(url)  # parses the URL, loads its dialect and driver
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError) as e:
        reason = next(iter(str(e).splitlines()), "") or type(e).__name__
    except ValueError:  # its message quotes the URL's text: a piece of the password, maybe
        reason = "its port is not a number: percent-encode @ : / # in a password"
    else:
        parsed = engine.url
        engine.dispose()
        if parsed.get_backend_name() == "sqlite" and parsed.database in {None, "", ":memory:"}:
            return (
                f"--replica-url {redact_url(url)} is an in-memory SQLite database, which "
                "holds no replica; use sqlite:///PATH"
            )
        return None
    return (
        f"--replica-url {redact_url(url)} is not a usable SQL replica URL ({reason}); "
        "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB"
    )


def settings_problem(settings: Settings) -> str | None:
    """What in ``settings`` would fail only once NATS and the streams are up, checked before:
    the ingress's address, a NATS URL that names no server, an embedded NATS port equal to
    the ingress's, the replica URL (when projection workers run)."""
    if problem := host_problem(settings.host):
        return problem
    if settings.nats_url is not None and (problem := nats_url_problem(settings.nats_url)):
        return problem
    if settings.nats_url is None and settings.nats_port and settings.nats_port == settings.port:
        return (
            f"--nats-port and --port are both {settings.port}: the embedded NATS server and "
            "the ingress need a port each"
        )
    if settings.nats_url is None:
        from broker.embedded import max_payload_problem

        if problem := max_payload_problem(settings.max_message_bytes):
            return problem
    if settings.projection_workers:
        return replica_problem(settings.replica_url)
    return None


#: How long :func:`lock_data_dir` tries before it calls the data dir taken. A broker holds
#: the lock for as long as it runs; :func:`running_nats_url` (a command run beside it) holds
#: a shared lock for a moment, and a broker starting in that moment must not be refused.
LOCK_WAIT_SECONDS = 0.5


def _lock_within(fd: int, seconds: float) -> bool:
    """Take ``fd``'s exclusive lock, trying every 10 ms for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        else:
            return True


#: In a data dir: the file whose lock a running broker (or dev cluster) holds.
LOCK_FILE = "broker.lock"


def lock_data_dir(data_dir: Path) -> int | str:
    """Hold ``<data_dir>/broker.lock`` for this process's lifetime (the kernel lets go when
    it exits, however it exits); what is wrong when another broker holds it, or when the
    data dir cannot be made or written (a file, a read-only place). Two brokers on one data
    dir would share the embedded nats-server's store, the metrics and the replica: the
    second used to stop the first one's nats-server, leaving it up but broken.
    ``broker dev-cluster`` holds the same lock on its data dir, for the same reason."""
    path = data_dir / LOCK_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return f"cannot use the data dir {data_dir} ({e.strerror or e}): choose another --data-dir"
    if not _lock_within(fd, LOCK_WAIT_SECONDS):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return f"another broker (pid {holder}) is running on the data dir {data_dir.resolve()}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


#: In the data dir of a running ``broker serve``: the URL of the NATS server it embeds, for
#: the commands run beside it (:func:`running_nats_url`).
NATS_URL_FILE = "nats.url"


def running_nats_url(data_dir: Path) -> str | None:
    """The URL of the NATS server the broker running on ``data_dir`` embeds; ``None`` when
    no broker holds the data dir's lock (none runs, or it has stopped: what its file says
    is stale) or it embeds none (it was given ``--nats-url``)."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held: a broker runs there
        try:
            url = (data_dir / NATS_URL_FILE).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return url or None
    finally:
        os.close(fd)  # lets go of a lock taken by the check above, too
    return None


def announce_nats_url(data_dir: Path, url: str | None) -> None:
    """Write (or, with ``None``, remove) :data:`NATS_URL_FILE`, by a rename: a reader never
    sees half of it. Only a process holding ``data_dir``'s lock writes it (``broker serve``,
    ``broker dev-cluster``)."""
    path = data_dir / NATS_URL_FILE
    with contextlib.suppress(OSError):
        if url is None:
            path.unlink(missing_ok=True)
            return
        partial = path.with_suffix(".tmp")
        partial.write_text(url + "\n")
        partial.replace(path)


def run_broker(
    settings: Settings,
    *,
    update_streams: bool = False,
    env: Callable[[Settings], dict[str, str]],
    stop_timeout: float = STOP_TIMEOUT,
) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code. The children get
    ``stop_timeout`` seconds, together, to stop before they are killed. SIGHUP reloads
    (:func:`_reload`), or stops when it is the hang-up of the terminal (:class:`_Terminal`)."""
    # SIGHUP from now on sets a flag, handled once the children run: its default action would
    # end the broker half-started (embedded NATS running, nats.url written). Before this, the
    # entry point held it (broker._early).
    terminal = _Terminal(_early.terminal_at_start())
    previous_hup = signal.signal(signal.SIGHUP, _Reload.handler)
    try:
        if _early.sighup_held():
            if terminal.hung_up_just_now():  # the terminal closed while the CLI was loading
                return 0
            # A reload before anything started: every file it would read again is read then.
            log.info("reload_before_start", hint="the files are read as the broker starts")
        return _run_broker(settings, update_streams, env, stop_timeout, terminal)
    finally:
        signal.signal(signal.SIGHUP, previous_hup)


def _run_broker(
    settings: Settings,
    update_streams: bool,
    env: Callable[[Settings], dict[str, str]],
    stop_timeout: float,
    terminal: _Terminal,
) -> int:
    import broker

    embedded: NatsServer | None = None
    if problem := settings_problem(settings):
        log.error("broker_start_failed", message=problem)
        return _EXIT_STARTUP
    lock = lock_data_dir(settings.data_dir)
    if isinstance(lock, str):
        log.error("broker_start_failed", message=lock)
        return _EXIT_STARTUP
    if problem := port_problem(settings.host, settings.port):
        log.error("broker_start_failed", message=problem)
        return _EXIT_STARTUP
    try:
        if settings.nats_url is None:
            from broker.embedded import NatsServer, ServerSpec, max_payload_for

            store = settings.data_dir.resolve() / "nats"
            store.mkdir(parents=True, exist_ok=True)
            # The ingress binds its port after NATS has started: NATS must not draw it.
            spec = ServerSpec(
                store_dir=store,
                port=settings.nats_port,
                avoid_ports=frozenset({settings.port}),
                max_payload=max_payload_for(settings.max_message_bytes),
            )
            embedded = NatsServer(spec).start()
            settings = settings.model_copy(update={"nats_url": embedded.url})
            log.info("embedded_nats_started", url=embedded.url, store_dir=str(store))
        announce_nats_url(settings.data_dir, embedded.url if embedded is not None else None)
        asyncio.run(provision_streams(settings, update=update_streams))
    except BrokerError as e:
        log.error("broker_start_failed", error_code=e.error_code, message=e.message)
        if embedded is not None:
            embedded.stop()
        return _EXIT_STARTUP
    except (OSError, TimeoutError, nats.errors.Error) as e:
        log.error("broker_start_failed", error=str(e) or type(e).__name__)
        if embedded is not None:
            embedded.stop()
        return _EXIT_STARTUP
    os.environ.update(env(settings))
    # Every child writes its metrics here; any ingress worker's /metrics adds them all up.
    given = os.environ.get(MULTIPROC_ENV)
    metrics_dir = prepare_multiprocess_dir(Path(given or default_metrics_dir(settings.data_dir)))
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    from broker.http.state import git_revision

    log.info(
        "broker_starting",
        version=broker.__version__,
        git_revision=git_revision(),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        nats_url=redact_servers(settings.nats_url or ""),
    )
    if settings.auth_configured and settings.metrics_token is None and settings.metrics:
        # Everything else needs a key now; /metrics still names every tenant and agent.
        log.warning(
            "metrics_public",
            hint="set BROKER_METRICS_TOKEN so that only a scrape presenting it reads /metrics",
        )
    try:
        code = _run_children(
            settings,
            embedded,
            announce=banner(settings),
            stop_timeout=stop_timeout,
            terminal=terminal,
        )
    finally:
        if embedded is not None:
            announce_nats_url(settings.data_dir, None)
            embedded.stop()
            log.info("embedded_nats_stopped")
        if not given:  # its own directory, in memory where it is /dev/shm: not left there
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return code
