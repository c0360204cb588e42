"""An agent's inbox consumer belongs to its tenant: two tenants' agents of one name each read
their own inbox, and an agent adopts the consumer an earlier version named without it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from broker.agent import Agent, Request
from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.routing.events import RouteDecided, inbox_subject
from broker.streams import Stream
from tests._wait import await_until
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration

MANIFEST = {
    "name": "translator",
    "version": "1.0.0",
    "description": "Translates text",
    "capabilities": [{"action": "translate", "description": "translate", "content_types": []}],
}


def tenant_agent(tenant: str, nats_url: str, seen: list[bytes]) -> Agent:
    agent = Agent(MANIFEST, nats_url=nats_url, tenant=tenant, heartbeat_interval=0.2)

    @agent.handler
    async def handle(request: Request) -> bytes:
        seen.append(request.payload)
        return b"ok"

    return agent


async def send(publisher: Publisher, tenant: str, payload: bytes, seq: int) -> None:
    route = RouteDecided(tenant, seq, f"msg.{tenant}.chat", _decision(agent="translator"))
    await publisher.publish(Outbound(route.subject, payload, route.to_headers({})))


async def run_until(agents: list[Agent], done: Any) -> None:
    stop = asyncio.Event()
    running = [asyncio.create_task(agent.run(stop)) for agent in agents]
    try:
        assert await await_until(done, timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 10)


async def test_two_tenants_agents_of_one_name_each_read_their_own_inbox(
    publisher: Publisher, nats_url: str
) -> None:
    seen: dict[str, list[bytes]] = {"a": [], "b": []}
    agents = [tenant_agent(t, nats_url, seen[t]) for t in ("a", "b")]
    for n in range(3):
        await send(publisher, "a", f"a-secret-{n}".encode(), n + 1)
    await send(publisher, "b", b"b-own", 10)

    async def all_handled() -> bool:
        return len(seen["a"]) + len(seen["b"]) >= 4

    await run_until(agents, all_handled)
    await asyncio.sleep(0.3)  # nothing more arrives
    assert sorted(seen["a"]) == [b"a-secret-0", b"a-secret-1", b"a-secret-2"]
    assert seen["b"] == [b"b-own"]
    names = {c.name: c.config.filter_subject for c in await publisher.js.consumers_info("ROUTES")}
    assert names["agent-a~translator"] == "route.a.translator"
    assert names["agent-b~translator"] == "route.b.translator"


async def test_the_consumer_an_earlier_version_made_is_adopted_not_replayed_from_the_start(
    publisher: Publisher, nats_url: str
) -> None:
    """``agent-<name>`` already read this inbox: binding a new consumer would run its whole
    history again."""
    inbox = inbox_subject("a", "translator")
    await send(publisher, "a", b"handled-long-ago", 1)
    legacy = await publisher.js.pull_subscribe(
        inbox,
        durable="agent-translator",
        stream=Stream.ROUTES,
        config=ConsumerConfig(
            durable_name="agent-translator", ack_policy=AckPolicy.EXPLICIT, filter_subject=inbox
        ),
    )
    for message in await legacy.fetch(1, timeout=5):
        await message.ack()
    await send(publisher, "a", b"new", 2)
    seen: list[bytes] = []

    async def handled() -> bool:
        return len(seen) >= 1

    await run_until([tenant_agent("a", nats_url, seen)], handled)
    await asyncio.sleep(0.3)
    assert seen == [b"new"]
    names = [c.name for c in await publisher.js.consumers_info("ROUTES")]
    assert "agent-a~translator" not in names


async def test_a_consumer_of_this_agents_name_on_another_inbox_is_refused(
    publisher: Publisher, nats_url: str
) -> None:
    other = inbox_subject("b", "translator")
    await publisher.js.add_consumer(
        Stream.ROUTES, ConsumerConfig(durable_name="agent-a~translator", filter_subject=other)
    )
    with pytest.raises(RuntimeError, match=r"reads route\.b\.translator"):
        await tenant_agent("a", nats_url, []).run(asyncio.Event())
