"""``broker worker``: run projections in this process, next to any others on any machine.

A worker connects to NATS, opens the replica database, and for each projection keeps
partition leases (:mod:`projections.leases`) and a runner (:mod:`projections.runtime`) for
the partitions it holds. Start more workers anywhere with the same NATS and database URL
and the partitions spread across them; stop one (or kill it) and the others take its
partitions within a few seconds. With change events on, committed replica changes are
relayed from the outbox table to the ``CHANGES`` stream; with card detection on
(``BROKER_DETECT_CARD_NUMBERS``), audit events to the ``AUDIT`` stream.

A runner or the relay that ends (it should not; the relay does when it cannot create
``CHANGES``, say) is logged (``worker_task_ended``) and started again, after a delay that
doubles each time it ends again at once (:func:`restart_delay`, at most 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from broker._process import task_frames, with_deadline
from broker.envelope import TOKEN
from broker.natsconn import (
    RECONNECT_FOREVER,
    ConnectOptions,
    cancel_until_done,
    close_within,
    explain_connect_error,
    open_client,
)
from projections._errors import error_text
from projections.base import Projection
from projections.checkpoints import SqlCheckpointStore, create_sql_engine, ddl_lock
from projections.leases import PartitionLeases
from projections.outbox import relay_outbox
from projections.runtime import RESET_WORKER, ProjectionRunner

log = structlog.get_logger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}".replace(".", "-")


def valid_worker_id(worker_id: str) -> str:
    """``worker_id`` if it can name this worker's consumers and leases, else ValueError (a
    dot, say, makes every consumer name invalid while the leases are still held)."""
    if not TOKEN.fullmatch(worker_id):
        raise ValueError(f"worker id {worker_id!r} must be 1-64 of A-Z a-z 0-9 _ -")
    if worker_id == RESET_WORKER:
        raise ValueError(f"worker id {worker_id!r} is taken by `broker projections reset`")
    return worker_id


@dataclass
class WorkerOptions:
    nats_urls: list[str]
    replica_url: str
    projections: Sequence[Projection]
    worker_id: str = field(default_factory=default_worker_id)
    batch: int = 1024
    lease_ttl: float = 6.0
    changes: bool = False
    #: NATS TLS and credentials (:func:`broker.natsconn.connect_options`); the servers
    #: are ``nats_urls``.
    connect_options: ConnectOptions | None = None
    #: Seconds after SIGINT/SIGTERM before the process exits however far its stop got
    #: (:class:`broker._process.StopDeadline`); ``None``: never.
    stop_deadline: float | None = None

    def __post_init__(self) -> None:
        valid_worker_id(self.worker_id)


@dataclass
class RunningProjection:
    projection: Projection
    runner: ProjectionRunner
    leases: PartitionLeases


class Worker:
    """Runs a set of projections until stopped."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        # A lock wait must end well within a lease's TTL: the commits hold the loop that
        # renews the leases (every TTL/3), and one lock on a table every projection writes
        # (broker_checkpoints: a VACUUM FULL, say) makes each projection's commit wait in
        # turn, on the one loop.
        self.engine: sa.Engine = create_sql_engine(
            options.replica_url,
            lock_timeout=options.lease_ttl / (3 * (len(options.projections) + 1)),
        )
        self.store = SqlCheckpointStore(self.engine)
        self.running: list[RunningProjection] = []
        self.stop_event = asyncio.Event()
        self._nc: NatsClient | None = None

    async def _connect(self) -> JetStreamContext:
        options = ConnectOptions(connect_timeout=5)
        options.update(self.options.connect_options or {})
        options["servers"] = self.options.nats_urls
        options["name"] = f"broker-worker-{self.options.worker_id}"

        async def on_error(e: Exception) -> None:  # instead of nats-py's traceback per attempt
            error = explain_connect_error(e, options)
            if self._nc is not None and self._nc.is_reconnecting:  # every 0.25 s while away
                log.debug("worker_nats_reconnect_failed", error=error)
            else:
                log.warning("worker_nats_error", error=error)

        self._nc = await open_client(**options, **RECONNECT_FOREVER, error_cb=on_error)
        return self._nc.jetstream(timeout=10)

    def _setup(self) -> None:
        with self.engine.begin() as tx:
            ddl_lock(tx)
            for projection in self.options.projections:
                projection.setup(tx)

    async def run(self) -> None:
        """Connect, take leases, apply until :meth:`stop`; give leases back on the way out."""
        connecting = asyncio.create_task(self._connect())
        stopping = asyncio.create_task(self.stop_event.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():  # stopped while NATS was still unreachable
            await cancel_until_done(connecting)
            if self._nc is not None:  # connected as it was cancelled (nats-py lost the cancel)
                await close_within(self._nc)
            log.info("worker_stopped_before_connecting", worker=self.options.worker_id)
            return
        stopping.cancel()
        js = connecting.result()
        await asyncio.to_thread(self._setup)
        for projection in self.options.projections:
            leases = PartitionLeases(
                js,
                projection.name,
                projection.partitions,
                self.options.worker_id,
                ttl=self.options.lease_ttl,
            )
            await leases.start()
            runner = ProjectionRunner(
                js,
                projection,
                self.store,
                worker=self.options.worker_id,  # as is: ids map one-to-one to consumers
                batch=self.options.batch,
                owned=leases.owned,
            )
            self.running.append(RunningProjection(projection, runner, leases))
        log.info(
            "worker_started",
            worker=self.options.worker_id,
            projections=[p.name for p in self.options.projections],
        )
        tasks = [
            asyncio.create_task(r.runner.run(self.stop_event), name=r.projection.name)
            for r in self.running
        ]
        if self.relays_outbox:
            relay = relay_outbox(js, self.engine, self.stop_event)
            tasks.append(asyncio.create_task(relay, name="outbox"))
        restarts = {task.get_name(): _Restarts() for task in tasks}
        try:
            while not self.stop_event.is_set():
                await _wait_any(self.stop_event, tasks)
                for i, task in enumerate(tasks):
                    if task.done() and not self.stop_event.is_set():
                        # A runner must never end on its own; if one does, say so and restart,
                        # later each time it ends again at once (it would spin otherwise).
                        name = task.get_name()
                        error = task.exception() if not task.cancelled() else None
                        delay = restarts[name].ended()
                        log.error(
                            "worker_task_ended",
                            task=name,
                            error_type=type(error).__name__ if error else None,
                            error=error_text(error) if error else None,
                            restart_in=delay,
                        )
                        tasks[i] = asyncio.create_task(self._restart(name, delay), name=name)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            # Bounded: when the broker dies, NATS may be going down at the same moment, and a
            # worker must not outlive it waiting on a dead connection. All at once: one
            # projection after another, 2 s each, kept a dying broker's worker alive for 10 s.
            with contextlib.suppress(Exception):
                stops = (r.leases.stop() for r in self.running)
                await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), 2)
            if self._nc is not None:
                await close_within(self._nc)
            await self.store.close()
            log.info("worker_stopped", worker=self.options.worker_id)

    async def _restart(self, name: str, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), delay)
        if self.stop_event.is_set():
            return
        for r in self.running:
            if r.projection.name == name:
                await r.runner.run(self.stop_event)
                return
        js = self._nc.jetstream() if self._nc else None
        if js is not None:
            await relay_outbox(js, self.engine, self.stop_event)

    @property
    def relays_outbox(self) -> bool:
        """Whether outbox rows are written here (change events, or the audit events of
        replicas with card detection on) and so must be relayed."""
        return self.options.changes or any(
            getattr(p, "uses_outbox", False) for p in self.options.projections
        )

    def stop(self) -> None:
        self.stop_event.set()

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "projection": r.projection.name,
                "partitions": sorted(r.leases.owned()),
                "applied": r.runner.stats.applied,
                "last_seq": r.runner.stats.last_seq,
                "dead_lettered": r.runner.stats.dead_lettered,
            }
            for r in self.running
        ]


