"""Answers to routed messages someone waits for, stored in ``ROUTES``.

A caller of ``POST /v1/route?wait=true`` hears the answer on a core NATS subject of its own
(``Broker-Reply-To``); that is fast, and lost with the caller's connection. So the answer is
also appended to ``ROUTES``, one subject per message, where a retried request (the same
``Idempotency-Key``, answered by any ingress process) finds it, or waits for it:

- ``route.<tenant>.<agent>.reply.<message seq>``: the agent's reply, appended by the agent
  SDK after it sent the reply to the caller and before it acks the message. Its headers are
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

import contextlib
from collections.abc import Mapping

import orjson
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from broker.reader import read_messages
from broker.routing.events import (
    H_ERROR,
    H_EVENT,
    RouteDecided,
    RouteEventType,
    RouteEventUnreadable,
    inbox_subject,
)
from broker.streams import SUBJECT_PREFIX, Stream

#: On a stored reply: the ``ROUTES`` sequence of the decision it answers.
H_ROUTE_SEQ = "Broker-Route-Seq"
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
    raw = (answer.headers or {}).get(H_ROUTE_SEQ, "")
    if kind != _REPLY or not raw.isdigit():
        return False
    try:
        decision = await js.get_msg(Stream.ROUTES, int(raw))
    except NotFoundError:  # aged out: the reply is as old, and as likely to be gone
        return False
    if decision.subject != inbox_subject(tenant, writer):
        return False
    try:
        route = RouteDecided.from_headers(decision.headers or {})
    except RouteEventUnreadable:
        return False
    return route.message_seq == message_seq and not route.mirror


async def stored_answer(js: JetStreamContext, tenant: str, message_seq: int) -> Answer | None:
    """A genuine stored answer to the message at ``message_seq``, if any: the last one stored,
    or, when that one is not genuine, the oldest that is."""
    subject = answers_subject(tenant, message_seq)
    try:
        last = await js.get_last_msg(Stream.ROUTES, subject)
    except NotFoundError:
        return None
    if await genuine(js, tenant, message_seq, last):
        return last
    # Something else was stored last (a forgery, say): look at all of them, oldest first.
    async with contextlib.aclosing(read_messages(js, Stream.ROUTES, subject=subject)) as read:
        async for answer in read:
            if await genuine(js, tenant, message_seq, answer):
                return answer
    return None
