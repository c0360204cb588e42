"""Stored answers to waiting routed messages (``broker.routing.replies``) on a real server:
which ones a retried request may take."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.routing.events import RouteDecided, inbox_subject
from broker.routing.replies import (
    ReplyStore,
    error_answer,
    error_subject,
    reply_headers,
    reply_subject,
    stored_answer,
)
from tests._wait import await_until
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration
T = "acme"


async def decide(
    publisher: Publisher, message_seq: int, agent: str, **kw: bool
) -> tuple[RouteDecided, int]:
    """Store what a router stores for ``message_seq``: a decision for ``agent``."""
    route = RouteDecided(T, message_seq, f"msg.{T}.jobs", _decision(agent=agent), **kw)
    ack = await publisher.publish(Outbound(route.subject, b"job", route.to_headers({})))
    return route, ack.seq


async def reply(
    publisher: Publisher,
    route: RouteDecided,
    route_seq: int,
    body: bytes,
    *,
    agent: str | None = None,
    seq: int | None = None,
) -> None:
    """Store a reply as the agent SDK does, or (``agent``, ``seq``) one written elsewhere."""
    subject = reply_subject(T, agent or route.decision.agent or "", seq or route.message_seq)
    headers = reply_headers(route_seq, {})
    await publisher.publish(Outbound(subject, body, headers))


async def test_the_chosen_agents_reply_is_found_and_forgeries_are_not(
    publisher: Publisher,
) -> None:
    route, route_seq = await decide(publisher, 7, "chosen")
    assert await stored_answer(publisher.js, T, 7) is None
    await reply(publisher, route, route_seq, b"genuine")
    # Stored after it, by an agent of the tenant that may store replies under its own name:
    await reply(publisher, route, route_seq, b"not chosen", agent="other")
    found = await stored_answer(publisher.js, T, 7)
    assert found is not None
    assert (found.subject, found.data) == (reply_subject(T, "chosen", 7), b"genuine")


@pytest.mark.parametrize(
    "forgery",
    ["another message", "a mirror's decision", "no route seq", "a seq int() refuses", "seq 0"],
)
async def test_a_reply_that_names_no_decision_for_its_message_is_not_taken(
    publisher: Publisher, forgery: str
) -> None:
    route, route_seq = await decide(publisher, 8, "chosen")
    if forgery == "another message":  # the decision is for message 8, the reply for 9
        await reply(publisher, route, route_seq, b"x", seq=9)
        assert await stored_answer(publisher.js, T, 9) is None
        return
    if forgery == "a mirror's decision":
        shadow, shadow_seq = await decide(publisher, 8, "shadow", mirror=True)
        await reply(publisher, shadow, shadow_seq, b"shadow's")
    else:  # a superscript two passes str.isdigit() and raised in int(): a 500 for the caller
        seq = {"no route seq": None, "a seq int() refuses": "²", "seq 0": "0"}[forgery]
        headers = {"Broker-Event": "RouteReplied"} | ({"Broker-Route-Seq": seq} if seq else {})
        await publisher.publish(Outbound(reply_subject(T, "chosen", 8), b"x", headers))
    assert await stored_answer(publisher.js, T, 8) is None


async def test_the_routers_error_is_found_and_an_agents_error_is_not(
    publisher: Publisher,
) -> None:
    await decide(publisher, 11, "chosen")
    forged = f"{inbox_subject(T, 'chosen')}.error.11"
    await publisher.publish(Outbound(forged, b'{"error_code":"no_route"}', {}))
    assert await stored_answer(publisher.js, T, 11) is None
    body, headers = error_answer("agent_error", "every agent tried failed")
    await publisher.publish(Outbound(error_subject(T, 11), body, headers))
    found = await stored_answer(publisher.js, T, 11)
    assert found is not None
    assert (found.headers or {})["Broker-Error"] == "agent_error"
    assert found.data == b'{"error_code":"agent_error","message":"every agent tried failed"}'


async def test_another_tenants_answer_is_not_found(publisher: Publisher) -> None:
    route, route_seq = await decide(publisher, 12, "chosen")
    await reply(publisher, route, route_seq, b"theirs")
    assert await stored_answer(publisher.js, "other", 12) is None


async def test_no_agent_can_claim_an_answers_deduplication_id_first(publisher: Publisher) -> None:
    """An agent's user may send any header on its own subjects: a ``Nats-Msg-Id`` it guessed
    must not make JetStream drop the genuine reply or the routers' error as duplicates."""
    route, route_seq = await decide(publisher, 13, "chosen")
    for guess in ("reply:acme:13:1", "error:acme:13:1", "reply:acme:chosen:13:1"):
        headers = {"Nats-Msg-Id": guess}
        await publisher.publish(Outbound(reply_subject(T, "other", 13), b"squat", headers))
    await reply(publisher, route, route_seq, b"genuine")
    found = await stored_answer(publisher.js, T, 13)
    assert found is not None
    assert found.data == b"genuine"
    body, headers = error_answer("no_route", "nobody")
    ack = await publisher.publish(Outbound(error_subject(T, 13), body, headers))
    assert not ack.duplicate


