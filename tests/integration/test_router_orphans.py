"""What a deregistered agent's inbox holds is taken back by the routers (on a real
nats-server): routed to the next candidate, or dead-lettered with the reason, the waiting
caller told; before, it waited in the inbox for an instance that never came."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from datetime import UTC, datetime

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from structlog.testing import capture_logs

from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.registry.commands import delete_agent, put_agent
from broker.registry.manifest import AgentManifest
from broker.routing.embedder import HashingEmbedder
from broker.routing.events import (
    H_REPLY_TO,
    H_ROUTE_MODE,
    ROUTE_MODE_AUTO,
    FailureReason,
    RouteDecided,
    RouteFailed,
)
from broker.streams import Stream, dlq_subject
from tests._wait import await_until
from tests.integration.test_router import T, start_router
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration

TEXT = b"please translate this letter into German"
#: The agents' descriptions: the first matches :data:`TEXT` best.
TRANSLATOR = "Translates letters into German."
LINGUIST = "Spanish poetry and French grammar."


async def register(publisher: Publisher, name: str, description: str) -> None:
    manifest = {
        "name": name,
        "version": "1.0.0",
        "description": description,
        "capabilities": [{"action": "translate"}],
    }
    await put_agent(publisher, T, AgentManifest.model_validate(manifest))


async def routed(publisher: Publisher, headers: dict[str, str] | None = None) -> int:
    """Store a message for the routers; its sequence."""
    stored = {H_ROUTE_MODE: ROUTE_MODE_AUTO, **(headers or {})}
    return (await publisher.publish(Outbound(f"msg.{T}.chat", TEXT, stored))).seq


async def records(publisher: Publisher, subject: str, stream: Stream = Stream.ROUTES) -> list[Msg]:
    """Every record of ``stream`` on ``subject`` (a filter), oldest first."""
    found = []
    sub = await publisher.js.subscribe(subject, stream=stream, ordered_consumer=True)
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            found.append(await sub.next_msg(timeout=0.5))
    await sub.unsubscribe()
    return found


async def decisions(publisher: Publisher, message_seq: int) -> list[RouteDecided]:
    found = [
        RouteDecided.from_headers(m.headers or {}) for m in await records(publisher, "route.*.*")
    ]
    return [d for d in found if d.message_seq == message_seq]


async def decided(publisher: Publisher, message_seq: int, attempt: int) -> RouteDecided:
    """The decision of ``attempt`` for the message, once stored."""
    found: list[RouteDecided] = []

    async def stored() -> bool:
        found[:] = [d for d in await decisions(publisher, message_seq) if d.attempt == attempt]
        return bool(found)

    assert await await_until(stored, timeout=15)
    return found[0]


async def stopped(stop: asyncio.Event, running: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(running, 10)


async def test_a_deregistered_agents_queued_message_goes_to_the_next_candidate(
    publisher: Publisher,
) -> None:
    """An agent whose instances stopped (their inbox consumer left behind) is deregistered
    with a message in its inbox: the message is decided again for the other agent, the
    first counted as tried, and the failure that hands it over says why."""
    await register(publisher, "translator", TRANSLATOR)
    await register(publisher, "linguist", LINGUIST)
    for agent in ("translator", "linguist"):
        await publisher.js.add_consumer(Stream.ROUTES, inbox_consumer(agent))
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        seq = await routed(publisher)
        first = (await decided(publisher, seq, 1)).decision.agent
        assert first is not None
        await delete_agent(publisher, T, first)
        second = await decided(publisher, seq, 2)
    finally:
        await stopped(stop, running)
    assert second.decision.agent == ({"translator", "linguist"} - {first}).pop()
    assert second.tried == (first,)
    failures = await records(publisher, f"route.{T}.{first}.failed")
    assert len(failures) == 1
    failure = RouteFailed.from_headers(failures[0].headers or {})
    assert failure.reason is FailureReason.DEREGISTERED
    assert failure.message == f"agent {first!r} was deregistered before it ran the message"
    assert not router.cooldowns.cooling(T)  # a deregistration is no error of the agent
    assert router.sweeper is not None
    assert router.sweeper.stats.rerouted == 1
    assert await inbox_left(publisher, first) == 0


async def inbox_left(publisher: Publisher, agent: str) -> int:
    """What the agent's inbox consumer still has to deliver or settle."""
    info = await publisher.js.consumer_info(Stream.ROUTES, f"agent-{T}~{agent}")
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def test_with_no_other_candidate_the_message_is_dead_lettered_and_its_caller_told(
    publisher: Publisher,
) -> None:
    """A waiting caller hears ``agent_error`` with the reason, and the DLQ keeps the message;
    the inbox consumer is kept and has nothing left."""
    await register(publisher, "translator", TRANSLATOR)
    await publisher.js.add_consumer(Stream.ROUTES, inbox_consumer("translator"))
    caller = await publisher.nc.subscribe("caller.orphan")
    _, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        seq = await routed(publisher, {H_REPLY_TO: "caller.orphan"})
        assert (await decided(publisher, seq, 1)).decision.agent == "translator"
        await delete_agent(publisher, T, "translator")
        answer = await caller.next_msg(timeout=15)
    finally:
        await stopped(stop, running)
    assert (answer.headers or {}).get("Broker-Error") == "agent_error"
    assert b"'translator' was deregistered before it ran the message" in answer.data
    dead = [
        RouteDecided.from_headers(m.headers or {})
        for m in await records(publisher, dlq_subject(T), Stream.DLQ)
    ]
    assert [(d.message_seq, d.attempt, d.decision.agent) for d in dead] == [(seq, 2, None)]
    assert "was deregistered" in dead[0].decision.detail
    assert await inbox_left(publisher, "translator") == 0


