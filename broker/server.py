"""``broker serve``: embedded NATS (or an external one), stream provisioning, granian.

The main process owns the embedded nats-server (a child that dies with it, even on
SIGKILL) and granian's supervisor; granian's worker processes run
:class:`broker.http.app.BrokerApp` and read their settings from ``BROKER_*`` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nats.errors
import structlog

from broker.errors import BrokerError
from broker.natsconn import (
    NatsConnectFailed,
    connect,
    connect_options,
    explain_connect_error,
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


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    from broker._process import die_with_parent

    return subprocess.Popen(
        [sys.executable, "-m", *args],
        preexec_fn=die_with_parent,  # noqa: PLW1509 - only a prctl, safe before exec
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


class _Child:
    """A projection worker or a router, started again when it exits. ``name`` is its kind
    and its number (``router-1``), as its logs show it."""

    def __init__(self, kind: str, index: int, start: Callable[[], subprocess.Popen[bytes]]) -> None:
        self.name = f"{kind}-{index}"
        self._start = start
        self.proc = start()
        self.started = time.monotonic()
        self.delay = 0.0  # before the next start, after quick exits
        self.due: float | None = None  # when it is started again

    def check(self) -> int | None:
        """Start it again if it exited (after its delay); the exit code of a usage error."""
        now = time.monotonic()
        if self.due is None:
            if self.proc.poll() is None:
                return None
            process_exited(self.proc.pid)  # its live gauges leave /metrics
            code = self.proc.returncode
            if code == _USAGE_ERROR:
                return code
            quick = now - self.started < _QUICK_EXIT
            self.delay = min(_MAX_RESTART_DELAY, max(1.0, self.delay * 2)) if quick else 0.0
            self.due = now + self.delay
            log.warning("child_restarted", child=self.name, exit_code=code, delay_s=self.delay)
        if now >= self.due:
            self.proc, self.started, self.due = self._start(), now, None
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
) -> int:
    """Run the granian process, the projection workers and the routers until the ingress
    exits or we are asked to stop; the exit code. A worker or router that dies is started
    again (with a growing delay when it dies at start); one that exits with a usage error
    (its settings are wrong) stops the broker, exit 4. The embedded nats-server, if it
    dies, is started again on its ports and store; if it cannot be, the broker stops.
    Stopping gives all the children ``stop_timeout`` seconds together (:func:`stop_children`)."""
    ingress = _spawn(["broker.http.granian_process"])
    routers = router_env(settings.routers)
    children = [
        _Child("projection_worker", i, lambda: _spawn(_worker_args(settings)))
        for i in range(settings.projection_workers)
    ]
    children += [
        _Child("router", i, lambda: _spawn(_router_args(settings), routers))
        for i in range(settings.routers)
    ]
    previous = {sig: signal.signal(sig, _Stop.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    code: int | None = None
    try:
        while ingress.poll() is None and not _Stop.requested and code is None:
            if announce and _listening(settings.host, settings.port):
                print(announce, file=sys.stderr, flush=True)  # now a request gets an answer
                announce = ""
            if embedded is not None and not embedded.is_running():
                code = _restart_nats(embedded)
            for child in children:
                if code is None and not _Stop.requested and child.check() is not None:
                    log.error("child_cannot_start", child=child.name, exit_code=_USAGE_ERROR)
                    code = 4
            time.sleep(0.1)
        log.info("broker_stopping", timeout_s=stop_timeout)
        stop_children(
            [("ingress", ingress), *((child.name, child.proc) for child in children)],
            stop_timeout,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code is not None:
        return code
    return 0 if _Stop.requested else _exit_code(ingress.returncode)


def _restart_nats(embedded: NatsServer) -> int | None:
    """Start the embedded nats-server again after it died; 4 when it cannot be."""
    log.error("embedded_nats_exited", pid=embedded.pid)
    try:
        embedded.restart()
    except Exception as e:
        log.error("embedded_nats_restart_failed", error=str(e)[:300])
        return 4
    log.warning("embedded_nats_restarted", url=embedded.url)
    return None


def _exit_code(ingress: int | None) -> int:
    """The broker's exit code after its ingress exited on its own: the ingress's, or 4 for a
    signal (a negative code is outside the documented 0-4)."""
    return 4 if ingress is None or ingress < 0 else ingress


def tls_problem(settings: Settings) -> str | None:
    """What is wrong with the ingress TLS settings, checked before anything starts: a
    certificate without its key, a client CA without a certificate, files that cannot be
    read or do not load (an encrypted key included: granian cannot be given its password)."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if (cert is None) != (key is None):
        return "--tls-cert and --tls-key go together (BROKER_TLS_CERT, BROKER_TLS_KEY)"
    if client_ca is not None and cert is None:
        return "--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS first"
    for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path is not None and (not path.is_file() or not os.access(path, os.R_OK)):
            return f"{option} {path} is not a readable file"
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A callable password: an encrypted key fails here instead of prompting on a tty.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        return (
            f"--tls-cert {cert} and --tls-key {key} do not load as a PEM certificate and its "
            f"unencrypted private key ({e.reason or e})"
        )
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            return f"--tls-client-ca {client_ca} holds no PEM CA certificate ({e.reason or e})"
    return None


