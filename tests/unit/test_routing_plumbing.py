"""Routing events, cooldowns and the live-load view, without a server."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from broker.agent import Reply, _Window, to_reply
from broker.envelope import NATS_MSG_ID
from broker.routing.cooldown import Cooldowns
from broker.routing.events import (
    H_DEADLINE,
    H_DECISION_TO,
    H_EVENT,
    H_FAILURE,
    H_REPLY_TO,
    H_ROUTE,
    H_ROUTE_SEQ,
    FailureReason,
    RouteDecided,
    RouteEventUnreadable,
    RouteFailed,
    deadline_of,
    original_headers,
    route_seq_of,
)
from broker.routing.load import InstanceLoad, LoadView, aggregate
from broker.routing.types import AgentLoad, CandidateScore, Decision, DecisionReason
from broker.streams import AGENT_LOAD_BUCKET

pytestmark = pytest.mark.unit


def _decision(agent: str | None = "ocr", mirror_to: str | None = None) -> Decision:
    candidate = CandidateScore(
        agent="ocr",
        capability="extract_text",
        semantic=0.71,
        load=0.9,
        score=0.77,
        penalties=("p99_over_200ms",),
        load_inputs=AgentLoad(instances=2, qps=3.5, p99_ms=250.0),
    )
    return Decision(
        agent=agent,
        capability="extract_text" if agent else None,
        reason=DecisionReason.SCORED if agent else DecisionReason.NO_CANDIDATE,
        detail="because",
        candidates=(candidate,),
        policy_version="test-1",
        mirror_to=mirror_to,
    )


def _route(**changes: object) -> RouteDecided:
    route = RouteDecided(
        tenant="acme", message_seq=42, message_subject="msg.acme.scans", decision=_decision()
    )
    return route if not changes else RouteDecided(**{**_fields(route), **changes})  # type: ignore[arg-type]


def _fields(route: RouteDecided) -> dict[str, object]:
    return {name: getattr(route, name) for name in RouteDecided.__slots__}


def test_route_decided_round_trips_through_its_headers() -> None:
    """What the router writes is what the agent SDK and simulate read back."""
    route = _route()
    headers = route.to_headers({"Content-Type": "image/png", "traceparent": "00-ab-cd-01"})
    back = RouteDecided.from_headers(headers)
    assert back == route
    assert headers[H_EVENT] == "RouteDecided"
    assert headers["Content-Type"] == "image/png"
    assert headers["traceparent"] == "00-ab-cd-01"
    assert headers[NATS_MSG_ID] == "route:acme:42:1"


def test_route_subject_is_the_agent_inbox_or_the_dlq() -> None:
    assert _route().subject == "route.acme.ocr"
    assert _route(decision=_decision(agent=None)).subject == "route.acme.-.dead"


def test_routing_headers_of_the_ingress_are_not_copied_into_the_inbox() -> None:
    """The decision address and the client's idempotency key belong to the message, not
    to the decision (the decision has its own Nats-Msg-Id)."""
    original = {H_DECISION_TO: "_INBOX.x.1", NATS_MSG_ID: "client-key", H_REPLY_TO: "_INBOX.x.2"}
    headers = _route().to_headers(original)
    assert H_DECISION_TO not in headers
    assert headers[NATS_MSG_ID] == "route:acme:42:1"
    assert headers[H_REPLY_TO] == "_INBOX.x.2"


def test_a_mirror_copy_never_carries_the_reply_address() -> None:
    mirror = _route(mirror=True)
    headers = mirror.to_headers({H_REPLY_TO: "_INBOX.x.2"})
    assert H_REPLY_TO not in headers
    assert headers[NATS_MSG_ID] == "mirror:acme:42:1"


def test_next_attempt_counts_the_failed_agent_as_tried() -> None:
    nxt = _route().next_attempt(_decision(agent="ocr2"))
    assert nxt.attempt == 2
    assert nxt.tried == ("ocr",)
    assert nxt.decision.agent == "ocr2"
    assert nxt.msg_id == "route:acme:42:2"


def test_route_failed_round_trips_and_only_errors_are_retryable() -> None:
    route = _route()
    for reason, retryable in [
        (FailureReason.ERROR, True),
        (FailureReason.TIMEOUT, False),
        (FailureReason.EXPIRED, False),
    ]:
        failure = RouteFailed(route, reason, "boom", "host-1")
        headers = failure.to_headers(route.to_headers({"Content-Type": "text/plain"}))
        back = RouteFailed.from_headers(headers)
        assert back == failure
        assert back.retryable is retryable
        assert back.subject == "route.acme.ocr.failed"
        assert original_headers(headers) == {"Content-Type": "text/plain"}
        assert back.route_seq is None
        assert H_ROUTE_SEQ not in headers


def test_a_failure_names_the_stored_decision_and_never_passes_on_the_messages_own() -> None:
    route = _route()
    original = route.to_headers({H_ROUTE_SEQ: "7"})  # a client's header on its message
    failure = RouteFailed(route, FailureReason.ERROR, "boom", "host-1", 123)
    headers = failure.to_headers(original)
    assert headers[H_ROUTE_SEQ] == "123"
    assert RouteFailed.from_headers(headers) == failure
    assert H_ROUTE_SEQ not in original_headers(headers)
    assert H_ROUTE_SEQ not in replace(failure, route_seq=None).to_headers(original)


@pytest.mark.parametrize(
    ("raw", "seq"),
    [
        ("1", 1),
        ("18446744073709551615", 2**64 - 1),
        ("18446744073709551616", None),
        ("0", None),
        ("", None),
        ("-3", None),
        (" 3", None),
        ("²", None),  # str.isdigit() holds; int() refuses it
        ("٣", None),  # an Arabic-Indic digit, which int() reads: never how a seq is written
        ("9" * 400, None),
    ],
)
def test_a_route_seq_is_a_stream_sequence_in_ascii_digits(raw: str, seq: int | None) -> None:
    assert route_seq_of({H_ROUTE_SEQ: raw}) == seq


@pytest.mark.parametrize(
    "headers",
    [{}, {H_ROUTE: "not json"}, {H_ROUTE: "[1]"}, {H_ROUTE: '{"tenant": "a"}'}],
)
def test_unreadable_route_headers_raise_a_broker_error(headers: dict[str, str]) -> None:
    with pytest.raises(RouteEventUnreadable):
        RouteDecided.from_headers(headers)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            key: JSON_VALUES
            for key in ("tenant", "message_seq", "message_subject", "decided_at", "agent")
        }
        | {"candidates": st.lists(JSON_VALUES, max_size=2), "reason": st.just("scored")},
    ),
    JSON_VALUES,
)
def test_a_routing_header_of_any_shape_is_read_or_unreadable(
    record: dict[str, object], failure: object
) -> None:
    """A routing header is data another process wrote: a record of the wrong shape (a
    candidate that is a number, a failure that is a list) is unreadable, never an
    AttributeError that ends a router's or an agent's loop."""
    headers = {H_ROUTE: orjson.dumps(record).decode(), H_FAILURE: orjson.dumps(failure).decode()}
    for read in (RouteDecided.from_headers, RouteFailed.from_headers):
        with contextlib.suppress(RouteEventUnreadable):
            read(headers)


def test_a_candidate_that_is_not_an_object_is_unreadable() -> None:
    record = {**_route().record(), "candidates": [1]}
    with pytest.raises(RouteEventUnreadable):
        RouteDecided.from_headers({H_ROUTE: orjson.dumps(record).decode()})
    failure = {H_ROUTE: orjson.dumps(_route().record()).decode(), H_FAILURE: "[1]"}
    with pytest.raises(RouteEventUnreadable):
        RouteFailed.from_headers(failure)


def test_cooldown_starts_after_enough_errors_within_the_window_and_ends() -> None:
    cool = Cooldowns(errors=3, window_s=10.0, duration_s=5.0)
    assert not cool.record_failure("t", "a", now=0.0)
    assert not cool.record_failure("t", "a", now=1.0)
    assert cool.cooling("t", now=1.0) == frozenset()
    assert cool.record_failure("t", "a", now=2.0)
    assert cool.cooling("t", now=2.5) == {"a"}
    assert cool.cooling("other", now=2.5) == frozenset()
    assert cool.cooling("t", now=7.1) == frozenset()


def test_errors_outside_the_window_do_not_add_up() -> None:
    cool = Cooldowns(errors=2, window_s=1.0, duration_s=5.0)
    assert not cool.record_failure("t", "a", now=0.0)
    assert not cool.record_failure("t", "a", now=5.0)
    assert cool.record_failure("t", "a", now=5.5)


def test_a_failure_stored_twice_counts_once() -> None:
    """An agent that crashed between storing a failure and its ack runs the message again
    and stores the same attempt's failure again: one failure, not two."""
    cool = Cooldowns(errors=2, window_s=10.0, duration_s=5.0)
    assert not cool.record_failure("t", "a", now=0.0, failure=(7, 1))
    assert not cool.record_failure("t", "a", now=1.0, failure=(7, 1))
    assert cool.cooling("t", now=1.0) == frozenset()
    assert not cool.record_failure("t", "b", now=1.0, failure=(7, 1))  # another agent's
    assert cool.record_failure("t", "a", now=2.0, failure=(7, 2))  # the next attempt counts
    assert cool.cooling("t", now=2.0) == {"a"}
    # After the window the same id is a new failure again.
    assert not cool.record_failure("t", "a", now=30.0, failure=(7, 1))
    assert cool.record_failure("t", "a", now=31.0, failure=(7, 1)) is False
    assert cool.record_failure("t", "a", now=32.0, failure=(8, 1))