async def test_a_router_started_after_the_deregistration_takes_back_what_the_inbox_holds(
    publisher: Publisher,
) -> None:
    """The inbox consumer an agent's instances left, with two messages not yet delivered, of
    an agent deregistered while no router ran: the router finds it at its start."""
    await two_translators(publisher)
    _, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        seqs = [await routed(publisher) for _ in range(2)]
        firsts = [(await decided(publisher, seq, 1)).decision.agent for seq in seqs]
    finally:
        await stopped(stop, running)
    assert firsts == ["translator", "translator"]
    await delete_agent(publisher, T, "translator")
    _, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        seconds = [(await decided(publisher, seq, 2)).decision.agent for seq in seqs]
    finally:
        await stopped(stop, running)
    assert seconds == ["linguist", "linguist"]
    assert await inbox_left(publisher, "translator") == 0


async def test_an_agent_registered_again_keeps_its_inbox(publisher: Publisher) -> None:
    """Deregistered and registered again at once: what its inbox holds stays for it."""
    await two_translators(publisher)
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        seq = await routed(publisher)
        assert (await decided(publisher, seq, 1)).decision.agent == "translator"
        await delete_agent(publisher, T, "translator")
        await register(publisher, "translator", TRANSLATOR)
        await asyncio.sleep(3)  # a sweep would have run by now (one look a second)
    finally:
        await stopped(stop, running)
    assert [d.attempt for d in await decisions(publisher, seq)] == [1]
    assert await inbox_left(publisher, "translator") == 1
    assert router.sweeper is not None
    assert router.sweeper.stats.rerouted == 0


async def two_translators(publisher: Publisher) -> None:
    """The two agents of these tests (the first matches :data:`TEXT` best) and the inbox
    consumer the first one's instances left."""
    await register(publisher, "translator", TRANSLATOR)
    await register(publisher, "linguist", LINGUIST)
    await publisher.js.add_consumer(Stream.ROUTES, inbox_consumer("translator"))