async def test_the_reply_store_appends_without_waiting_and_logs_what_failed(
    publisher: Publisher,
) -> None:
    """Stored: nothing logged, nothing left pending. Refused (no stream there): logged when
    the answer comes. Never answered (a subscriber that does not reply): logged by the
    sweep after the timeout."""
    nc = publisher.nc
    silent = await nc.subscribe("sink.replies")  # a responder that never answers
    store = ReplyStore(nc, "chosen", timeout=0.3, ack_every=1, pause=0.0)
    _, route_seq = await decide(publisher, 21, "chosen")
    with capture_logs() as captured:
        headers = reply_headers(route_seq, {"Content-Type": "text/plain"})
        await store.append(reply_subject(T, "chosen", 21), b"stored", headers, 21)
        await store.append("nostream.replies", b"refused", {}, 22)
        await store.append("sink.replies", b"unanswered", {}, 23)

        async def two_left_one() -> bool:
            return store.pending == 1 and len(not_stored(captured)) == 1

        assert await await_until(two_left_one, timeout=5), captured
        await asyncio.sleep(0.35)
        store.sweep()
    await silent.unsubscribe()
    logs = not_stored(captured)
    found = await stored_answer(publisher.js, T, 21)
    assert found is not None
    assert found.data == b"stored"
    assert store.pending == 0
    assert [(e["event"], e["message_seqs"]) for e in logs] == [
        ("agent_reply_not_stored", [22]),
        ("agent_reply_not_stored", [23]),
    ]
    assert "no JetStream stream" in logs[0]["error"]
    assert "no acknowledgement" in logs[1]["error"]


async def test_the_reply_store_asks_for_an_ack_on_the_first_append_and_every_nth(
    publisher: Publisher,
) -> None:
    store = ReplyStore(publisher.nc, "chosen", ack_every=3, pause=0.0, log_every=0.0)
    with capture_logs() as captured:
        for seq in range(31, 38):  # asks on the 1st, 4th and 7th
            await store.append("nostream.replies", b"refused", {}, seq)

        async def three_heard() -> bool:
            return len(not_stored(captured)) == 3

        assert await await_until(three_heard, timeout=5)
    assert sorted(e["message_seqs"][0] for e in not_stored(captured)) == [31, 34, 37]


async def test_the_reply_store_stops_storing_for_a_while_after_a_permission_violation(
    publisher: Publisher,
) -> None:
    """Without the permission, every append would be a server error and a log line. The
    server reports the violation on the connection (the agent's error callback)."""
    store = ReplyStore(publisher.nc, "chosen", ack_every=1, pause=60.0)
    subject = reply_subject(T, "chosen", 41)
    with capture_logs() as captured:
        store.connection_error(f'nats: Permissions Violation for Publish to "{subject}"')
        store.connection_error('nats: Permissions Violation for Publish to "other.subject"')
        _, route_seq = await decide(publisher, 42, "chosen")
        headers = reply_headers(route_seq, {"Content-Type": "text/plain"})
        await store.append(reply_subject(T, "chosen", 42), b"skipped", headers, 42)
        await publisher.nc.flush()
        await asyncio.sleep(0.2)
    (logged,) = not_stored(captured)  # the other subject's violation is not this store's
    assert logged["paused_seconds"] == 60.0
    assert subject in logged["error"]
    assert await stored_answer(publisher.js, T, 42) is None
    assert store.pending == 0


async def test_a_stream_that_answers_503_pauses_nothing_and_is_logged_once_a_while(
    publisher: Publisher,
) -> None:
    """A ``ROUTES`` without a leader (an election after a node died) answers 503, or not at
    all, for seconds. Storing went on pausing for a minute after one such failure, and every
    reply of that minute was lost; now the next reply is stored, and the failures of one
    kind are logged once every 10 s."""
    store = ReplyStore(publisher.nc, "chosen", ack_every=1, pause=60.0)
    with capture_logs() as captured:
        for seq in (51, 52, 53):  # no stream answers: 503, as while a leader is elected
            await store.append(f"nostream.replies.{seq}", b"refused", {}, seq)

        async def all_answered() -> bool:
            return store.pending == 0

        assert await await_until(all_answered, timeout=5)
        _, route_seq = await decide(publisher, 54, "chosen")
        headers = reply_headers(route_seq, {"Content-Type": "text/plain"})
        await store.append(reply_subject(T, "chosen", 54), b"stored", headers, 54)

        async def stored() -> bool:
            return await stored_answer(publisher.js, T, 54) is not None

        assert await await_until(stored, timeout=5)
    (logged,) = not_stored(captured)
    assert logged["message_seqs"] == [51]
    assert "paused_seconds" not in logged


def not_stored(captured: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in captured if e["event"] == "agent_reply_not_stored"]


async def test_an_agents_reply_wins_over_an_error_stored_after_it(publisher: Publisher) -> None:
    """An agent that replied and lost its ack runs the message again past its deadline: the
    router then stores ``deadline_exceeded``, and a retried request got that error where
    the first caller had heard the reply."""
    route, route_seq = await decide(publisher, 13, "chosen")
    await reply(publisher, route, route_seq, b"the answer")
    body, headers = error_answer("deadline_exceeded", "expired: the deadline passed")
    await publisher.publish(Outbound(error_subject(T, 13), body, headers))
    found = await stored_answer(publisher.js, T, 13)
    assert found is not None
    assert (found.subject, found.data) == (reply_subject(T, "chosen", 13), b"the answer")
