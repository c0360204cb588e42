"""Routing events and their NATS messages: the one mapper between the two.

``RouteDecided`` goes to ``route.<tenant>.<agent>`` in ``ROUTES``: that subject is the
agent's durable inbox. Its data is the routed message's payload as stored, its headers are
the message's own (content type, schema id, trace context, reply address and deadline)
plus ``Broker-Event: RouteDecided`` and ``Broker-Route``, a compact JSON record of the
decision: the chosen agent, the ranked candidates with their scores and load inputs, the
policy version, the message's sequence and subject, the attempt and the agents tried.

``RouteFailed`` goes to ``route.<tenant>.<agent>.failed`` (an agent name has no dots, so it
never collides with an inbox): the agent SDK appends it when a handler raised or ran out
of time; routers read it to cool the agent down and to send the message to the next
candidate. A message nobody qualifies for is recorded in ``ROUTES`` too, on
``route.<tenant>.-.dead`` (four tokens: no inbox or failure filter matches it), and then goes
to ``dlq.<tenant>.route`` with the same ``Broker-Route`` header. The answers waiting callers
get are stored on five-token subjects (``RouteReplied``, see :mod:`broker.routing.replies`).

Every decision carries a ``Nats-Msg-Id`` derived from the message and the attempt (hashed
with the routers' key: :meth:`RouteDecided.keyed_msg_id`), so a router that crashes after
appending and before acking cannot append the decision twice.
Since every decision, for an agent or for nobody, lands in ``ROUTES`` first, that holds
even when the decision made again differs in kind: ``ROUTES`` keeps the first, and only a
decision for nobody that stands goes on to the DLQ. What agents append carries no such id:
an agent's NATS user may send any header on its subjects, and JetStream deduplicates across
the stream, so an id another agent could guess would let it have a record dropped (the
router likewise stores a decision again, without its id, when a record on an agent's
subject holds it: :func:`broker.streams.is_decision_subject`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from broker.envelope import NATS_MSG_ID, read_number
from broker.errors import BrokerError
from broker.routing.types import Decision
from broker.streams import SUBJECT_PREFIX, Stream, dead_subject

# Headers of the routed message in MESSAGES, set by POST /v1/route.
H_ROUTE_MODE = "Broker-Route-Mode"  # "auto": the router routes this message
H_DECISION_TO = "Broker-Decision-To"  # core NATS subject that hears the decision
H_REPLY_TO = "Broker-Reply-To"  # core NATS subject that hears the agent's reply
H_DEADLINE = "Broker-Deadline"  # unix epoch milliseconds; the agent cancels after it
H_INTENT = "Broker-Intent"
# Headers of routing events and replies.
H_EVENT = "Broker-Event"
H_ROUTE = "Broker-Route"
H_FAILURE = "Broker-Failure"
H_AGENT = "Broker-Agent"
H_MESSAGE_SEQ = "Broker-Message-Seq"
#: On a failure or a stored reply: the ``ROUTES`` sequence of the decision it answers.
H_ROUTE_SEQ = "Broker-Route-Seq"
H_ERROR = "Broker-Error"  # on a reply or notice: the error code instead of a result

ROUTE_MODE_AUTO = "auto"
#: Not copied from the message into its decision, with every ``Nats-`` header: those are
#: JetStream's instructions for the message's own append (``Nats-Msg-Id``,
#: ``Nats-Expected-Last-Subject-Sequence`` from ``Expected-Last-Subject-Sequence``, or
#: ``Nats-Rollup`` and ``Nats-TTL`` from a client publishing to NATS), which JetStream would
#: check again against the agent's inbox.
_NOT_COPIED = frozenset({H_DECISION_TO.lower(), H_ROUTE_MODE.lower()})


class RouteEventType(StrEnum):
    DECIDED = "RouteDecided"
    FAILED = "RouteFailed"
    REPLIED = "RouteReplied"  # an answer stored for a waiting caller (broker.routing.replies)


class FailureReason(StrEnum):
    ERROR = "error"  # the handler raised
    TIMEOUT = "timeout"  # the handler ran past the deadline and was cancelled
    EXPIRED = "expired"  # the deadline had passed before the agent got the message
    #: Not the agent's: it was deregistered with the message in its inbox, and a router
    #: took the message back (:mod:`broker.routing.orphans`).
    DEREGISTERED = "deregistered"


class RouteEventUnreadable(BrokerError):
    """A ROUTES message whose routing headers are missing or malformed."""

    status = 500
    error_code = "route_event_unreadable"


def inbox_subject(tenant: str, agent: str) -> str:
    return f"{SUBJECT_PREFIX[Stream.ROUTES]}.{tenant}.{agent}"


def inbox_consumer_names(tenant: str, agent: str) -> tuple[str, str]:
    """The durable consumer an agent's instances share to read its inbox
    (``agent-<tenant>~<agent>``: ``~`` is in neither a tenant's nor an agent's name, so two
    tenants' agents of one name never share it), then the name a release before tenants gave
    it (``agent-<agent>``), still bound where it reads this same inbox."""
    return f"agent-{tenant}~{agent}", f"agent-{agent}"


def failed_subject(tenant: str, agent: str) -> str:
    return f"{inbox_subject(tenant, agent)}.failed"


def tenant_of(message_subject: str) -> str:
    """The tenant token of a stored ``msg.<tenant>.<subject>``."""
    return message_subject.split(".", 2)[1]


@dataclass(frozen=True, slots=True)
class RouteDecided:
    """A routing decision for one attempt at one stored message."""

    tenant: str
    message_seq: int
    message_subject: str
    decision: Decision
    attempt: int = 1
    tried: tuple[str, ...] = ()
    mirror: bool = False
    decided_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def subject(self) -> str:
        """Where it is appended in ``ROUTES``: the chosen agent's inbox, or the record of a
        decision for nobody (which then also goes to :func:`broker.streams.dlq_subject`)."""
        if self.decision.agent is None:
            return dead_subject(self.tenant)
        return inbox_subject(self.tenant, self.decision.agent)

    @property
    def msg_id(self) -> str:
        """The ``Nats-Msg-Id`` without a key (what :meth:`keyed_msg_id` hashes)."""
        return f"{self._id_kind}:{self.tenant}:{self.message_seq}:{self.attempt}"

    @property
    def _id_kind(self) -> str:
        return "mirror" if self.mirror else "route"

    def keyed_msg_id(self, key: bytes | None) -> str:
        """The ``Nats-Msg-Id`` routers store the decision with: :attr:`msg_id` hashed with
        ``key`` (BLAKE2b-128, keyed), which agents do not know, so no agent can send the
        id first and have the decision dropped as a duplicate; :attr:`msg_id` itself when
        ``key`` is ``None``."""
        if key is None:
            return self.msg_id
        digest = hashlib.blake2b(self.msg_id.encode(), key=key, digest_size=16).hexdigest()
        return f"{self._id_kind}:{digest}"

    def record(self) -> dict[str, Any]:
        """The ``Broker-Route`` header as a dict (the API returns the same shape)."""
        return {
            **self.decision.to_dict(),
            "tenant": self.tenant,
            "message_seq": self.message_seq,
            "message_subject": self.message_subject,
            "attempt": self.attempt,
            "tried": list(self.tried),
            "mirror": self.mirror,
            "decided_at": self.decided_at.isoformat(),
        }

    def to_headers(
        self, original: Mapping[str, str], *, id_key: bytes | None = None
    ) -> dict[str, str]:
        headers = {
            k: v
            for k, v in original.items()
            if (name := k.lower()) not in _NOT_COPIED and not name.startswith("nats-")
        }
        if self.mirror:  # a shadow's answer never reaches the caller
            headers = {k: v for k, v in headers.items() if k.lower() != H_REPLY_TO.lower()}
        headers[H_EVENT] = RouteEventType.DECIDED
        headers[H_ROUTE] = orjson.dumps(self.record()).decode()
        headers[NATS_MSG_ID] = self.keyed_msg_id(id_key)
        return headers

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RouteDecided:
        try:
            return cls(
                tenant=str(record["tenant"]),
                message_seq=int(record["message_seq"]),
                message_subject=str(record["message_subject"]),
                decision=Decision.from_dict(record),
                attempt=int(record.get("attempt", 1)),
                tried=tuple(str(a) for a in record.get("tried", ())),
                mirror=bool(record.get("mirror", False)),
                decided_at=datetime.fromisoformat(str(record["decided_at"])),
            )
        except Exception as e:  # any shape the record may have: e.g. a candidate not a dict
            raise RouteEventUnreadable(f"bad {H_ROUTE} record: {e!r}") from None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RouteDecided:
        raw = headers.get(H_ROUTE)
        if raw is None:
            raise RouteEventUnreadable(f"no {H_ROUTE} header")
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RouteEventUnreadable(f"{H_ROUTE} is not JSON: {e}") from None
        if not isinstance(record, dict):
            raise RouteEventUnreadable(f"{H_ROUTE} is not a JSON object")
        return cls.from_record(record)

    def next_attempt(self, decision: Decision) -> RouteDecided:
        """The decision for the next attempt, with this attempt's agent counted as tried."""
        tried = self.tried + ((self.decision.agent,) if self.decision.agent else ())
        return replace(
            self,
            decision=decision,
            attempt=self.attempt + 1,
            tried=tried,
            decided_at=datetime.now(UTC),
        )


@dataclass(frozen=True, slots=True)
class RouteFailed:
    """An agent could not handle a routed message (appended by the agent SDK).

    ``route_seq`` is where the decision the agent got is stored in ``ROUTES``: routers retry
    that stored decision (its payload and headers), never what the failure itself carries,
    which the agent's NATS user may write as it likes. ``None`` in a failure read from an
    agent SDK older than the field; routers refuse those."""

    route: RouteDecided
    reason: FailureReason
    message: str
    instance: str
    route_seq: int | None = None

    @property
    def agent(self) -> str:
        return self.route.decision.agent or ""

    @property
    def retryable(self) -> bool:
        """An error may succeed elsewhere, and so may a message its agent never ran; a
        timeout or expiry means the caller gave up."""
        return self.reason in (FailureReason.ERROR, FailureReason.DEREGISTERED)

    @property
    def subject(self) -> str:
        return failed_subject(self.route.tenant, self.agent)

    def to_headers(self, original: Mapping[str, str]) -> dict[str, str]:
        headers = {k: v for k, v in original.items() if not k.lower().startswith("nats-")}
        headers[H_EVENT] = RouteEventType.FAILED
        headers[H_ROUTE] = orjson.dumps(self.route.record()).decode()
        headers[H_FAILURE] = orjson.dumps(
            {"reason": self.reason, "message": self.message[:500], "instance": self.instance}
        ).decode()
        if self.route_seq is not None:
            headers[H_ROUTE_SEQ] = str(self.route_seq)
        else:  # never the routed message's own (a client may send any Broker- header)
            headers.pop(H_ROUTE_SEQ, None)
        # No Nats-Msg-Id: another agent's user could send the same id first and have this
        # failure dropped as a duplicate (the message would then never be retried). A failure
        # stored twice (an agent crashed before its ack) is retried once: the routers'
        # decision for the next attempt is deduplicated; and counted once for the cooldown.
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RouteFailed:
        route = RouteDecided.from_headers(headers)
        try:
            failure = orjson.loads(headers.get(H_FAILURE, ""))
            reason = FailureReason(failure["reason"])
            message = str(failure.get("message", ""))
            instance = str(failure.get("instance", ""))
        except Exception as e:  # any shape the header may have: e.g. a list, not an object
            raise RouteEventUnreadable(f"bad {H_FAILURE} header: {e!r}") from None
        return cls(route, reason, message, instance, route_seq_of(headers))


def route_seq_of(headers: Mapping[str, str]) -> int | None:
    """The ``Broker-Route-Seq`` of a failure or stored reply, or ``None`` when it is absent
    or no stream sequence (1 to 2**64 - 1, in ASCII digits: ``"²".isdigit()`` holds, and
    ``int`` refuses it)."""
    seq = read_number(headers.get(H_ROUTE_SEQ))
    return seq if seq is not None and 0 < seq < 2**64 else None


def deadline_of(headers: Mapping[str, str]) -> float | None:
    """The message's deadline as a unix time in seconds, or None."""
    raw = headers.get(H_DEADLINE)
    if raw is None:
        return None
    try:
        return int(raw) / 1000.0
    except (ValueError, OverflowError):  # not a number, or past any float (4 000 digits)
        return None


def original_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A routing event's headers without its own: the routed message's headers."""
    drop = {H_EVENT, H_ROUTE, H_FAILURE, H_ROUTE_SEQ}
    return {k: v for k, v in headers.items() if k not in drop and not k.startswith("Nats-")}
