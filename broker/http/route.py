"""``POST /v1/route/{subject}``: append a message for routing, answer with the decision or
(``wait=true``) with the chosen agent's reply.

The handler only translates. The message is appended to ``MESSAGES`` like any publish,
with ``Broker-Route-Mode: auto`` so a router routes it, and with core NATS subjects where
this ingress process waits: ``Broker-Decision-To`` (the router says what it decided) and,
with ``wait``, ``Broker-Reply-To`` and ``Broker-Deadline`` (the agent answers, or stops
at the deadline). One wildcard subscription per process serves every waiting request.

If no decision comes within ``route_decision_timeout`` (no router running), the answer is
``202`` with ``decision: null``: the message is stored and is routed when a router runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from broker.envelope import (
    CONTENT_TYPE,
    H_CONTENT_TYPE,
    H_IDEMPOTENCY_KEY,
    NDJSON_TYPES,
    REQUEST_DIGEST,
    check_media_type,
    media_type,
    validate_subject,
)
from broker.errors import (
    AgentFailed,
    AlreadyRouted,
    BrokerError,
    DeadlineExceeded,
    NoRoute,
    Unavailable,
    Unprocessable,
)
from broker.http._rsgi import HTTPProtocol, Scope, read_body, respond_json
from broker.http.publish import body_request
from broker.http.state import IngressState
from broker.natsconn import get_stored, subscribe_detached
from broker.publisher import Publisher
from broker.routing.events import (
    H_AGENT,
    H_DEADLINE,
    H_DECISION_TO,
    H_ERROR,
    H_REPLY_TO,
    H_ROUTE_MODE,
    ROUTE_MODE_AUTO,
    deadline_of,
)
from broker.routing.features import extract
from broker.routing.replies import Answer, answers_subject, genuine, stored_answer
from broker.streams import Stream

# Request headers a router reads, copied into the stored message as they came.
ROUTING_HEADERS = {
    "broker-intent": "Broker-Intent",
    "broker-text": "Broker-Text",
    "broker-embedding": "Broker-Embedding",
    "broker-embedding-model": "Broker-Embedding-Model",
    "x-env": "X-Env",
}
_MAX_ROUTING_HEADER = 32 * 1024
# Together: the stored message's headers (NATS: 64 KiB) also hold the pass-through ones.
_MAX_ROUTING_HEADERS = 40 * 1024
_DEFAULT_WAIT = 30.0
#: Seconds a retried request still waits after the first one's deadline: an answer given
#: just before it may not be stored yet (and another ingress's clock may differ a little).
_DEADLINE_GRACE = 1.0
#: How long a waiting request looks for its answer in ``ROUTES`` (after a reconnection, or
#: at its deadline) before it gives up on it.
_STORED_LOOKUP_SECONDS = 2.0
#: Such lookups of one ingress process in flight at once.
_LOOKUPS_AT_ONCE = 16
_ERRORS: dict[str, type[BrokerError]] = {
    "no_route": NoRoute,
    "agent_error": AgentFailed,
    "deadline_exceeded": DeadlineExceeded,
}


#: The subjects routers and agents answer a waiting ``POST /v1/route`` on (the decision, the
#: reply): not the client's own ``_INBOX``, so an agent's NATS user may publish replies there
#: and nowhere near the inboxes where the broker's processes get their JetStream acks.
REPLY_PREFIX = "_BROKER_REPLY"


class RouteWaiters:
    """Futures for the core NATS answers this process waits for, under one subscription.

    Each answer's subject ends in a random token, not a counter: the subjects are stored in
    the routed message (and so in its tenant's replay), and the inbox is one for every
    tenant, so a predictable next subject would let one tenant's agent answer another's
    caller first."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._prefix: str | None = None
        self._lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Msg | Answer]] = {}
        # The replies awaited for stored messages: token -> (tenant, message seq)
        self._replies: dict[str, tuple[str, int]] = {}
        self._lookups: dict[str, asyncio.Task[None]] = {}  # by the token it looks for
        self._lookup_gate = asyncio.Semaphore(_LOOKUPS_AT_ONCE)
        publisher.on_reconnected(self._reconnected)

    async def _ensure(self) -> str:
        if self._prefix is None:
            async with self._lock:
                if self._prefix is None:
                    nc = self.publisher.nc
                    prefix = f"{REPLY_PREFIX}.{secrets.token_hex(11)}."
                    await subscribe_detached(nc, f"{prefix}*", self._deliver)
                    self._prefix = prefix
        return self._prefix

    async def expect(self) -> tuple[str, asyncio.Future[Msg | Answer]]:
        """A fresh subject to hand out and the future of the first message sent to it."""
        prefix = await self._ensure()
        token = secrets.token_urlsafe(12)  # 96 bits; [A-Za-z0-9_-], a subject token
        future: asyncio.Future[Msg | Answer] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        return prefix + token, future

    def awaits_reply(self, subject: str, tenant: str, message_seq: int) -> None:
        """``subject`` awaits the answer to the message stored at ``message_seq``: looked
        for in ``ROUTES`` when the connection comes back (see :meth:`_reconnected`)."""
        if self._prefix and subject.startswith(self._prefix):
            self._replies[subject[len(self._prefix) :]] = (tenant, message_seq)

    def forget(self, subject: str) -> None:
        if self._prefix and subject.startswith(self._prefix):
            self._waiting.pop(subject[len(self._prefix) :], None)
            self._replies.pop(subject[len(self._prefix) :], None)

    async def _reconnected(self) -> None:
        """An answer sent to a reply subject while the connection was down never comes (core
        NATS keeps nothing), though the agent or the router stored it in ``ROUTES``: each
        request still waiting looks there, and takes the stored answer when there is one.
        Without this it waited out its timeout and answered 504 for a reply stored seconds
        after it was sent."""
        for token, (tenant, seq) in list(self._replies.items()):
            if token in self._lookups:  # one looking already (reconnects in a row)
                continue
            task = asyncio.create_task(self._look_up(token, tenant, seq))
            self._lookups[token] = task
            task.add_done_callback(functools.partial(self._looked_up, token))

    def _looked_up(self, token: str, _: asyncio.Task[None]) -> None:
        self._lookups.pop(token, None)

    async def _look_up(self, token: str, tenant: str, seq: int) -> None:
        async with self._lookup_gate:  # a reconnect with thousands waiting: a few at a time
            if token not in self._waiting:  # answered, or given up, while it queued
                return
            answer = await stored_reply(self.publisher, tenant, seq)
        future = self._waiting.get(token)
        if answer is not None and future is not None and not future.done():
            future.set_result(answer)

    async def _deliver(self, message: Msg) -> None:
        assert self._prefix is not None
        future = self._waiting.pop(message.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(message)


def _query(scope: Scope) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in scope.query_string.split("&"):
        name, _, value = part.partition("=")
        if name:
            params[name] = unquote(value)
    return params


def _wait_params(params: dict[str, str], max_wait: float) -> tuple[bool, float]:
    wait_raw = params.get("wait", "false").lower()
    if wait_raw not in {"true", "false", "1", "0", ""}:
        raise Unprocessable("wait must be true or false")
    wait = wait_raw in {"true", "1"}
    try:
        timeout = float(params.get("timeout", _DEFAULT_WAIT))
    except ValueError:
        raise Unprocessable("timeout must be a number of seconds") from None
    if not (math.isfinite(timeout) and 0 < timeout <= max_wait):
        raise Unprocessable(f"timeout must be more than 0 and at most {max_wait:g} seconds")
    return wait, timeout


def _route_digest(digest: str, routing: Mapping[str, str]) -> str:
    """The request digest of a route: the publish digest of the same message, with that it
    is routed and the routing headers it names, so that one Idempotency-Key sent to
    ``/v1/publish`` and then ``/v1/route`` (or with another intent) is ``422
    idempotency_key_reused``, not a duplicate that routes nothing. ``wait`` is left out:
    a route sent again with ``wait=true`` is the same request (``409 already_routed``)."""
    h = hashlib.blake2b(f"route\0{digest}".encode(), digest_size=16)
    for name in sorted(routing):
        h.update(f"\0{name}\0{routing[name]}".encode())
    return h.hexdigest()


def _check_retry_window(timeout: float, window: float) -> None:
    """Refuse a keyed ``wait=true`` request whose retries, sent before its deadline, could
    come after ``MESSAGES``' duplicate window: JetStream would store such a retry as a new
    message, and it would be routed (and run) a second time."""
    if timeout > window - 1:
        raise Unprocessable(
            f"with an Idempotency-Key, timeout is at most {window - 1:g} seconds: a retry "
            f"is known as one for {window:g} s (BROKER_DUPLICATE_WINDOW_SECONDS), and a "
            "retry after that, still inside this timeout, would be routed again"
        )


def _routing_headers(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    size = 0
    for lower, stored in ROUTING_HEADERS.items():
        value = scope.headers.get(lower)
        if value is None:
            continue
        if len(value) > _MAX_ROUTING_HEADER:
            raise Unprocessable(f"{stored} is longer than {_MAX_ROUTING_HEADER} characters")
        found[stored] = value
        size += len(value)
    if size > _MAX_ROUTING_HEADERS:
        raise Unprocessable(
            f"the routing headers add up to {size} characters; at most {_MAX_ROUTING_HEADERS}"
        )
    return found


async def route_one(state: IngressState, scope: Scope, proto: HTTPProtocol, subject: str) -> None:
    headers = scope.headers
    validate_subject(subject)
    wait, timeout = _wait_params(_query(scope), state.settings.route_max_wait)
    if wait and headers.get(H_IDEMPOTENCY_KEY) is not None:
        _check_retry_window(timeout, state.settings.duplicate_window_seconds)
    raw_type = headers.get(H_CONTENT_TYPE)
    # One routed message may be NDJSON (e.g. a run of sensor readings); publish reads that
    # media type as a batch of records instead.
    ndjson = media_type(raw_type) in NDJSON_TYPES
    content_type = raw_type.strip() if ndjson and raw_type else check_media_type(raw_type)
    body = await read_body(proto, headers, state.settings.max_message_bytes)
    routing = _routing_headers(scope)
    # Refuse what a router could not read before anything is stored.
    extract(body, {CONTENT_TYPE: content_type, **routing})
    outbound = body_request(headers, subject, body, content_type).to_outbound(state.tenant)
    if (digest := outbound.headers.get(REQUEST_DIGEST)) is not None:
        outbound.headers[REQUEST_DIGEST] = _route_digest(digest, routing)
    waiters = state.route_waiters
    if not state.publisher.connected:
        raise Unavailable("NATS is not connected")
    decision_to, decision_future = await waiters.expect()
    reply_to: str | None = None
    reply_future: asyncio.Future[Msg | Answer] | None = None
    deadline = time.time() + timeout
    if wait:
        reply_to, reply_future = await waiters.expect()
        outbound.headers[H_REPLY_TO] = reply_to
        outbound.headers[H_DEADLINE] = str(int(deadline * 1000))
    outbound.headers.update(routing)
    outbound.headers[H_ROUTE_MODE] = ROUTE_MODE_AUTO
    outbound.headers[H_DECISION_TO] = decision_to
    try:
        ack = await state.publisher.publish(outbound)
        if reply_to is not None and not ack.duplicate:  # from here on it may be answered
            waiters.awaits_reply(reply_to, str(state.tenant), ack.seq)
        if ack.duplicate:
            if wait:
                await _answer_again(state, proto, ack.seq, timeout)
                return
            respond_json(proto, 200, {**ack.to_dict(), "subject": subject, "decision": None})
            return
        decision = await _decision(
            decision_future, min(state.settings.route_decision_timeout, timeout)
        )
        if not wait:
            status = 200 if decision is not None else 202
            respond_json(proto, status, {**ack.to_dict(), "subject": subject, "decision": decision})
            return
        assert reply_future is not None
        reply = await _reply(state, reply_future, deadline, ack.seq)
        _respond_reply(proto, reply, ack.seq)
    finally:
        waiters.forget(decision_to)
        if reply_to is not None:
            waiters.forget(reply_to)


async def _decision(future: asyncio.Future[Msg | Answer], timeout: float) -> dict[str, Any] | None:
    try:
        message = await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        return None
    try:
        decision = orjson.loads(message.data or b"")
    except orjson.JSONDecodeError:
        return None
    return decision if isinstance(decision, dict) else None


async def _reply(
    state: IngressState, future: asyncio.Future[Msg | Answer], deadline: float, seq: int
) -> Answer:
    """The answer sent to the request's reply subject (or found stored in ``ROUTES`` once
    the connection came back: :meth:`RouteWaiters._reconnected`); at the deadline, one
    stored meanwhile all the same (sent while the connection was being made again)."""
    remaining = deadline - time.time()
    try:
        return await asyncio.wait_for(future, max(remaining, 0.0))
    except TimeoutError:
        stored = None
        if state.publisher.connected:  # else the lookup would only wait out its own timeout
            stored = await stored_reply(state.publisher, str(state.tenant), seq)
        if stored is not None:
            return stored
        raise DeadlineExceeded("no reply before the deadline; the agent was told to stop") from None


async def stored_reply(publisher: Publisher, tenant: str, seq: int) -> Answer | None:
    """The answer stored in ``ROUTES`` for the message at ``seq``, or ``None`` (none, or
    NATS did not tell within :data:`_STORED_LOOKUP_SECONDS`)."""
    try:
        return await asyncio.wait_for(
            stored_answer(publisher.js, tenant, seq), _STORED_LOOKUP_SECONDS
        )
    except Exception:
        return None


async def _answer_again(state: IngressState, proto: HTTPProtocol, seq: int, timeout: float) -> None:
    """Answer a retried ``wait=true`` request, whose ``Idempotency-Key`` was stored as
    message ``seq``, as the first was answered: with the answer stored in ``ROUTES``
    (:mod:`broker.routing.replies`), or the one still to come, waited for until the first
    request's deadline or this one's ``timeout``, whichever comes first."""
    publisher, tenant = state.publisher, str(state.tenant)
    try:
        # Subscribed before looking: an answer stored in between comes here.
        sub = await publisher.nc.subscribe(answers_subject(tenant, seq))
        try:
            answer = await stored_answer(publisher.js, tenant, seq)
            if answer is None:
                answer = await _next_answer(state, sub, seq, timeout)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    except BrokerError:
        raise
    except Exception as e:  # NATS went away or JetStream did not answer: retry the request
        raise Unavailable(
            f"cannot read the answer stored for message {seq} now ({type(e).__name__}); "
            "send the request again with the same Idempotency-Key"
        ) from e
    _respond_reply(proto, answer, seq, again=True)


async def _next_answer(state: IngressState, sub: Subscription, seq: int, timeout: float) -> Msg:
    js, tenant = state.publisher.js, str(state.tenant)
    try:
        first = await get_stored(js, Stream.MESSAGES, seq)
    except NotFoundError:
        raise AlreadyRouted(
            f"this Idempotency-Key was routed as message {seq}, which is no longer stored, "
            "and no answer to it is stored in ROUTES"
        ) from None
    headers = first.headers or {}
    if not headers.get(H_REPLY_TO):
        raise AlreadyRouted(
            f"this Idempotency-Key was routed as message {seq} without wait=true, so no "
            "reply is stored; its decision is in ROUTES"
        )
    # A little past the first one's deadline: its answer may be on its way to the stream.
    first_deadline = (deadline_of(headers) or math.inf) + _DEADLINE_GRACE
    deadline = min(first_deadline, time.time() + timeout)
    while (left := deadline - time.time()) > 0:
        try:
            answer = await sub.next_msg(timeout=left)
        except nats.errors.TimeoutError:
            break
        if await genuine(js, tenant, seq, answer):
            return answer
    raise DeadlineExceeded(
        f"no answer to message {seq} (this Idempotency-Key's first request) before the "
        "deadline; the agent was told to stop at the first request's"
    )


def _respond_reply(
    proto: HTTPProtocol, reply: Answer, message_seq: int, *, again: bool = False
) -> None:
    headers, data = reply.headers or {}, reply.data or b""
    code = headers.get(H_ERROR)
    if code is not None:
        message = "the agent failed"
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            message = str(orjson.loads(data).get("message", message))
        raise _ERRORS.get(code, AgentFailed)(message)
    out = [
        ("content-type", headers.get(CONTENT_TYPE, "application/octet-stream")),
        ("broker-message-seq", str(message_seq)),
    ]
    if agent := headers.get(H_AGENT):
        out.append(("broker-agent", agent))
    if again:  # a retried request: the answer stored for the first
        out.append(("broker-duplicate", "true"))
    proto.response_bytes(200, out, data)
