"""Answers to routed messages someone waits for, stored in ``ROUTES``.

A caller of ``POST /v1/route?wait=true`` hears the answer on a core NATS subject of its own
(``Broker-Reply-To``); that is fast, and lost with the caller's connection. So the answer is
also appended to ``ROUTES``, one subject per message, where a retried request (the same
``Idempotency-Key``, answered by any ingress process) finds it, or waits for it:

- ``route.<tenant>.<agent>.reply.<message seq>``: the agent's reply, appended by the agent
  SDK after it sent the reply to the caller and ahead of the message's ack. Its headers are
  the reply's (``Content-Type``, ``Broker-Agent``, ``Broker-Message-Seq``), with
  ``Broker-Event: RouteReplied`` and ``Broker-Route-Seq``, the ``ROUTES`` sequence of the
  decision it answers.
- ``route.<tenant>.-.error.<message seq>``: the routers' answer when no agent will reply
  (``no_route``, ``agent_error``, ``deadline_exceeded``): a ``{"error_code", "message"}``
  body with ``Broker-Error``. No agent's NATS user may publish there (see docs/tenants.md).

An agent's NATS user may append replies under its own name only, but for any message seq:
so a reply counts only when ``Broker-Route-Seq`` names a decision in that agent's inbox for
that very message (one more read, on the rare path of a retry). Both forms have five
tokens, which no inbox (three), failure or dead-letter record (four) filter matches.
These appends carry no ``Nats-Msg-Id``: an agent's NATS user may send any header, so an id
derived from the message would let one agent claim it first and have JetStream drop the
genuine answer as a duplicate. A handler run again after a crash stores a second reply;
a retry takes the last genuine one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping

import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from broker.errors import BrokerError
from broker.natsconn import LogThrottle, get_stored, subscribe_detached
from broker.publisher import read_ack
from broker.reader import read_messages
from broker.routing.events import (
    H_ERROR,
    H_EVENT,
    H_ROUTE_SEQ,
    RouteDecided,
    RouteEventType,
    RouteEventUnreadable,
    inbox_subject,
    route_seq_of,
)
from broker.streams import SUBJECT_PREFIX, Stream

log = structlog.get_logger(__name__)

_DIGITS = re.compile(r"\d+")
#: What the server's error for a publish the user may not make says (its case varies by
#: server version).
_PERMISSION_VIOLATION = "permissions violation for publish to"

#: The writer token of the routers' answers: not an agent, and no agent's user writes there.
ROUTERS = "-"
_REPLY, _ERROR = "reply", "error"
#: A stored answer as a direct read gives it, or as a subscription or consumer delivers it.
Answer = Msg | RawStreamMsg


def reply_subject(tenant: str, agent: str, message_seq: int) -> str:
    """Where ``agent`` stores its reply to the message at ``message_seq``."""
    return f"{inbox_subject(tenant, agent)}.{_REPLY}.{message_seq}"


def error_subject(tenant: str, message_seq: int) -> str:
    """Where the routers store the error that answers the message at ``message_seq``."""
    return f"{inbox_subject(tenant, ROUTERS)}.{_ERROR}.{message_seq}"


def answers_subject(tenant: str, message_seq: int) -> str:
    """Every stored answer to the message at ``message_seq`` (a subject filter)."""
    return f"{SUBJECT_PREFIX[Stream.ROUTES]}.{tenant}.*.*.{message_seq}"


def reply_headers(route_seq: int, headers: Mapping[str, str]) -> dict[str, str]:
    """The headers that store a reply sent with ``headers``, answering the decision at
    ``route_seq`` in ``ROUTES``."""
    return {**headers, H_EVENT: RouteEventType.REPLIED, H_ROUTE_SEQ: str(route_seq)}


def error_answer(code: str, message: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the routers' error answer (also what the waiting caller
    hears)."""
    body = orjson.dumps({"error_code": code, "message": message})
    return body, {H_ERROR: code, H_EVENT: RouteEventType.REPLIED}