def port_problem(host: str, port: int) -> str | None:
    """Why the ingress could not bind ``host:port``, checked before anything starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot resolve --host {host}: {e}"
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            return f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
    return None


def lock_data_dir(data_dir: Path) -> int | str:
    """Hold ``<data_dir>/broker.lock`` for this process's lifetime (the kernel lets go when
    it exits, however it exits); what is wrong when another broker holds it. Two brokers on
    one data dir would share the embedded nats-server's store, the metrics and the replica:
    the second used to stop the first one's nats-server, leaving it up but broken.
    ``broker dev-cluster`` holds the same lock on its data dir, for the same reason."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "broker.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return f"another broker (pid {holder}) is running on the data dir {data_dir.resolve()}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def run_broker(
    settings: Settings,
    *,
    update_streams: bool = False,
    env: Callable[[Settings], dict[str, str]],
    stop_timeout: float = STOP_TIMEOUT,
) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code. The children get
    ``stop_timeout`` seconds, together, to stop before they are killed."""
    import broker

    embedded: NatsServer | None = None
    lock = lock_data_dir(settings.data_dir)
    if isinstance(lock, str):
        log.error("broker_start_failed", message=lock)
        return 4
    if problem := port_problem(settings.host, settings.port):
        log.error("broker_start_failed", message=problem)
        return 4
    try:
        if settings.nats_url is None:
            from broker.embedded import NatsServer, ServerSpec

            store = settings.data_dir.resolve() / "nats"
            store.mkdir(parents=True, exist_ok=True)
            # The ingress binds its port after NATS has started: NATS must not draw it.
            spec = ServerSpec(
                store_dir=store, port=settings.nats_port, avoid_ports=frozenset({settings.port})
            )
            embedded = NatsServer(spec).start()
            settings = settings.model_copy(update={"nats_url": embedded.url})
            log.info("embedded_nats_started", url=embedded.url, store_dir=str(store))
        asyncio.run(provision_streams(settings, update=update_streams))
    except BrokerError as e:
        log.error("broker_start_failed", error_code=e.error_code, message=e.message)
        if embedded is not None:
            embedded.stop()
        return 4
    except (OSError, TimeoutError, nats.errors.Error) as e:
        log.error("broker_start_failed", error=str(e) or type(e).__name__)
        if embedded is not None:
            embedded.stop()
        return 4
    os.environ.update(env(settings))
    # Every child writes its metrics here; any ingress worker's /metrics adds them all up.
    metrics_dir = os.environ.get(MULTIPROC_ENV) or str(settings.data_dir / "metrics")
    os.environ[MULTIPROC_ENV] = str(prepare_multiprocess_dir(Path(metrics_dir)))
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
            settings, embedded, announce=banner(settings), stop_timeout=stop_timeout
        )
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded_nats_stopped")
    return code
