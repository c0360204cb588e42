"""A ``RouteFailed`` that would be over the server's ``max_payload`` (the routed payload
plus the failure's headers) is made to fit, keeping the payload the router sends on to the
next candidate; one that cannot fit is logged, and the message settled. It used to be
published as it was, and the server's ``Maximum Payload Violation`` closed the agent's
connection for good."""

from __future__ import annotations

import asyncio

import nats.js.errors
import pytest
from nats.js.api import RawStreamMsg
from structlog.testing import capture_logs

from broker.agent import Agent, Request
from broker.envelope import CONTENT_TYPE, Outbound
from broker.natsconn import message_size
from broker.publisher import Publisher
from broker.routing.events import H_REPLY_TO, FailureReason, RouteDecided, failed_subject
from broker.routing.types import Decision, DecisionReason
from broker.streams import Stream
from tests._wait import await_until
from tests.integration.test_agent_fixes import CALLER, MANIFEST, NAME, send, stopped, stored_failure
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration

#: A decision with no ranked candidates and no detail: nothing in it can give way.
BARE = Decision(
    agent=NAME,
    capability="render",
    reason=DecisionReason.FALLBACK,
    detail="",
    candidates=(),
    policy_version="test-1",
)


async def route_near_the_limit(
    publisher: Publisher, decision: Decision, original: dict[str, str]
) -> bytes:
    """Route a message whose ``RouteDecided`` is 20 bytes under ``max_payload``: it is
    stored, and the failure's ~100 bytes of ``Broker-Failure`` take it over."""
    route = RouteDecided("default", 1, "msg.default.docs", decision)
    headers = route.to_headers(original)
    payload = b"x" * (publisher.max_payload - message_size(b"", headers) - 20)
    await publisher.publish(Outbound(route.subject, payload, headers))
    return payload


def failing_first(agent: Agent, calls: list[int]) -> None:
    """The handler: the first message fails, any other is answered."""

    @agent.handler
    async def handle(request: Request) -> bytes:
        calls.append(request.message_seq)
        if request.message_seq == 1:
            raise ValueError("the model refused the document")
        return b"ok"


async def stored_failure_message(publisher: Publisher) -> RawStreamMsg | None:
    try:
        return await publisher.js.get_last_msg(Stream.ROUTES, failed_subject("default", NAME))
    except nats.js.errors.NotFoundError:
        return None


async def run_failing_then_answering(
    publisher: Publisher, nats_url: str, calls: list[int]
) -> Agent:
    """Run an agent on the routed message 1 (which fails), then on message 2, which it
    handles only if its connection outlived the failure of message 1."""
    agent = Agent(MANIFEST, nats_url=nats_url, ack_wait=1.0, heartbeat_interval=0.2)
    failing_first(agent, calls)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:

        async def failed_once() -> bool:
            return agent.failed == 1

        assert await await_until(failed_once, timeout=10)
        await send(publisher, 2)

        async def answered_the_next() -> bool:
            return running.done() or agent.handled == 1

        assert await await_until(answered_the_next, timeout=10)
        await asyncio.sleep(2.5)  # over two ack_waits: an unsettled message would run again
        assert not running.done()
    finally:
        await stopped(running, stop)
    return agent


async def test_a_failure_over_max_payload_leaves_the_candidates_out_and_keeps_the_payload(
    publisher: Publisher, nats_url: str
) -> None:
    """The decision's ranked candidates give way first (the ``RouteDecided`` in ``ROUTES``
    keeps them): the failure is stored with the whole payload, and the agent goes on."""
    payload = await route_near_the_limit(publisher, _decision(agent=NAME), {})
    calls: list[int] = []
    with capture_logs() as logs:
        await run_failing_then_answering(publisher, nats_url, calls)
    assert calls == [1, 2]
    failure = await stored_failure(publisher)
    assert failure is not None
    assert failure.reason is FailureReason.ERROR
    assert "the model refused the document" in failure.message
    assert failure.route.decision.agent == NAME
    assert failure.route.decision.candidates == ()
    stored = await stored_failure_message(publisher)
    assert stored is not None
    assert stored.data == payload
    trimmed = [e for e in logs if e["event"] == "route_failure_trimmed"]
    assert [e["left_out"] for e in trimmed] == ["candidates,detail"]
    info = await publisher.js.consumer_info(Stream.ROUTES, f"agent-default~{NAME}")
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


async def test_a_failure_over_max_payload_keeps_only_the_headers_that_answer_and_route(
    publisher: Publisher, nats_url: str
) -> None:
    """No candidates to leave out: the message's own headers other than those that read
    the payload, route it and answer the caller give way."""
    original = {
        CONTENT_TYPE: "text/plain",
        H_REPLY_TO: CALLER,
        "X-Notes": "n" * 2000,
    }
    payload = await route_near_the_limit(publisher, BARE, original)
    calls: list[int] = []
    await run_failing_then_answering(publisher, nats_url, calls)
    assert calls == [1, 2]
    stored = await stored_failure_message(publisher)
    assert stored is not None
    assert stored.data == payload
    headers = stored.headers or {}
    assert headers[CONTENT_TYPE] == "text/plain"
    assert headers[H_REPLY_TO] == CALLER
    assert "X-Notes" not in headers
    failure = await stored_failure(publisher)
    assert failure is not None
    assert "the model refused the document" in failure.message


async def test_a_failure_that_cannot_fit_is_logged_and_the_message_settled(
    publisher: Publisher, nats_url: str
) -> None:
    """Nothing left to give way but the payload, which the router needs to retry: the
    failure is logged (``route_failure_not_storable``) and the message acked, rather than
    the connection lost, or the message handed back to fail again every second."""
    await route_near_the_limit(publisher, BARE, {})
    calls: list[int] = []
    with capture_logs() as logs:
        await run_failing_then_answering(publisher, nats_url, calls)
    assert calls == [1, 2]
    assert await stored_failure(publisher) is None
    assert [e["message_seq"] for e in logs if e["event"] == "route_failure_not_storable"] == [1]
    info = await publisher.js.consumer_info(Stream.ROUTES, f"agent-default~{NAME}")
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)
