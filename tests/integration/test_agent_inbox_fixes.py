"""An agent whose inbox consumer vanishes (deleted by hand, ``ROUTES`` made again) makes it
again and goes on consuming, without running the inbox's history again; one that cannot
make it again stops with an error instead of heartbeating while it consumes nothing. An
instance that could never consume (``concurrency=0``) is refused when it is made."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import nats.js.errors
import pytest
from nats.js.api import DeliverPolicy

from broker.agent import Agent, Request
from broker.errors import Unavailable
from broker.publisher import Publisher
from broker.settings import Settings
from broker.streams import AGENT_LOAD_BUCKET, Stream, provision
from tests._wait import await_until
from tests.integration.test_agent_fixes import MANIFEST, send, stopped

pytestmark = pytest.mark.integration


def recording_agent(nats_url: str, seen: list[int]) -> Agent:
    agent = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2)

    @agent.handler
    async def handle(request: Request) -> bytes:
        seen.append(request.message_seq)
        return b"ok"

    return agent


async def load_keys(publisher: Publisher) -> list[str]:
    kv = await publisher.js.key_value(AGENT_LOAD_BUCKET)
    try:
        return list(await kv.keys())
    except nats.js.errors.NoKeysError:
        return []


async def test_a_deleted_inbox_consumer_is_made_again_where_it_was(
    publisher: Publisher, nats_url: str
) -> None:
    """Two instances; the consumer is deleted under them. What is routed after is handled
    (once), and what was handled before is not delivered again: the consumer made again
    starts after the last message delivered (which each instance reads from the consumer
    on its heartbeats, so one that took none of them knows too), not at the inbox's first."""
    seen_a: list[int] = []
    seen_b: list[int] = []
    agents = [recording_agent(nats_url, seen_a), recording_agent(nats_url, seen_b)]
    stops = [asyncio.Event(), asyncio.Event()]
    runs = [asyncio.create_task(a.run(s)) for a, s in zip(agents, stops, strict=True)]
    try:
        for seq in (1, 2, 3):
            await send(publisher, seq)

        async def handled(count: int) -> bool:
            return len(seen_a) + len(seen_b) >= count

        assert await await_until(lambda: handled(3), timeout=10)

        async def both_know_where_it_is() -> bool:  # each heartbeat reads the consumer
            return all(agent._next_seq == 4 for agent in agents)

        assert await await_until(both_know_where_it_is, timeout=5)
        await publisher.js.delete_consumer(Stream.ROUTES, agents[0].consumer_name)
        for seq in (4, 5):
            await send(publisher, seq)
        assert await await_until(lambda: handled(5), timeout=10)
        await asyncio.sleep(1.0)  # anything delivered again would be handled by now
        assert not any(run.done() for run in runs)
        assert sorted(seen_a + seen_b) == [1, 2, 3, 4, 5]
    finally:
        for run, stop in zip(runs, stops, strict=True):
            await stopped(run, stop)
    info = await publisher.js.consumer_info(Stream.ROUTES, agents[0].consumer_name)
    assert info.config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE
    assert info.config.opt_start_seq == 4
    assert info.num_ack_pending == 0


async def test_an_inbox_consumer_lost_with_routes_made_again_reads_the_new_stream(
    publisher: Publisher, nats_url: str
) -> None:
    """``ROUTES`` deleted and provisioned again (what NATS restarted on an empty store
    looks like): its sequences start at 1 again, and the consumer made again reads it from
    its first message."""
    seen: list[int] = []
    agent = recording_agent(nats_url, seen)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        for seq in (1, 2, 3):
            await send(publisher, seq)

        async def handled_first() -> bool:
            return len(seen) == 3

        assert await await_until(handled_first, timeout=10)
        await publisher.js.delete_stream(Stream.ROUTES)
        await provision(publisher.js, Settings())
        await send(publisher, 7)  # the new stream's sequence 1

        async def handled_after() -> bool:
            return len(seen) == 4

        assert await await_until(handled_after, timeout=10)
        assert not running.done()
    finally:
        await stopped(running, stop)
    assert seen == [1, 2, 3, 7]


async def test_an_agent_whose_inbox_consumer_cannot_be_made_again_stops_with_an_error(
    publisher: Publisher, nats_url: str
) -> None:
    """``ROUTES`` is gone and nobody provisions it: ``run()`` raises ``Unavailable`` (a
    supervisor restarts the instance) and the instance's load entry goes, so routers stop
    choosing it; it used to log ``agent_fetch_failed`` twice a second and heartbeat on."""
    agent = recording_agent(nats_url, [])
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))

    async def heartbeating() -> bool:
        return len(await load_keys(publisher)) == 1

    assert await await_until(heartbeating, timeout=10)
    await publisher.js.delete_stream(Stream.ROUTES)
    with pytest.raises(Unavailable, match="could not be made again"):
        await asyncio.wait_for(running, 15)
    assert not stop.is_set()
    assert await load_keys(publisher) == []


async def test_a_stop_while_the_inbox_consumer_is_made_again_returns_at_once(
    publisher: Publisher, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making the consumer again takes up to three JetStream timeouts (~30 s) when NATS is
    slow to answer; a stop (Ctrl-C) meanwhile used to wait for all of them."""
    agent = recording_agent(nats_url, [])
    remaking = asyncio.Event()

    async def unanswered() -> int | None:  # a JetStream request that gets no answer
        remaking.set()
        await asyncio.sleep(3600)
        return None

    monkeypatch.setattr(agent, "_resume_point", unanswered)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))

    async def heartbeating() -> bool:
        return len(await load_keys(publisher)) == 1

    assert await await_until(heartbeating, timeout=10)
    await publisher.js.delete_consumer(Stream.ROUTES, agent.consumer_name)
    await asyncio.wait_for(remaking.wait(), 10)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert await load_keys(publisher) == []


@pytest.mark.parametrize(
    "options",
    [
        {"concurrency": 0},
        {"concurrency": -1},
        {"concurrency": 2.5},
        {"max_deliveries": 1},
        {"heartbeat_interval": 0},
        {"ack_wait": -1.0},
        {"ack_wait": math.nan},
        {"drain_timeout": -0.5},
        {"drain_timeout": math.inf},
    ],
)
def test_an_agent_that_could_not_run_is_refused_when_it_is_made(options: dict[str, Any]) -> None:
    """``concurrency=0`` never fetched and never said why; such values fail at once."""
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        Agent(MANIFEST, **options)


def test_sensible_agent_options_are_taken() -> None:
    agent = Agent(MANIFEST, concurrency=1, max_deliveries=2, drain_timeout=0)
    assert (agent.concurrency, agent.max_deliveries, agent.drain_timeout) == (1, 2, 0)
