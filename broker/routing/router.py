"""The router: a projection of ``MESSAGES`` (+ registry + live load) into ``ROUTES``.

A router process reads ``MESSAGES`` through the shared durable pull consumer ``router``
(several router processes split the work) and routes every message stored with
``Broker-Route-Mode: auto`` (``POST /v1/route`` sets it; other messages are acked and
skipped). For each it scores the tenant's agents (:mod:`broker.routing.scoring`), appends
``RouteDecided`` to the chosen agent's inbox ``route.<tenant>.<agent>`` (and a copy to a
shadow agent when the policy mirrors), or to ``route.<tenant>.-.dead`` and then
``dlq.<tenant>.route`` when nobody qualifies, and only then acks the message. Decisions
carry a ``Nats-Msg-Id`` per message and attempt, so a router killed between the append and
the ack cannot route a message twice (an id found held by a record on an agent's subject is
appended again without it: :meth:`Router._stored`).

Failures come back as ``RouteFailed`` on ``route.<tenant>.<agent>.failed``. Every router
follows them (ordered consumer) to keep the same cooldowns; one of them (durable consumer
``router-retries``) sends a retryable failure to the next candidate, until the policy's
``max_attempts``; then the message goes to the DLQ and the waiting caller, if any, hears
``agent_error``. A decision for nobody is recorded in ``ROUTES`` before the DLQ (see
:meth:`Router._record`).

When the stored message names a ``Broker-Decision-To`` subject (the ingress waiting in
``POST /v1/route``), the router tells it the decision over core NATS after the append.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import nats.errors
import orjson
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, RawStreamMsg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from broker.envelope import NATS_MSG_ID, PAYLOAD_HEADERS, Outbound
from broker.errors import BrokerError, Unavailable
from broker.natsconn import get_stored
from broker.publisher import PublishAck, Publisher
from broker.registry.snapshot import RegistryView
from broker.routing.cooldown import Cooldowns
from broker.routing.events import (
    H_DEADLINE,
    H_DECISION_TO,
    H_ERROR,
    H_REPLY_TO,
    H_ROUTE_MODE,
    ROUTE_MODE_AUTO,
    FailureReason,
    RouteDecided,
    RouteEventUnreadable,
    RouteFailed,
    deadline_of,
    original_headers,
    tenant_of,
)
from broker.routing.load import LoadView
from broker.routing.orphans import InboxSweeper
from broker.routing.policy import Policy
from broker.routing.replies import (
    error_answer,
    error_subject,
    is_reply,
    stored_answer,
    stored_decision,
)
from broker.routing.scoring import Scorer
from broker.routing.types import Decision, DecisionReason
from broker.streams import (
    DECISION_ID_KEY,
    KEYS_BUCKET,
    SUBJECT_PREFIX,
    Stream,
    attempts_spec,
    dlq_subject,
    is_decision_subject,
    keys_spec,
    open_bucket,
)
from broker.telemetry import metrics, tracing

log = structlog.get_logger(__name__)

ROUTER_CONSUMER = "router"
RETRY_CONSUMER = "router-retries"
_BATCH = 256
#: A message whose decision raised something unexpected is delivered this many times (each
#: after this many seconds), then dead-lettered with the error.
_MAX_FAILED_DELIVERIES = 3
_ESSENTIAL_HEADERS = PAYLOAD_HEADERS | frozenset(
    name.lower() for name in (H_ROUTE_MODE, H_DECISION_TO, H_REPLY_TO, H_DEADLINE)
)
_FAILED_DECISION_DELAY = 2.0
_FETCH_TIMEOUT = 1.0
_ACK_WAIT = 30.0


async def decision_id_key(js: JetStreamContext, patience: float = 60.0) -> bytes:
    """The key every router hashes its decisions' ``Nats-Msg-Id`` with, from the
    ``broker_keys`` bucket: 32 random bytes, put there by the first router that finds none.
    The bucket is made (with ``ROUTES``' replicas) when ``broker serve`` has not provisioned
    it yet, so no router ever runs with another key than the others (their decisions made
    again after a crash would not be deduplicated). Errors (a stream still electing its
    leader, a replica that has not seen a key just made) are retried for ``patience``
    seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return await _read_or_make_key(js)
        except Exception as e:
            if time.monotonic() >= deadline:
                raise
            log.warning("decision_id_key_unavailable", error=repr(e)[:200])
            await asyncio.sleep(1.0)


async def _routers_bucket(js: JetStreamContext, spec: Callable[[int], KeyValueConfig]) -> KeyValue:
    """A bucket of the routers' own, opened, or made with ``ROUTES``' replicas when ``broker
    serve`` has not provisioned it (a router started on its own)."""
    replicas = (await js.stream_info(Stream.ROUTES)).config.num_replicas or 1
    return await open_bucket(js, spec(replicas))


async def _read_or_make_key(js: JetStreamContext) -> bytes:
    kv = await _routers_bucket(js, keys_spec)
    with contextlib.suppress(KeyWrongLastSequenceError):  # another router made it: read it
        await kv.create(DECISION_ID_KEY, secrets.token_bytes(32))
    entry = await kv.get(DECISION_ID_KEY)
    if not entry.value or len(entry.value) < 16:
        raise RuntimeError(f"{KEYS_BUCKET}/{DECISION_ID_KEY} holds no usable key")
    return entry.value


def _taken(route: RouteDecided, ack: PublishAck, subject: str | None) -> bool:
    """Whether ``subject``, where the append of ``route`` found its ``Nats-Msg-Id`` stored,
    is no decision subject: an agent sent that id first (logged)."""
    if is_decision_subject(subject or "", route.tenant):
        return False
    log.warning(
        "route_id_taken",
        message_seq=route.message_seq,
        attempt=route.attempt,
        mirror=route.mirror,
        by_subject=subject,
        seq=ack.seq,
    )
    return True


@dataclass(slots=True)
class RouterStats:
    routed: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    retried: int = 0
    failures_seen: int = 0
    failures_repeated: int = 0  # a failure stored again after its retry was decided
    failures_answered: int = 0  # a failure of a message an agent's stored reply answered
    errors: int = 0


def decision_rng(tenant: str, message_seq: int, attempt: int) -> random.Random:
    """A generator seeded by the message, so re-scoring a recorded decision under the same
    inputs makes the same choice (``broker routes simulate`` relies on it)."""
    return random.Random(f"{tenant}:{message_seq}:{attempt}")


def _headers(message: Msg) -> dict[str, str]:
    return dict(message.headers or {})


class Router:
    """One router process's routing loop. ``run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        publisher: Publisher,
        scorer: Scorer,
        policy: Policy,
        registry: RegistryView,
        loads: LoadView,
    ) -> None:
        self.publisher = publisher
        self.scorer = scorer
        self.policy = policy
        self.registry = registry
        self.loads = loads
        cooldown = policy.cooldown
        self.cooldowns = Cooldowns(cooldown.errors, cooldown.window_s, cooldown.duration_s)
        self.stats = RouterStats()
        self._failure_watch: Any = None
        #: The key of the decisions' ``Nats-Msg-Id`` (:func:`decision_id_key`), read at the
        #: start of :meth:`run` (``None``, unkeyed ids, only for a router used without it).
        self.id_key: bytes | None = None
        self._attempts: KeyValue | None = None  # ATTEMPTS_BUCKET, opened at the first retry
        #: Takes back what deregistered agents' inboxes hold (:mod:`broker.routing.orphans`);
        #: made by :meth:`run`, on the connection.
        self.sweeper: InboxSweeper | None = None

    @property
    def js(self) -> JetStreamContext:
        return self.publisher.js

    def set_policy(self, policy: Policy) -> None:
        """Route by ``policy`` from the next decision on (a policy file edited while the
        router runs). Cooldowns running and failures counted stay; the new limits apply to
        the failures to come."""
        self.policy = policy
        self.scorer.set_policy(policy)
        cooldown = policy.cooldown
        self.cooldowns.configure(cooldown.errors, cooldown.window_s, cooldown.duration_s)

    # --- decisions -----------------------------------------------------------------

    def decide(
        self,
        tenant: str,
        payload: bytes,
        headers: Mapping[str, str],
        *,
        message_seq: int,
        attempt: int = 1,
        exclude: Sequence[str] = (),
    ) -> Decision:
        loads = self.loads.loads(tenant)
        return self.scorer.decide(
            self.registry.snapshot,
            tenant,
            payload,
            headers,
            loads,
            live=loads if self.policy.require_live else None,
            cooling=self.cooldowns.cooling(tenant),
            exclude=exclude,
            rng=decision_rng(tenant, message_seq, attempt),
        )

    async def route_message(self, message: Msg) -> None:
        """Route one stored message (or skip it) and ack it once the decision is stored."""
        headers = _headers(message)
        if headers.get(H_ROUTE_MODE) != ROUTE_MODE_AUTO:
            self.stats.skipped += 1
            await message.ack()
            return
        seq = message.metadata.sequence.stream
        tenant = tenant_of(message.subject)
        with tracing.span("route", parent_headers=headers, kind=tracing.SpanKind.CONSUMER) as span:
            started = time.perf_counter()
            decision = await self._guarded(
                message, lambda: self.decide(tenant, message.data, headers, message_seq=seq)
            )
            if decision is None:  # handed back for another delivery
                return
            metrics.route_decided(
                tenant, decision.agent, decision.reason, time.perf_counter() - started
            )
            if span.is_recording():
                span.set_attribute("broker.route.agent", decision.agent or "")
                span.set_attribute("broker.route.reason", str(decision.reason))
            route = RouteDecided(
                tenant=tenant, message_seq=seq, message_subject=message.subject, decision=decision
            )
            await self._deliver(route, message.data, headers)
        await message.ack()

    async def _guarded(self, message: Msg, decide: Callable[[], Decision]) -> Decision | None:
        """``decide()``, whatever it raises. A :class:`BrokerError` (a header the ingress let
        through but scoring refuses) refuses the message. Anything else (a bug, the model
        failing on this text) hands it back for another delivery (``None``), and after
        :data:`_MAX_FAILED_DELIVERIES` refuses it: one poison message must not stop the
        router, nor come back forever."""
        try:
            return decide()
        except BrokerError as e:
            return _refused(e.message, self.policy)
        except Exception as e:
            self.stats.errors += 1
            delivered = message.metadata.num_delivered
            log.exception("route_decision_failed", subject=message.subject, delivered=delivered)
            if delivered < _MAX_FAILED_DELIVERIES:
                with contextlib.suppress(Exception):
                    await message.nak(delay=_FAILED_DECISION_DELAY)
                return None
            why = f"{type(e).__name__}: {str(e)[:200]}"
            return _refused(f"deciding it failed on {delivered} deliveries ({why})", self.policy)

    async def _deliver(
        self,
        route: RouteDecided,
        payload: bytes,
        headers: dict[str, str],
        *,
        dead: str = "no_route",
    ) -> None:
        """:meth:`_deliver_once`; a decision that cannot be stored whatever the retries (the
        message's own headers, with the decision's, past what NATS allows) is replaced by
        a decision for nobody, stored with only the headers routing needs: the message goes
        to the DLQ and a waiting caller hears why, instead of the router handing it back
        every second for ever."""
        try:
            await self._deliver_once(route, payload, headers, dead=dead)
        except BrokerError as e:
            if e.retryable:
                raise
            log.warning(
                "route_not_storable", message_seq=route.message_seq, error_code=e.error_code
            )
            refused = _refused(f"its decision cannot be stored: {e.message}", self.policy)
            dead_route = replace(route, mirror=False, decision=refused)
            await self._deliver_once(dead_route, payload, _essential(headers), dead=e.error_code)

    async def _deliver_once(
        self,
        route: RouteDecided,
        payload: bytes,
        headers: dict[str, str],
        *,
        dead: str,
    ) -> None:
        """Record the decision (and a mirror copy), then tell whoever waits; a decision for
        nobody answers a waiting caller with the error code ``dead``."""
        mirror_to = route.decision.mirror_to
        if mirror_to and route.decision.agent is not None and route.attempt == 1:
            shadow = replace(route, mirror=True, decision=replace(route.decision, agent=mirror_to))
            (route, ack), copied = await asyncio.gather(
                self._record(route, payload, headers), self._append(shadow, payload, headers)
            )
            if copied.duplicate and await self._id_taken(shadow, copied):
                await self._append(shadow, payload, headers, deduplicated=False)
        else:
            route, ack = await self._record(route, payload, headers)
        if route.decision.agent is None:
            if not ack.duplicate:  # not when stored before (decided again after a crash)
                self.stats.dead_lettered += 1
                metrics.dead_lettered("route")
            await self._answer_error(headers, route, dead)
        else:
            self.stats.routed += 1
        await self._notify_decision(headers, route, ack)
        log.debug(
            "route_decided",
            tenant=route.tenant,
            message_seq=route.message_seq,
            agent=route.decision.agent,
            reason=route.decision.reason,
            attempt=route.attempt,
        )

    async def _record(
        self, route: RouteDecided, payload: bytes, headers: dict[str, str]
    ) -> tuple[RouteDecided, PublishAck]:
        """Append ``route`` to ``ROUTES``, then, for nobody, to the DLQ; the decision that
        stands and its ack (the DLQ's, for nobody).

        Every decision goes to ``ROUTES`` first, since that append is deduplicated per
        message and attempt: a message decided again after a crash keeps its first decision
        even when the two differ in kind. Two streams, each deduplicating on its own, would
        keep both: the message in an agent's inbox and in the DLQ."""
        ack = await self._append(route, payload, headers)
        if ack.duplicate:  # decided before (this router crashed before its ack): that stands
            kept = await self._stored(route, ack)
            if kept is None:  # the id was taken by something else: stored without it
                ack = await self._append(route, payload, headers, deduplicated=False)
            else:
                route = kept
        if route.decision.agent is None:
            ack = await self._append(route, payload, headers, to=dlq_subject(route.tenant))
        return route, ack

    async def _stored(self, route: RouteDecided, ack: PublishAck) -> RouteDecided | None:
        """The decision the stream holds for ``route``'s message and attempt. A redelivered
        message is decided again, maybe differently (the loads moved); its append is
        deduplicated (``Nats-Msg-Id``), so the first decision is the one an agent gets, and
        the one to tell the caller.

        ``None`` when what holds the id is no decision: an agent's user may publish its own
        ``.failed`` and ``.reply`` subjects with any header, a guessed ``Nats-Msg-Id``
        included, which would otherwise keep the message from ever being routed. Raises
        :class:`Unavailable` (the message is handed back) when the record cannot be read:
        taking it for a decision could leave the message in no inbox."""
        stored = await self._holder(route, ack)
        if _taken(route, ack, stored.subject):
            return None
        try:
            kept = RouteDecided.from_headers(stored.headers or {})
        except RouteEventUnreadable as e:  # a decision, unreadable: the new one is a guess
            log.warning("route_stored_unreadable", seq=ack.seq, error=e.message)
            return route
        if kept.decision.agent != route.decision.agent:
            log.info(
                "route_decided_before",
                message_seq=route.message_seq,
                stored=kept.decision.agent,
                now=route.decision.agent,
            )
        return kept

    async def _id_taken(self, route: RouteDecided, ack: PublishAck) -> bool:
        """Whether the record that holds ``route``'s ``Nats-Msg-Id`` is no decision (see
        :meth:`_stored`)."""
        return _taken(route, ack, (await self._holder(route, ack)).subject)

    async def _holder(self, route: RouteDecided, ack: PublishAck) -> RawStreamMsg:
        """The record an append of ``route`` was deduplicated against; :class:`Unavailable`
        when it cannot be read (the message is handed back and decided again)."""
        try:
            return await get_stored(self.js, ack.stream, ack.seq)
        except Exception as e:
            raise Unavailable(
                f"cannot read record {ack.seq} of {ack.stream}, which holds the id of the "
                f"decision for message {route.message_seq}: {e!r}"[:300]
            ) from e

    async def _append(
        self,
        route: RouteDecided,
        payload: bytes,
        headers: Mapping[str, str],
        *,
        to: str | None = None,
        deduplicated: bool = True,
    ) -> PublishAck:
        """Append ``route`` on its subject in ``ROUTES``, or on ``to``; without its
        ``Nats-Msg-Id`` unless ``deduplicated``."""
        stored = route.to_headers(headers, id_key=self.id_key)
        if not deduplicated:
            del stored[NATS_MSG_ID]
        return await self.publisher.publish(Outbound(to or route.subject, payload, stored))

    async def _notify_decision(
        self, headers: Mapping[str, str], route: RouteDecided, ack: PublishAck
    ) -> None:
        to = headers.get(H_DECISION_TO)
        if not to:
            return
        body = {**route.record(), "route_seq": ack.seq, "route_stream": ack.stream}
        with contextlib.suppress(Exception):  # the waiter may be gone; the decision is stored
            await self.publisher.nc.publish(to, orjson.dumps(body))

    async def _answer_error(
        self, headers: Mapping[str, str], route: RouteDecided, code: str
    ) -> None:
        """Answer a waiting caller with the error ``code``: stored first (a retried request
        finds it there, see :mod:`broker.routing.replies`), then sent to the caller."""
        to = headers.get(H_REPLY_TO)
        if not to:
            return
        body, answer = error_answer(code, route.decision.detail)
        try:
            await self.publisher.publish(
                Outbound(error_subject(route.tenant, route.message_seq), body, answer)
            )
        except BrokerError as e:
            if e.retryable:  # handed back: decided again, deduplicated, and stored then
                raise
            log.warning(  # the caller still hears it; only a retry of the request misses it
                "route_answer_not_stored", message_seq=route.message_seq, error=e.message
            )
        with contextlib.suppress(Exception):  # the caller may be gone; the answer is stored
            await self.publisher.nc.publish(to, body, headers={H_ERROR: answer[H_ERROR]})

    # --- failures and retries ----------------------------------------------------------

    def observe_failure(self, failure: RouteFailed) -> None:
        self.stats.failures_seen += 1
        if self._believed(failure).reason is FailureReason.DEREGISTERED:  # no agent's fault
            return
        route = failure.route
        attempt = (route.message_seq, route.attempt)
        if self.cooldowns.record_failure(route.tenant, failure.agent, failure=attempt):
            log.info("agent_cooling_down", tenant=route.tenant, agent=failure.agent)

    def _believed(self, failure: RouteFailed) -> RouteFailed:
        """``failure``, or the same as an ``error`` when it says ``deregistered`` of an agent
        that is registered: an agent's NATS user may write that reason on its own
        ``.failed`` subject, to escape its cooldown (the sweep that writes it runs only once
        the agent left the registry). Believed of a decision older than the agent's current
        registration (or manifest update): swept before it was registered again."""
        if failure.reason is not FailureReason.DEREGISTERED:
            return failure
        record = self.registry.snapshot.get((failure.route.tenant, failure.agent))
        if record is None or (
            record.updated_at is not None and failure.route.decided_at < record.updated_at
        ):  # gone, or registered again since the decision: a sweep's (after a re-register)
            return failure
        return replace(failure, reason=FailureReason.ERROR)

    async def retry(self, message: Msg) -> None:
        """Send a failed routed message to the next candidate, or give up."""
        headers = _headers(message)
        failure = _failure(message, headers)
        if failure is not None:
            failure = self._believed(failure)
        failed = None if failure is None else await self._failed_decision(failure, headers)
        if failure is None or failed is None:
            await message.ack()
            return
        route, payload, original = failed
        attempts = await self._attempts_bucket()
        claim = f"{route.tenant}.{route.message_seq}"
        if await _highest_attempt(attempts, claim) > route.attempt:
            # The failure was stored twice (an agent that died before its ack ran the message
            # again), past ROUTES' duplicate window: its next attempt is decided already.
            log.info(
                "route_failure_already_retried",
                message_seq=route.message_seq,
                attempt=route.attempt,
                agent=failure.agent,
            )
            self.stats.failures_repeated += 1
            await message.ack()
            return
        if original.get(H_REPLY_TO) and await self._answered(route):
            await message.ack()
            return
        deadline = deadline_of(original)
        expired = deadline is not None and time.time() >= deadline
        if failure.retryable and not expired and route.attempt < self.policy.max_attempts:
            exclude = (*route.tried, failure.agent)
            # A retry's text may be new to a costly model: embed it on the model's thread,
            # not on this loop (waiting there behind a batch would stall every other loop).
            await self.scorer.prepare(self.registry.snapshot, [(route.tenant, payload, original)])
            decision = await self._guarded(
                message,
                lambda: self.decide(
                    route.tenant,
                    payload,
                    original,
                    message_seq=route.message_seq,
                    attempt=route.attempt + 1,
                    exclude=exclude,
                ),
            )
            if decision is None:  # handed back for another delivery
                return
            self.stats.retried += 1
            if decision.agent is None:  # nobody left to try: the agents' failure is the answer
                decision = replace(decision, detail=f"{_failed(failure)}; {decision.detail}")
                await self._deliver(
                    route.next_attempt(decision), payload, original, dead="agent_error"
                )
            else:
                await self._deliver(route.next_attempt(decision), payload, original)
        else:
            why = "its deadline passed" if expired or not failure.retryable else "attempts ran out"
            detail = f"{_failed(failure)}; not retried: {why} after attempt {route.attempt}"
            final = Decision(
                agent=None,
                capability=None,
                reason=DecisionReason.NO_CANDIDATE,
                detail=detail,
                candidates=route.decision.candidates,
                policy_version=self.policy.version,
            )
            dead = replace(route.next_attempt(final), attempt=route.attempt + 1)
            code = "deadline_exceeded" if expired or not failure.retryable else "agent_error"
            await self._deliver(dead, payload, original, dead=code)
        # After the append: a router that dies before this decides again, deduplicated
        # (its failure comes back within ROUTES' duplicate window).
        await attempts.put(claim, b"%d" % (route.attempt + 1))
        await message.ack()

    async def _answered(self, route: RouteDecided) -> bool:
        """Whether an agent's reply to ``route``'s message is stored (logged when it is): an
        agent that replied and lost its ack (it died, its connection dropped) runs the
        message again, and its failure then (past the deadline: ``expired``) would
        dead-letter a message its caller has had the answer to, or run it on another agent.
        Raises :class:`Unavailable` (handed back) when ``ROUTES`` cannot be read."""
        try:
            answer = await stored_answer(self.js, route.tenant, route.message_seq)
        except Exception as e:
            raise Unavailable(
                f"cannot read the answers to message {route.message_seq}: {e!r}"[:300]
            ) from e
        if answer is None or not is_reply(answer):
            return False
        log.info(
            "route_failure_after_reply",
            message_seq=route.message_seq,
            attempt=route.attempt,
            agent=route.decision.agent,
        )
        self.stats.failures_answered += 1
        return True

    async def _failed_decision(
        self, failure: RouteFailed, headers: Mapping[str, str]
    ) -> tuple[RouteDecided, bytes, dict[str, str]] | None:
        """The decision ``failure`` (stored with ``headers``) reports on, as ``ROUTES``
        stores it at the failure's ``route_seq``: the route, its payload, and the routed
        message's headers, with the failure's trace context (the retry continues the
        agent's trace).

        ``None`` (logged) when there is no such decision for the failing agent: an agent's
        NATS user may write anything on its ``.failed`` subject, and retrying what it wrote
        would route its payload to the tenant's other agents as that message, and record
        an attempt that keeps the genuine failure from being retried. Raises
        :class:`Unavailable` (handed back) when the decision cannot be read."""
        route, seq = failure.route, failure.route_seq
        if seq is None:
            why = "it names no decision (no Broker-Route-Seq: sent by an older agent SDK)"
            _unverifiable(failure, why)
            return None
        try:
            found = await stored_decision(self.js, seq, route.tenant, failure.agent)
        except NotFoundError:
            _unverifiable(failure, f"ROUTES holds no record {seq} (aged out, or never stored)")
            return None
        except Exception as e:
            raise Unavailable(
                f"cannot read record {seq} of ROUTES, the decision a failure names: {e!r}"[:300]
            ) from e
        if found is None or _claim(found[1]) != _claim(route):
            log.warning(
                "route_failure_forged",
                subject=failure.subject,
                route_seq=seq,
                message_seq=route.message_seq,
                attempt=route.attempt,
                why="not the decision stored there for this agent",
            )
            return None
        stored, decided = found
        kept = original_headers(stored.headers or {})
        original = {k: v for k, v in kept.items() if k.lower() not in tracing.W3C_HEADERS}
        original.update((k, v) for k, v in headers.items() if k.lower() in tracing.W3C_HEADERS)
        return decided, stored.data or b"", original

    async def _attempts_bucket(self) -> KeyValue:
        if self._attempts is None:
            self._attempts = await _routers_bucket(self.js, attempts_spec)
        return self._attempts

    async def _on_failure_event(self, message: Msg) -> None:
        failure = _failure(message, _headers(message))
        if failure is not None:
            self.observe_failure(failure)

    # --- the loops -----------------------------------------------------------------------

    async def _pull(self, stream: Stream, durable: str, subject: str) -> Any:
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=_ACK_WAIT,
            max_ack_pending=20_000,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subject,
        )
        return await self.js.pull_subscribe(subject, durable=durable, stream=stream, config=config)

    async def run(self, stop: asyncio.Event) -> None:
        """Route until ``stop`` is set; a batch in progress finishes first."""
        self.id_key = await decision_id_key(self.js)
        routes = SUBJECT_PREFIX[Stream.ROUTES]
        failed = f"{routes}.*.*.failed"
        self._failure_watch = await self.js.subscribe(
            failed,
            stream=Stream.ROUTES,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            cb=self._on_failure_event,
        )
        messages = await self._pull(
            Stream.MESSAGES, ROUTER_CONSUMER, f"{SUBJECT_PREFIX[Stream.MESSAGES]}.>"
        )
        retries = await self._pull(Stream.ROUTES, RETRY_CONSUMER, failed)
        self.sweeper = sweeper = InboxSweeper(self.publisher.nc, self.js, self.registry)
        log.info("router_started", policy=self.policy.version, embedder=self.scorer.embedder.name)
        try:
            await asyncio.gather(
                self._loop(messages, self.route_message, stop, prepare=self._embed_ahead),
                self._loop(retries, self.retry, stop),
                sweeper.run(stop),
            )
        finally:
            # Unsubscribed here, not left to the connection's drain: nats-py's fetch never marks
            # a pull subscription's queued messages done, so a drain would wait on them until
            # its timeout (and log the cancelled wait as an error).
            for sub in (self._failure_watch, messages, retries):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            log.info("router_stopped", **asdict(self.stats), swept=asdict(sweeper.stats))

    async def _embed_ahead(self, batch: Sequence[Msg]) -> None:
        """With a costly embedder: embed what deciding the batch's routed messages needs at
        once, on the model's thread (:meth:`Scorer.prepare`)."""
        if not self.scorer.costly:
            return
        routed = []
        for message in batch:
            headers = _headers(message)
            if headers.get(H_ROUTE_MODE) == ROUTE_MODE_AUTO:
                routed.append((tenant_of(message.subject), message.data, headers))
        await self.scorer.prepare(self.registry.snapshot, routed)

    async def _loop(
        self,
        sub: Any,
        handle: Any,
        stop: asyncio.Event,
        prepare: Callable[[Sequence[Msg]], Awaitable[None]] | None = None,
    ) -> None:
        while not stop.is_set():
            try:
                batch: list[Msg] = await sub.fetch(_BATCH, timeout=_FETCH_TIMEOUT)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return
            except Exception as e:  # NATS hiccup: wait a little and fetch again
                log.warning("router_fetch_failed", error=str(e)[:200])
                await asyncio.sleep(0.5)
                continue
            if prepare is not None:
                await _in_progress_while(batch, prepare(batch))
            for done, message in enumerate(batch):
                try:
                    await handle(message)
                except BrokerError as e:  # could not append: leave unacked, redelivered later
                    self.stats.errors += 1
                    log.warning("route_append_failed", error_code=e.error_code, message=e.message)
                    if e.retryable and stop.is_set():
                        # Stopping, and NATS is gone or not answering: each message left would
                        # wait out its own ack timeout (a batch of them, minutes). They stay
                        # unacked and come back after the ack wait, to this router or another.
                        log.info("router_batch_left", left=len(batch) - done)
                        return
                    await _hand_back(message, delay=1.0, retryable=e.retryable)
                except Exception:  # a bug or a message no step expected: never the loop's end
                    self.stats.errors += 1
                    log.exception("route_message_failed", subject=message.subject)
                    await _hand_back(message, delay=_FAILED_DECISION_DELAY, retryable=False)


async def _hand_back(message: Msg, *, delay: float, retryable: bool) -> None:
    """Redeliver a message that failed (after ``delay``); one that failed for a reason that
    does not pass, on :data:`_MAX_FAILED_DELIVERIES` deliveries, is terminated instead (and
    logged): handed back for ever, it would cost a try every ``delay`` seconds."""
    delivered = message.metadata.num_delivered
    with contextlib.suppress(Exception):  # gone with the connection: redelivered anyway
        if retryable or delivered < _MAX_FAILED_DELIVERIES:
            await message.nak(delay=delay)
            return
        log.error("route_message_dropped", subject=message.subject, delivered=delivered)
        await message.term()


def _essential(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a decision for nobody keeps when the message's own are too large to
    store with it: how to read the payload and who waits for an answer."""
    return {k: v for k, v in headers.items() if k.lower() in _ESSENTIAL_HEADERS}


async def _in_progress_while(batch: Sequence[Msg], step: Awaitable[None]) -> None:
    """Run a batch step (embedding the batch ahead), telling JetStream every third of the ack
    wait that each message of the batch is in progress (``+WPI``), so none is delivered again
    while it runs however long it takes (256 texts at the model's 256 tokens each took ~28 s
    in NumPy on 2 cores, a larger model through the extra several times that; short texts
    take under a second). Each message then has at least two thirds of the ack wait left to
    be decided and acked."""
    task = asyncio.ensure_future(step)
    try:
        while not (await asyncio.wait({task}, timeout=_ACK_WAIT / 3))[0]:
            for message in batch:
                with contextlib.suppress(Exception):  # gone with the connection: redelivered
                    await message.in_progress()
        task.result()
    finally:
        task.cancel()  # a no-op once it is done; the router stopping otherwise


def _refused(why: str, policy: Policy) -> Decision:
    return Decision(
        agent=None,
        capability=None,
        reason=DecisionReason.NO_CANDIDATE,
        detail=f"the message cannot be routed: {why}",
        candidates=(),
        policy_version=policy.version,
    )


async def _highest_attempt(bucket: KeyValue, claim: str) -> int:
    """The highest attempt decided for the failed message ``claim`` (``<tenant>.<seq>``);
    0 when none is recorded."""
    try:
        entry = await bucket.get(claim)
    except KeyNotFoundError:
        return 0
    value = entry.value or b""
    return int(value) if value.isdigit() else 0


def _failure(message: Msg, headers: dict[str, str]) -> RouteFailed | None:
    """The ``RouteFailed`` a message carries, or ``None`` (logged) when it cannot be read or
    is not its sender's to say: an agent may publish only on its own
    ``route.<tenant>.<agent>.failed`` (docs/tenants.md), so a failure whose route names
    another tenant or agent than that subject is forged, and retrying it would send its
    payload and reply subject into another tenant's inboxes, or cool another agent down.
    Shadow (mirror) routes never fail: their agents record nothing."""
    try:
        failure = RouteFailed.from_headers(headers)
    except RouteEventUnreadable as e:
        log.warning("route_failure_unreadable", subject=message.subject, error=e.message)
        return None
    if failure.route.mirror or message.subject != failure.subject:
        log.warning(
            "route_failure_forged",
            subject=message.subject,
            claims=failure.subject[:300],
            mirror=failure.route.mirror,
        )
        return None
    return failure


def _claim(route: RouteDecided) -> tuple[str, int, int, str | None]:
    """What a failure's route must share with the decision stored where it points."""
    return route.tenant, route.message_seq, route.attempt, route.decision.agent


def _unverifiable(failure: RouteFailed, why: str) -> None:
    """Log a failure whose decision cannot be checked (it is acked unretried)."""
    log.warning(
        "route_failure_unverifiable",
        subject=failure.subject,
        message_seq=failure.route.message_seq,
        why=why,
    )


def _failed(failure: RouteFailed) -> str:
    """What an agent's failure says, for a dead letter's detail and the waiting caller."""
    if failure.reason is FailureReason.DEREGISTERED:
        return f"{failure.message[:200]} (taken back by {failure.instance[:100]})"
    return f"agent {failure.agent!r} failed ({failure.reason}: {failure.message[:200]})"