def test_the_failures_remembered_per_agent_are_bounded() -> None:
    """An agent storing failures by the thousand (broken, or hostile: agents store their own)
    costs each router a bounded memory."""
    from broker.routing.cooldown import MAX_REMEMBERED

    cool = Cooldowns(errors=10**9, window_s=60.0, duration_s=5.0)
    for i in range(3 * MAX_REMEMBERED):
        cool.record_failure("t", "a", now=i * 0.001, failure=(i, 1))
    assert len(cool._seen[("t", "a")]) == MAX_REMEMBERED
    # the newest are the ones remembered
    assert (3 * MAX_REMEMBERED - 1, 1) in cool._seen[("t", "a")]
    assert (0, 1) not in cool._seen[("t", "a")]


def test_the_router_counts_a_failure_event_read_twice_once() -> None:
    """What the router hands the cooldowns: the failed attempt's message seq and attempt."""
    from typing import Any, cast

    from broker.routing.policy import Policy
    from broker.routing.router import Router

    policy = Policy.model_validate({"cooldown": {"errors": 2, "window_s": 60, "duration_s": 60}})
    router = Router(cast(Any, None), cast(Any, None), policy, cast(Any, None), cast(Any, None))
    first = RouteFailed.from_headers(
        RouteFailed(_route(), FailureReason.ERROR, "boom", "i-1").to_headers({})
    )
    router.observe_failure(first)
    router.observe_failure(first)  # stored again after a crash before the ack
    assert router.stats.failures_seen == 2
    assert router.cooldowns.cooling("acme") == frozenset()
    router.observe_failure(RouteFailed(_route(attempt=2), FailureReason.ERROR, "boom", "i-1"))
    assert router.cooldowns.cooling("acme") == {"ocr"}


