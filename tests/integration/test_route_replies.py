"""Stored answers to waiting routed messages (``broker.routing.replies``) on a real server:
which ones a retried request may take."""

from __future__ import annotations

import pytest

from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.routing.events import RouteDecided, inbox_subject
from broker.routing.replies import (
    error_answer,
    error_subject,
    reply_headers,
    reply_subject,
    stored_answer,
)
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


@pytest.mark.parametrize("forgery", ["another message", "a mirror's decision", "no route seq"])
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
    else:
        subject = reply_subject(T, "chosen", 8)
        await publisher.publish(Outbound(subject, b"x", {"Broker-Event": "RouteReplied"}))
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
