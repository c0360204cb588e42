"""Routing again what a deregistered agent's inbox still holds.

A decision waits in its agent's inbox (``route.<tenant>.<agent>``, read through the durable
consumer ``agent-<tenant>~<agent>``) for an instance of that agent. Once the agent is
deregistered (``DELETE /v1/agents/{name}``) no router chooses it, and nothing would ever take
back what its inbox still held: a waiting caller heard nothing until its deadline, and the
message reached neither another agent nor the DLQ.

Every router process runs an :class:`InboxSweeper`. It learns which deregistered agents may
hold work: at start, from the inbox consumers of ``ROUTES`` with something to deliver whose
agent is not registered; then from every agent that leaves its registry view. Once that view
has caught up with ``REGISTRY`` (so an agent registered meanwhile, maybe through another
router's view, is not taken for gone), it fetches from the agent's own inbox consumer what
that still has to deliver, and for each decision appends a ``RouteFailed`` with reason
``deregistered`` to the agent's failure subject, then acks the decision. The routers'
retries take it from there, as for a failure an agent reports: the next candidate (the
agent counted as tried), or the DLQ with the reason when none qualifies, the policy's
attempts ran out or the deadline passed; a waiting caller hears the outcome. Several routers
may sweep one consumer: each delivery goes to one of them, and a failure stored twice (a
router killed between its append and its ack) is retried once.

What an instance still holds (delivered, not settled) is left to it; if the instance dies,
the message is delivered again after the consumer's ack wait and swept then (a gone agent's
inbox is looked at every :data:`SWEEP_SECONDS` until it has held nothing for
:data:`GONE_GRACE_SECONDS`). The consumer is kept: an agent registered later under that
name resumes after what was swept, not from the inbox's first message. An inbox that no
consumer reads is not swept (``inbox_not_swept`` in the log): its consumer may have been
lost after instances ran what it holds, and nothing tells which they ran. With the default
policy (``require_live``) no decision goes to an agent before an instance of it made its
consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.consumers import list_consumers
from broker.registry.snapshot import AgentKey, RegistryView
from broker.routing.events import (
    FailureReason,
    RouteDecided,
    RouteEventUnreadable,
    RouteFailed,
    inbox_consumer_names,
    inbox_subject,
)
from broker.streams import SUBJECT_PREFIX, Stream
from broker.telemetry import tracing

log = structlog.get_logger(__name__)

#: Seconds between two sweeps of the inboxes of gone agents that still hold something.
SWEEP_SECONDS = 10.0
#: How long a gone agent's inbox is looked at after it was first found empty: a decision
#: made on a view that still had the agent may be appended after it left (its append
#: retried through a leader election, another router's view behind).
GONE_GRACE_SECONDS = 30.0
#: Seconds between two looks at the registry view for agents that left it.
_LOOK_SECONDS = 1.0
_FETCH_BATCH = 64
_FETCH_TIMEOUT = 0.5
#: How long a sweep waits for the registry view to catch up with ``REGISTRY``.
_CATCH_UP_SECONDS = 5.0


def inbox_of(subject: str) -> AgentKey | None:
    """The agent whose inbox ``subject`` is (``route.<tenant>.<agent>``), or ``None``."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != SUBJECT_PREFIX[Stream.ROUTES] or parts[2] == "-":
        return None
    return parts[1], parts[2]


@dataclass(slots=True)
class SweepStats:
    rerouted: int = 0  # decisions handed to the retries as failed (``deregistered``)
    mirrors: int = 0  # shadow copies acked: no caller waits on them
    unreadable: int = 0  # records no decision could be read from (terminated)