def _beat(agent: str, instance: str, **load: float) -> InstanceLoad:
    return InstanceLoad(tenant="t", agent=agent, instance=instance, **load)  # type: ignore[arg-type]


def test_aggregate_adds_rates_and_takes_the_worst_latency_and_best_gpu() -> None:
    agent = aggregate(
        [
            _beat("a", "1", qps=10, in_flight=2, p99_ms=50, error_rate=0.0, gpu_free_mb=1000),
            _beat("a", "2", qps=30, in_flight=1, p99_ms=300, error_rate=0.1, gpu_free_mb=5000),
        ]
    )
    assert agent.instances == 2
    assert agent.qps == 40
    assert agent.in_flight == 3
    assert agent.p99_ms == 300
    assert agent.gpu_free_mb == 5000
    assert agent.error_rate == pytest.approx(0.075)


def test_load_view_forgets_silent_instances_after_the_ttl() -> None:
    view = LoadView(ttl=3.0)
    view.observe(_beat("a", "1", qps=1), now=0.0)
    view.observe(_beat("b", "1", qps=2), now=2.0)
    view.refresh(now=2.0)
    first = view.loads("t")
    assert set(first) == {"a", "b"}
    assert view.loads("t") is first  # unchanged: the same object (the scorer caches on it)
    view.refresh(now=4.0)
    assert set(view.loads("t")) == {"b"}
    view.refresh(now=5.5)
    assert dict(view.loads("t")) == {}