async def genuine(js: JetStreamContext, tenant: str, message_seq: int, answer: Answer) -> bool:
    """Whether ``answer`` (a message on :func:`answers_subject`) answers that message: the
    routers' error, or a reply from an agent the message was routed to."""
    parts = (answer.subject or "").split(".")
    if len(parts) != 5 or parts[1] != tenant or parts[4] != str(message_seq):
        return False
    writer, kind = parts[2], parts[3]
    if writer == ROUTERS and kind == _ERROR:
        return True
    route_seq = route_seq_of(answer.headers or {})
    if kind != _REPLY or route_seq is None:
        return False
    try:
        found = await stored_decision(js, route_seq, tenant, writer)
    except NotFoundError:  # aged out: the reply is as old, and as likely to be gone
        return False
    return found is not None and found[1].message_seq == message_seq


async def stored_decision(
    js: JetStreamContext, route_seq: int, tenant: str, agent: str
) -> tuple[RawStreamMsg, RouteDecided] | None:
    """The record at ``route_seq`` in ``ROUTES`` and its decision, when it is a decision
    that sent a message to ``agent`` of ``tenant`` (on that agent's inbox, not a mirror
    copy): what a stored reply or a failure names (``Broker-Route-Seq``), checked before
    either is believed. ``None`` when the record is anything else; ``NotFoundError`` when
    ``ROUTES`` holds no such record."""
    stored = await get_stored(js, Stream.ROUTES, route_seq)
    if stored.subject != inbox_subject(tenant, agent):
        return None
    try:
        decided = RouteDecided.from_headers(stored.headers or {})
    except RouteEventUnreadable:
        return None
    return None if decided.mirror else (stored, decided)


async def stored_answer(js: JetStreamContext, tenant: str, message_seq: int) -> Answer | None:
    """A genuine stored answer to the message at ``message_seq``, if any: an agent's reply
    before the routers' error (the last reply stored, or the oldest when something else was
    stored after it), else the routers' error.

    A reply wins because its caller heard it: an error stored after a reply comes from the
    message running again after its ack was lost (the agent died, the connection dropped),
    by then past its deadline, and a retried request must get what the first one got."""
    subject = answers_subject(tenant, message_seq)
    try:
        last = await get_stored(js, Stream.ROUTES, subject=subject)
    except NotFoundError:
        return None
    last_genuine = await genuine(js, tenant, message_seq, last)
    if last_genuine and is_reply(last):
        return last
    # The routers' error, or a forgery, was stored last: look at all of them, oldest first.
    error: Answer | None = last if last_genuine else None
    async with contextlib.aclosing(read_messages(js, Stream.ROUTES, subject=subject)) as read:
        async for answer in read:
            if await genuine(js, tenant, message_seq, answer):
                if is_reply(answer):
                    return answer
                error = error or answer
    return error


def is_reply(answer: Answer) -> bool:
    """Whether ``answer`` (a message on :func:`answers_subject`) is stored as a reply."""
    return (answer.subject or "").split(".")[3:4] == [_REPLY]