def inbox_consumer(agent: str) -> ConsumerConfig:
    """The inbox consumer an instance of ``agent`` makes (the SDK's defaults)."""
    return ConsumerConfig(
        durable_name=f"agent-{T}~{agent}",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=60.0,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=f"route.{T}.{agent}",
    )


async def test_an_inbox_no_consumer_reads_is_left_alone_and_logged(publisher: Publisher) -> None:
    """Its consumer may have been lost (deleted, ROUTES restored) after instances ran what
    it holds: swept from its first record, what they ran would be routed again."""
    await two_translators(publisher)
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        seqs = [await routed(publisher) for _ in range(2)]
        assert [(await decided(publisher, seq, 1)).decision.agent for seq in seqs] == [
            "translator",
            "translator",
        ]
        sub = await publisher.js.pull_subscribe_bind(
            durable=f"agent-{T}~translator", stream=Stream.ROUTES
        )
        for message in await sub.fetch(2, timeout=5):  # an instance ran both
            await message.ack()
        await sub.unsubscribe()
        await publisher.js.delete_consumer(Stream.ROUTES, f"agent-{T}~translator")
        with capture_logs() as logs:
            await delete_agent(publisher, T, "translator")

            async def logged() -> bool:
                return any(e["event"] == "inbox_not_swept" for e in logs)

            assert await await_until(logged, timeout=10)
    finally:
        await stopped(stop, running)
    assert [d.attempt for seq in seqs for d in await decisions(publisher, seq)] == [1, 1]
    assert router.sweeper is not None
    assert router.sweeper.stats.rerouted == 0


async def test_a_decision_stored_after_the_inbox_was_swept_empty_is_taken_back_too(
    publisher: Publisher,
) -> None:
    """A router whose view still had the agent decides for it, and its append lands after
    the sweepers found the inbox empty (retried through a leader election, say): the gone
    agent's inbox is looked at for a while after it was first found empty."""
    await two_translators(publisher)
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        seq = await routed(publisher)
        late = await decided(publisher, seq, 1)
        assert late.decision.agent == "translator"
        sub = await publisher.js.pull_subscribe_bind(
            durable=f"agent-{T}~translator", stream=Stream.ROUTES
        )
        for message in await sub.fetch(1, timeout=5):  # an instance ran it
            await message.ack()
        await sub.unsubscribe()
        await delete_agent(publisher, T, "translator")

        async def found_empty() -> bool:
            sweeper = router.sweeper  # made as the router runs
            return sweeper is not None and (T, "translator") in sweeper._empty_since

        assert await await_until(found_empty, timeout=10)
        again = replace(late, message_seq=seq + 100)  # a message decided before the delete
        await publisher.publish(Outbound(again.subject, TEXT, again.to_headers({})))
        rerouted = await decided(publisher, seq + 100, 2)
    finally:
        await stopped(stop, running)
    assert rerouted.decision.agent == "linguist"


async def test_a_registered_agent_saying_deregistered_is_counted_as_failing(
    publisher: Publisher,
) -> None:
    """An agent's NATS user may write any reason on its own ``.failed`` subject: one that
    says ``deregistered`` while registered would escape its cooldown."""
    await register(publisher, "translator", TRANSLATOR)
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        await router.registry.wait_for(1)
        route = RouteDecided(T, 1, f"msg.{T}.chat", replace(_decision(), agent="translator"))
        claims = RouteFailed(route, FailureReason.DEREGISTERED, "not me", "i-1", 1)
        for seq in range(router.policy.cooldown.errors):  # one failure counts once
            router.observe_failure(replace(claims, route=replace(route, message_seq=seq + 1)))
        # The sweep's, of a decision made before the agent was registered again: believed.
        swept = replace(route, decided_at=datetime(2020, 1, 1, tzinfo=UTC), message_seq=99)
        assert router._believed(replace(claims, route=swept)).reason is FailureReason.DEREGISTERED
        assert router._believed(claims).reason is FailureReason.ERROR
    finally:
        await stopped(stop, running)
    assert "translator" in router.cooldowns.cooling(T)