def test_load_view_drops_a_deleted_instance_at_once() -> None:
    view = LoadView(ttl=30.0)
    beat = _beat("a", "1")
    view.observe(beat, now=0.0)
    view.forget(beat.key)
    view.refresh(now=0.1)
    assert "a" not in view.loads("t")


async def test_a_heartbeat_is_for_the_instance_its_key_names_not_its_body() -> None:
    """A body claiming another tenant's agent was counted for it (steering that tenant's
    routing, and naming metrics series after whatever the writer put there)."""
    view = LoadView(ttl=30.0)
    prefix = f"$KV.{AGENT_LOAD_BUCKET}."
    honest = _beat("a", "1", qps=5)
    await view._on_message(Msg(None, subject=prefix + honest.key, data=honest.to_json()))  # type: ignore[arg-type]
    claimed = _beat("victim", "9", qps=1000)
    await view._on_message(Msg(None, subject=prefix + "t.a.1", data=claimed.to_json()))  # type: ignore[arg-type]
    view.refresh(now=time.monotonic())
    assert set(view.loads("t")) == set()  # the key's instance, its body a lie: dropped
    await view._on_message(Msg(None, subject=prefix + honest.key, data=honest.to_json()))  # type: ignore[arg-type]
    view.refresh(now=time.monotonic())
    assert set(view.loads("t")) == {"a"}


@given(
    qps=st.floats(min_value=0, max_value=1e6),
    p99=st.floats(min_value=0, max_value=1e6),
    err=st.floats(min_value=0, max_value=5),
)
def test_instance_load_json_round_trip_clamps_rates(qps: float, p99: float, err: float) -> None:
    beat = InstanceLoad.from_json(_beat("a", "1", qps=qps, p99_ms=p99, error_rate=err).to_json())
    assert beat.qps == qps
    assert beat.p99_ms == p99
    assert 0 <= beat.error_rate <= 1


@pytest.mark.parametrize("data", [b"", b"nope", b"[]", b'{"agent": "a"}'])
def test_unreadable_heartbeats_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"JSON|missing"):
        InstanceLoad.from_json(data)


def test_stats_window_reports_rate_percentiles_and_errors() -> None:
    window = _Window(started=time.monotonic() - 60)  # an instance running a while
    for ms in range(1, 101):
        window.add(float(ms), ok=ms % 10 != 0)
    qps, p50, p99, errors = window.summary()
    assert qps == pytest.approx(100 / 30.0)
    assert p50 == 50
    assert p99 == 99
    assert errors == pytest.approx(0.1)


def test_a_young_instances_rate_counts_the_seconds_it_has_run() -> None:
    """Completions over a window not yet 30 s old were divided by 30 s: an instance that
    started 5 s ago and handled 10 messages reported 0.33 per second, not 2."""
    window = _Window(started=time.monotonic() - 5)
    for _ in range(10):
        window.add(1.0, ok=True)
    assert window.summary()[0] == pytest.approx(2.0, rel=0.05)
    just_started = _Window()
    just_started.add(1.0, ok=True)
    assert just_started.summary()[0] == pytest.approx(1.0, rel=0.05)  # a second at least


def test_handler_results_become_replies() -> None:
    assert to_reply(b"\x89PNG") == Reply(b"\x89PNG")
    assert to_reply("hi") == Reply(b"hi", "text/plain; charset=utf-8")
    assert to_reply({"a": 1}) == Reply(b'{"a":1}', "application/json")
    assert to_reply(Reply(b"x", "image/png")) == Reply(b"x", "image/png")


@pytest.mark.parametrize(
    "raw", ["soon", "", "9" * 400, "-" + "9" * 400], ids=["word", "empty", "huge", "huge-negative"]
)
def test_a_deadline_header_that_is_no_time_counts_as_none(raw: str) -> None:
    """400 digits are an int but no float: the agent's task raised OverflowError there and
    the message was redelivered forever, never run."""
    assert deadline_of({H_DEADLINE: raw}) is None
    assert deadline_of({H_DEADLINE: "1700000000123"}) == 1700000000.123
