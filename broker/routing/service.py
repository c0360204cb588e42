"""``broker router``: one router process (registry view + load view + the routing loop).

Several router processes, here or on other machines, split the work through the shared
durable consumer; each keeps its own registry and load views, both rebuilt from NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from broker.natsconn import ConnectOptions
from broker.publisher import Publisher
from broker.registry.snapshot import RegistryView
from broker.routing.embedder import load_embedder
from broker.routing.load import LoadView
from broker.routing.policy import DEFAULT_POLICY, Policy, load_policy
from broker.routing.router import Router
from broker.routing.scoring import Scorer
from broker.telemetry import setup

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RouterOptions:
    nats_urls: list[str]
    policy_path: Path | None = None
    embedder: str | None = None
    load_ttl: float = 15.0
    #: NATS TLS and credentials (:func:`broker.natsconn.connect_options`); the servers
    #: are ``nats_urls``.
    connect_options: ConnectOptions | None = None


def policy_from(path: Path | None) -> Policy:
    return DEFAULT_POLICY if path is None else load_policy(path)


async def run_router(options: RouterOptions, stop: asyncio.Event | None = None) -> None:
    """Route until SIGINT/SIGTERM (or ``stop``)."""
    setup("router")
    policy = policy_from(options.policy_path)
    embedder = load_embedder(options.embedder)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
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
        await router.run(stop)
    finally:
        await loads.stop()
        await publisher.close()