class ReplyStore:
    """The agent SDK's appends of replies, sent without waiting for each ack.

    The agent acks its message after the append was sent on the same connection, so the
    server receives the append first (on a cluster, where the leaders of ``ROUTES`` and of
    the inbox consumer may differ, the two may still be applied in either order). Waiting
    for each ack would only tell of a failure before the message's ack, and a reply that
    could not be stored was never a reason to run the handler again (the caller has it).

    So only the first append and every ``ack_every``-th ask for an ack, heard by one
    subscription (in the connection's own inbox space) and matched by a counter token. A
    refused one, or one not acked within ``timeout`` seconds, is logged as
    ``agent_reply_not_stored`` (one line per kind of error every ``log_every`` seconds, with
    ``repeated``).
    Storing stops for ``pause`` seconds only when it cannot work for a while: the server
    refused an append for want of permission (reported on the connection, see
    :meth:`connection_error`; every append would be a server error), or JetStream refused
    one for good. A stream without a leader (an election, seconds long: 503 or no ack) or
    a connection away stops nothing: replies appended while it lasts may be lost, the next
    ones are stored, where a pause of a minute after one such failure dropped every reply
    of that minute.
    Measured with an echo handler (BENCHMARKS.md): nats-py's ``js.publish`` per reply cost
    about 180 µs of the agent's CPU, an acked publish 115 µs, one not acked 57 µs.
    """

    def __init__(
        self,
        nc: NatsClient,
        agent: str,
        *,
        timeout: float = 2.0,
        ack_every: int = 16,
        pause: float = 60.0,
        max_pending: int = 10_000,
        log_every: float = 10.0,
    ) -> None:
        self._nc = nc
        self._agent = agent
        self._ack_every = ack_every
        self._pause = pause
        self._paused_until = 0.0  # monotonic
        self._subscribing = asyncio.Lock()
        self._timeout = timeout
        self._max_pending = max_pending
        self._prefix: str | None = None
        self._counter = 0
        #: Appends sent and not acked: token -> (message seq, subject, monotonic deadline), in
        #: the order they were sent.
        self._pending: dict[str, tuple[int, str, float]] = {}
        #: Where this agent's replies go (``route.<tenant>.<agent>.reply.<seq>``): the
        #: middle of the subject a permission violation names.
        self._marker = f".{agent}.{_REPLY}."
        self._log = LogThrottle(log_every)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def append(
        self, subject: str, payload: bytes, headers: dict[str, str], message_seq: int
    ) -> None:
        """Send one append; its outcome is only logged, and only when it failed."""
        if time.monotonic() < self._paused_until:
            return
        self._counter += 1
        token, reply = str(self._counter), ""  # no ack asked for: nothing to wait for
        if (self._counter - 1) % self._ack_every == 0:
            prefix = self._prefix or await self._subscribe()
            self.sweep()
            if len(self._pending) >= self._max_pending:
                error = f"{len(self._pending)} stored replies await their ack"
                self._failed([message_seq], error)
                return
            reply = prefix + token
            self._pending[token] = (message_seq, subject, time.monotonic() + self._timeout)
        try:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
        except Exception as e:  # connection gone: the message is not acked either
            self._pending.pop(token, None)
            self._failed([message_seq], repr(e)[:300])

    async def start(self) -> None:
        """Subscribe to the acks now, before the first reply: subscribing on the first append
        flushed the connection between the reply sent to the caller and its stored copy, so
        an agent killed then had answered a caller with a reply that was never stored (a
        retry of that request waited in vain). Without it, both leave in one flush."""
        await self._subscribe()

    async def _subscribe(self) -> str:
        async with self._subscribing:  # two appends at once would subscribe twice
            if self._prefix is None:
                prefix = f"{self._nc.new_inbox()}."
                await subscribe_detached(self._nc, f"{prefix}*", self._on_ack)
                self._prefix = prefix
            return self._prefix

    async def _on_ack(self, msg: Msg) -> None:
        assert self._prefix is not None
        found = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if found is None:
            return
        message_seq, subject, _ = found
        answer = read_ack(msg, subject)
        if isinstance(answer, BrokerError):  # a 503 (no leader now, no stream): no pause
            self._failed([message_seq], answer.message, pause=not answer.retryable)

    def connection_error(self, error: str) -> None:
        """An error the server reported on the connection (the client's error callback): a
        permission violation for one of these appends stops storing for ``pause`` s."""
        paused = time.monotonic() < self._paused_until  # the appends sent before it, refused
        if not paused and self._marker in error and _PERMISSION_VIOLATION in error.lower():
            self._failed([], error[:300], pause=True)

    def sweep(self) -> None:
        """Log the appends whose ack did not come in time (``ROUTES`` electing a leader,
        JetStream away; a missing permission is reported sooner, on the connection): called
        on each append and on each heartbeat."""
        now, expired = time.monotonic(), []
        while self._pending:  # insertion order is deadline order
            token, (seq, _, deadline) = next(iter(self._pending.items()))
            if deadline > now:
                break
            del self._pending[token]
            expired.append(seq)
        if expired:  # a leader being elected, a connection away; a permission is reported
            error = f"no acknowledgement from JetStream in {self._timeout:g} s"
            self._failed(expired, error)

    def _failed(self, message_seqs: list[int], error: str, *, pause: bool = False) -> None:
        extra: dict[str, float | int]
        if pause:
            self._paused_until = time.monotonic() + self._pause
            extra = {"paused_seconds": self._pause}
        else:  # one line per kind of error every 10 s (the texts name the message's subject)
            repeated = self._log.admit(_DIGITS.sub("N", error))
            if repeated is None:
                return
            extra = {"repeated": repeated}
        log.warning(
            "agent_reply_not_stored",
            agent=self._agent,
            message_seqs=message_seqs[:10],
            count=len(message_seqs),
            error=error,
            **extra,
        )