#: A task that ended is started again after this many seconds, twice as many for each time
#: in a row it ended within :data:`RESTART_MAX_SECONDS` of its start, at most that.
RESTART_FIRST_SECONDS = 0.5
RESTART_MAX_SECONDS = 10.0


def restart_delay(ends_in_a_row: int) -> float:
    """Seconds before a task that ended ``ends_in_a_row`` times at once (1: the first) is
    started again: 0.5, 1, 2, 4, 8, then 10 s each."""
    exponent = min(max(0, ends_in_a_row - 1), 16)
    return min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * float(2**exponent))


@dataclass
class _Restarts:
    """How often one task ended soon after its (re)start, for :func:`restart_delay`."""

    in_a_row: int = 0
    started: float = field(default_factory=time.monotonic)

    def ended(self) -> float:
        """Count an end; the delay before the next start (and note that start)."""
        now = time.monotonic()
        ran_long = now - self.started > RESTART_MAX_SECONDS
        self.in_a_row = 1 if ran_long else self.in_a_row + 1
        delay = restart_delay(self.in_a_row)
        self.started = now + delay
        return delay


async def _wait_any(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


def dump_tasks() -> None:
    """Log every task's stack (SIGUSR1): what a stuck worker is waiting on."""
    for task in asyncio.all_tasks():
        log.warning("task_stack", task=task.get_name(), frames=task_frames(task))


async def run_worker(options: WorkerOptions) -> None:
    """Run a worker until SIGINT/SIGTERM; SIGUSR1 logs what every task is waiting on."""
    worker = Worker(options)
    loop = asyncio.get_running_loop()
    stopping = with_deadline(worker.stop, options.stop_deadline, "broker worker")
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    await worker.run()