class InboxSweeper:
    """One router process's sweeps of deregistered agents' inboxes; :meth:`run` until
    ``stop`` is set."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, registry: RegistryView) -> None:
        self.nc = nc
        self.js = js
        self.registry = registry
        self.instance = f"router:{socket.gethostname()}:{os.getpid()}"
        self.stats = SweepStats()
        #: Deregistered agents whose inbox may still hold something.
        self.gone: set[AgentKey] = set()
        #: When each gone agent's inbox was first found empty (monotonic time).
        self._empty_since: dict[AgentKey, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        found = await self._found_at_start()
        known = self.registry.snapshot
        next_find = time.monotonic() + SWEEP_SECONDS
        next_sweep = 0.0
        while not stop.is_set():
            if not found and time.monotonic() >= next_find:  # NATS away at the start
                found = await self._found_at_start()
                next_find = time.monotonic() + SWEEP_SECONDS
            snapshot = self.registry.snapshot
            if snapshot is not known:
                left = known.keys() - snapshot.keys()
                known = snapshot
                if left:
                    self.gone |= left
                    next_sweep = 0.0
            if self.gone and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_SECONDS
                try:
                    await self.sweep(stop)
                except Exception as e:  # NATS away, say: swept at the next round
                    log.warning("inbox_sweep_failed", error=repr(e)[:200])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _LOOK_SECONDS)

    async def _found_at_start(self) -> bool:
        """:meth:`_find_at_start`; whether it could (logged when not: tried again later)."""
        try:
            await self._find_at_start()
        except Exception as e:  # the agents that leave from now on are still swept
            log.warning("inbox_sweep_failed", error=repr(e)[:200])
            return False
        return True

    async def _find_at_start(self) -> None:
        """Add the agents not registered whose inbox consumer has something to deliver."""
        consumers, left_out = await list_consumers(self.nc, Stream.ROUTES)
        if left_out:
            log.warning("inbox_sweep_consumers_unlisted", count=left_out)
        registered = self.registry.snapshot
        for consumer in consumers:
            config = consumer.get("config")
            subject = config.get("filter_subject") if isinstance(config, dict) else None
            key = inbox_of(subject) if isinstance(subject, str) else None
            held = consumer.get("num_pending") or consumer.get("num_ack_pending")
            if key is not None and key not in registered and held:
                self.gone.add(key)

    async def sweep(self, stop: asyncio.Event) -> None:
        """Sweep each gone agent's inbox, once the registry view has caught up; an agent
        registered again, or whose inbox has held nothing for :data:`GONE_GRACE_SECONDS`,
        is forgotten."""
        info = await self.js.stream_info(Stream.REGISTRY)
        if not await self.registry.wait_for(info.state.last_seq, _CATCH_UP_SECONDS):
            log.warning("inbox_sweep_waits_for_registry", seq=info.state.last_seq)
            return
        for key in sorted(self.gone):
            if stop.is_set():
                return
            if key in self.registry.snapshot:
                self._forget(key)
                continue
            try:
                empty = await self._swept(key, stop)
            except Exception as e:  # this inbox's turn failed: the others still get theirs
                log.warning("inbox_sweep_failed", tenant=key[0], agent=key[1], error=repr(e)[:200])
                continue
            if not empty:
                self._empty_since.pop(key, None)
            elif time.monotonic() - self._empty_since.setdefault(key, time.monotonic()) >= (
                GONE_GRACE_SECONDS
            ):
                self._forget(key)

    def _forget(self, key: AgentKey) -> None:
        self.gone.discard(key)
        self._empty_since.pop(key, None)

    async def _swept(self, key: AgentKey, stop: asyncio.Event) -> bool:
        """Reroute what ``key``'s inbox consumer has to deliver; whether it holds nothing
        more (nothing delivered and unsettled either)."""
        tenant, agent = key
        durable = await self._consumer(tenant, agent)
        if durable is None:
            return True
        sub = await self.js.pull_subscribe_bind(durable=durable, stream=Stream.ROUTES)
        rerouted = self.stats.rerouted
        try:
            while not stop.is_set() and key not in self.registry.snapshot:
                try:
                    batch = await sub.fetch(_FETCH_BATCH, timeout=_FETCH_TIMEOUT)
                except (nats.errors.TimeoutError, TimeoutError):
                    break
                for done, message in enumerate(batch):
                    try:
                        await self._reroute(message, tenant, agent)
                    except BaseException:
                        for left in batch[done + 1 :]:  # else each waits out the ack_wait
                            with contextlib.suppress(Exception):
                                await left.nak()
                        raise
            info = await sub.consumer_info()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.stats.rerouted > rerouted:
            log.info(
                "inbox_swept",
                tenant=tenant,
                agent=agent,
                consumer=durable,
                rerouted=self.stats.rerouted - rerouted,
            )
        return not info.num_pending and not info.num_ack_pending

    async def _consumer(self, tenant: str, agent: str) -> str | None:
        """The consumer that reads ``agent``'s inbox (the SDK's name, or the one before
        tenants); ``None`` when there is none. An inbox without one is not swept (logged
        when it holds records): the consumer may have been lost (deleted, ``ROUTES``
        restored) after instances ran what it holds, and nothing tells which they ran; a
        consumer made from its first record would route those again."""
        inbox = inbox_subject(tenant, agent)
        for durable in inbox_consumer_names(tenant, agent):
            try:
                info = await self.js.consumer_info(Stream.ROUTES, durable)
            except NotFoundError:
                continue
            if info.config.filter_subject == inbox:
                return durable
        held = await self.js.stream_info(Stream.ROUTES, subjects_filter=inbox)
        if count := (held.state.subjects or {}).get(inbox):
            log.warning(
                "inbox_not_swept",
                tenant=tenant,
                agent=agent,
                records=count,
                why="no consumer reads this inbox: which records an instance ran is unknown",
            )
        return None

    async def _reroute(self, message: Msg, tenant: str, agent: str) -> None:
        """Hand one decision of a gone agent's inbox to the retries (a ``RouteFailed``,
        reason ``deregistered``), then ack it; handed back (nak) when the failure cannot be
        appended."""
        headers: dict[str, Any] = dict(message.headers or {})
        try:
            route = RouteDecided.from_headers(headers)
        except RouteEventUnreadable as e:
            self.stats.unreadable += 1
            log.error(
                "inbox_sweep_unreadable",
                subject=message.subject,
                seq=message.metadata.sequence.stream,
                error=e.message,
            )
            await message.term()
            return
        if route.mirror or route.tenant != tenant or route.decision.agent != agent:
            self.stats.mirrors += 1  # a shadow's copy: nobody waits for its answer
            await message.ack()
            return
        why = f"agent {agent!r} was deregistered before it ran the message"
        seq = message.metadata.sequence.stream
        failure = RouteFailed(route, FailureReason.DEREGISTERED, why, self.instance, seq)
        trace = {k: v for k, v in headers.items() if k.lower() in tracing.W3C_HEADERS}
        try:
            await self.js.publish(failure.subject, b"", headers=failure.to_headers(trace))
        except Exception:
            with contextlib.suppress(Exception):
                await message.nak(delay=1.0)
            raise
        self.stats.rerouted += 1
        await message.ack()
