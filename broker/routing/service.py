"""``broker router``: one router process (registry view + load view + the routing loop).

Several router processes, here or on other machines, split the work through the shared
durable consumer; each keeps its own registry and load views, both rebuilt from NATS.

A router started with a policy file applies it again when the file changes (looked at
every :data:`POLICY_POLL_SECONDS`; a file replaced through a symlink, as Kubernetes updates
a ConfigMap, counts) or at once on SIGHUP. A file that does not validate is logged
(``routing_policy_invalid``) and the running policy kept; every decision records the
version of the policy that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from broker._process import with_deadline
from broker.natsconn import ConnectOptions
from broker.publisher import Publisher
from broker.registry.snapshot import RegistryView
from broker.routing.embedder import load_embedder
from broker.routing.load import LoadView
from broker.routing.policy import DEFAULT_POLICY, Policy, PolicyInvalid, load_policy
from broker.routing.router import Router
from broker.routing.scoring import Scorer
from broker.telemetry import setup

log = structlog.get_logger(__name__)

#: How often a router looks at its policy file for a change.
POLICY_POLL_SECONDS = 2.0
#: How long a changed policy file must stand still before it is read.
_SETTLE_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class RouterOptions:
    nats_urls: list[str]
    policy_path: Path | None = None
    embedder: str | None = None
    load_ttl: float = 15.0
    #: NATS TLS and credentials (:func:`broker.natsconn.connect_options`); the servers
    #: are ``nats_urls``.
    connect_options: ConnectOptions | None = None
    #: Seconds after SIGINT/SIGTERM before the process exits however far its stop got
    #: (:class:`broker._process.StopDeadline`); ``None``: never.
    stop_deadline: float | None = None


def policy_from(path: Path | None) -> Policy:
    return DEFAULT_POLICY if path is None else load_policy(path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file: modification time, size, inode (``None``: unreadable)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


async def watch_policy(
    path: Path,
    router: Router,
    stop: asyncio.Event,
    *,
    interval: float = POLICY_POLL_SECONDS,
    now: asyncio.Event | None = None,
) -> None:
    """Apply ``path`` to ``router`` whenever the file changes, or when ``now`` is set
    (SIGHUP), until ``stop`` is set. The file is read once at the first look too: it may
    have changed since the router read it at start. A change is read once the file has
    stood still for a moment (:data:`_SETTLE_SECONDS`), not while it is being written."""
    seen: tuple[int, int, int] | None = None
    now = now or asyncio.Event()
    while not stop.is_set():
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(now.wait())]
        try:
            await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        asked, stamp = now.is_set(), _stamp(path)
        now.clear()
        if stop.is_set() or (stamp == seen and not asked):
            continue
        await asyncio.sleep(_SETTLE_SECONDS)
        if _stamp(path) != stamp:  # still being written: look again next time
            continue
        seen = stamp
        try:
            reload_policy(path, router)
        except Exception:  # a bug must not end the watch: later edits still count
            log.exception("routing_policy_reload_failed", path=str(path))


def reload_policy(path: Path, router: Router) -> bool:
    """Read ``path`` and route by it from now on; whether the policy changed. One that does
    not validate, an empty file or a file gone is logged and the running policy kept."""
    try:
        policy = load_policy(path, allow_empty=False)
    except PolicyInvalid as e:
        log.error(
            "routing_policy_invalid", path=str(path), error=e.message, kept=router.policy.version
        )
        return False
    if policy == router.policy:
        return False
    before = router.policy.version
    router.set_policy(policy)
    log.info("routing_policy_reloaded", path=str(path), before=before, version=policy.version)
    return True


async def run_router(options: RouterOptions, stop: asyncio.Event | None = None) -> None:
    """Route until SIGINT/SIGTERM (or ``stop``)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    reload_now = asyncio.Event()  # SIGHUP: read the policy file now (its default kills)
    stopping = with_deadline(stop.set, options.stop_deadline, "broker router")
    for sig, action in (
        (signal.SIGINT, stopping),
        (signal.SIGTERM, stopping),
        (signal.SIGHUP, reload_now.set),
    ):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, action)
    try:
        await _route(options, stop, reload_now)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)


async def _route(options: RouterOptions, stop: asyncio.Event, reload_now: asyncio.Event) -> None:
    setup("router")
    policy = policy_from(options.policy_path)
    embedder = load_embedder(options.embedder)
    publisher = Publisher(
        options.nats_urls, name="broker-router", connect_options=options.connect_options
    )
    publisher.start()
    registry = RegistryView()
    loads = LoadView(options.load_ttl)
    try:
        while not await publisher.wait_connected(5.0):
            if stop.is_set():
                return
            log.warning("router_waiting_for_nats", servers=options.nats_urls)
        await registry.start(publisher.js)
        await loads.start(publisher.js)
        router = Router(publisher, Scorer(embedder, policy), policy, registry, loads)
        if options.policy_path is None:
            await router.run(stop)
            return
        watch = asyncio.create_task(
            watch_policy(options.policy_path, router, stop, now=reload_now), name="policy-watch"
        )
        try:
            await router.run(stop)
        finally:
            watch.cancel()
    finally:
        await loads.stop()
        await publisher.close()
