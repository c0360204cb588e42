"""The agent SDK settles every message it takes and keeps consuming: a reply it cannot
serialise or send is a recorded failure, an outage of any length is waited out, a connection
closed for good is an error, and a long handler is kept alive on its consumer's ack_wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

import broker.agent
from broker.agent import Agent, Reply, Request
from broker.embedded import NatsServer
from broker.envelope import Outbound
from broker.errors import Unavailable
from broker.natsconn import open_client
from broker.publisher import Publisher
from broker.routing.events import (
    H_REPLY_TO,
    FailureReason,
    RouteDecided,
    RouteFailed,
    failed_subject,
    inbox_subject,
)
from broker.streams import AGENT_LOAD_BUCKET, Stream
from tests._wait import await_until
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration

NAME = "render"
MANIFEST = {
    "name": NAME,
    "version": "1.0.0",
    "description": "Renders documents",
    "capabilities": [{"action": "render", "description": "render", "content_types": []}],
}
CALLER = "_INBOX.caller"


async def send(publisher: Publisher, seq: int, *, reply_to: str | None = None) -> None:
    route = RouteDecided("default", seq, "msg.default.docs", _decision(agent=NAME))
    headers = route.to_headers({H_REPLY_TO: reply_to} if reply_to else {})
    await publisher.publish(Outbound(route.subject, b"doc-%d" % seq, headers))


async def stored_failure(publisher: Publisher) -> RouteFailed | None:
    """The last ``RouteFailed`` the agent appended to ``ROUTES``, if any."""
    try:
        raw = await publisher.js.get_last_msg(Stream.ROUTES, failed_subject("default", NAME))
    except nats.js.errors.NotFoundError:
        return None
    return RouteFailed.from_headers(raw.headers or {})


async def caller_replies(publisher: Publisher) -> list[Msg]:
    """Replies that reach a caller waiting on :data:`CALLER`."""
    replies: list[Msg] = []

    async def on_reply(message: Msg) -> None:
        replies.append(message)

    await publisher.nc.subscribe(CALLER, cb=on_reply)
    return replies


async def stopped(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def running_echo(nats_url: str, **options: Any) -> AsyncIterator[Agent]:
    """An agent of :data:`MANIFEST` answering ``b"ok"``, running until the block ends."""
    agent = Agent(MANIFEST, nats_url=nats_url, **options)

    @agent.handler
    async def handle(request: Request) -> bytes:
        return b"ok"

    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        await stopped(running, stop)


@pytest.fixture
def agent_connections(monkeypatch: pytest.MonkeyPatch) -> list[NatsClient]:
    """The agents' NATS connections, with reconnection attempts 0.05 s apart (not 2 s or
    0.25 s), so that nats-py's default budget of 60 attempts runs out within 3 s."""
    connections: list[NatsClient] = []

    async def fast_reconnecting(**options: Any) -> NatsClient:
        options["reconnect_time_wait"] = 0.05
        nc = await open_client(**options)
        connections.append(nc)
        return nc

    monkeypatch.setattr(broker.agent, "open_client", fast_reconnecting)
    return connections


async def run_until_a_failure_is_stored(
    agent: Agent, publisher: Publisher, *, linger: float = 0.0
) -> None:
    """Run ``agent`` until a ``RouteFailed`` is stored, and ``linger`` seconds more."""
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:

        async def failure_recorded() -> bool:
            return await stored_failure(publisher) is not None

        assert await await_until(failure_recorded, timeout=10)
        await asyncio.sleep(linger)
    finally:
        await stopped(running, stop)


async def test_a_result_that_cannot_be_serialised_is_a_recorded_failure_not_a_rerun(
    publisher: Publisher, nats_url: str
) -> None:
    """``{1: "x"}`` has no JSON form: the route fails once (reason ``error``) and the message
    is settled, rather than left unacked to run again at every ack_wait."""
    replies = await caller_replies(publisher)
    await send(publisher, 1, reply_to=CALLER)
    agent = Agent(MANIFEST, nats_url=nats_url, ack_wait=1.0, heartbeat_interval=0.2)
    calls: list[int] = []

    @agent.handler
    async def handle(request: Request) -> dict[int, str]:
        calls.append(request.attempt)
        return {1: "int keys are not JSON"}

    # over two ack_waits after the failure: an unsettled message would run again
    await run_until_a_failure_is_stored(agent, publisher, linger=2.5)
    failure = await stored_failure(publisher)
    assert failure is not None
    assert failure.reason is FailureReason.ERROR
    assert "cannot be serialised as JSON" in failure.message
    assert calls == [1]
    assert replies == []
    info = await publisher.js.consumer_info(Stream.ROUTES, agent.consumer_name)
    assert (info.num_ack_pending, info.num_redelivered, info.ack_floor.stream_seq) == (0, 0, 1)


class _Unprintable:
    def __repr__(self) -> str:  # an ORM object whose session is closed, say
        raise RuntimeError("session closed")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (Reply("text", "text/plain"), "payload must be bytes, not str"),  # type: ignore[arg-type]
        (Reply(b"x", None), "content_type must be a media type, not None"),  # type: ignore[arg-type]
        (Reply(b"x", "text/plain\r\nX-Injected: 1"), "content_type must be a media type"),
        (ValueError(_Unprintable()), "<ValueError that cannot be shown>"),
    ],
    ids=["str-payload", "no-content-type", "content-type-with-newline", "unprintable-exception"],
)
async def test_a_result_the_sdk_cannot_send_or_show_is_recorded_once_not_run_again(
    publisher: Publisher, nats_url: str, result: object, expected: str
) -> None:
    """A ``Reply`` with a str payload was acked as handled with no reply sent or stored (the
    caller waited to its deadline); one without a content type, and an exception whose
    ``repr`` raises, escaped the SDK's task: the message stayed unsettled and the handler ran
    again at every ack_wait. Each is now the handler's recorded failure, settled at once."""
    replies = await caller_replies(publisher)
    await send(publisher, 1, reply_to=CALLER)
    agent = Agent(MANIFEST, nats_url=nats_url, ack_wait=1.0, heartbeat_interval=0.2)
    calls: list[int] = []

    @agent.handler
    async def handle(request: Request) -> object:
        calls.append(request.attempt)
        if isinstance(result, Exception):
            raise result
        return result

    await run_until_a_failure_is_stored(agent, publisher, linger=2.5)  # two ack_waits more
    failure = await stored_failure(publisher)
    assert failure is not None
    assert failure.reason is FailureReason.ERROR
    assert expected in failure.message
    assert calls == [1]
    assert replies == []
    assert (agent.handled, agent.failed) == (0, 1)
    info = await publisher.js.consumer_info(Stream.ROUTES, agent.consumer_name)
    assert (info.num_ack_pending, info.num_redelivered, info.ack_floor.stream_seq) == (0, 0, 1)


async def test_a_heartbeat_slower_than_the_buckets_ttl_allows_is_shortened(
    publisher: Publisher, nats_url: str
) -> None:
    """Routers forget an instance whose newest heartbeat is older than ``agent_load``'s TTL
    (15 s): at 20 s an instance was out of routing for 5 s of every 20."""
    ttl = (await (await publisher.js.key_value(AGENT_LOAD_BUCKET)).status()).ttl
    assert ttl is not None
    async with running_echo(nats_url, heartbeat_interval=ttl + 5) as agent:

        async def connected() -> bool:
            return agent.heartbeat_interval < ttl

        assert await await_until(connected, timeout=10)
    assert agent.heartbeat_interval == pytest.approx(ttl / 3)


@pytest.mark.parametrize("over_by", ["payload", "headers"])
async def test_a_reply_over_the_servers_max_payload_is_a_recorded_failure(
    publisher: Publisher, nats_url: str, over_by: str
) -> None:
    """A reply the server would refuse (its payload alone, or with the reply headers) is not
    counted as handled: ``RouteFailed`` (reason ``error``) lets the router retry or
    dead-letter it, so the caller hears of it rather than waiting to its deadline."""
    limit = publisher.max_payload
    size = limit + 1 if over_by == "payload" else limit - 16
    replies = await caller_replies(publisher)
    await send(publisher, 1, reply_to=CALLER)
    agent = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2)

    @agent.handler
    async def handle(request: Request) -> bytes:
        return b"\0" * size

    await run_until_a_failure_is_stored(agent, publisher)
    failure = await stored_failure(publisher)
    assert failure is not None
    assert failure.reason is FailureReason.ERROR
    assert f"max_payload of {limit}" in failure.message
    assert (agent.handled, agent.failed) == (0, 1)
    assert replies == []
    info = await publisher.js.consumer_info(Stream.ROUTES, agent.consumer_name)
    assert (info.num_ack_pending, info.ack_floor.stream_seq) == (0, 1)


async def test_a_reply_within_max_payload_still_reaches_the_caller(
    publisher: Publisher, nats_url: str
) -> None:
    replies = await caller_replies(publisher)
    await send(publisher, 1, reply_to=CALLER)
    agent = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2)

    @agent.handler
    async def handle(request: Request) -> bytes:
        return b"\0" * (publisher.max_payload - 4096)

    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:

        async def replied() -> bool:
            return len(replies) == 1

        assert await await_until(replied, timeout=10)
    finally:
        await stopped(running, stop)
    assert (agent.handled, agent.failed) == (1, 0)
    assert await stored_failure(publisher) is None


async def test_an_agent_waits_out_an_outage_longer_than_nats_pys_reconnect_budget(
    publisher: Publisher,
    nats_server: NatsServer,
    nats_url: str,
    agent_connections: list[NatsClient],
) -> None:
    """NATS away for longer than 60 reconnection attempts: the agent reconnects when it is
    back and handles what was routed to it, instead of returning from ``run()``."""
    agent = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2)
    seen: list[int] = []

    @agent.handler
    async def handle(request: Request) -> bytes:
        seen.append(request.message_seq)
        return b"ok"

    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        await send(publisher, 1)

        async def handled_first() -> bool:
            return seen == [1]

        assert await await_until(handled_first, timeout=10)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(6)  # the outage: twice what 60 attempts 0.05 s apart take
        await asyncio.to_thread(nats_server.start)
        assert await publisher.wait_connected(10)

        async def sent_second() -> bool:
            try:
                await send(publisher, 2)
            except Exception:  # the publisher is still reconnecting
                return False
            return True

        assert await await_until(sent_second, timeout=15, interval=0.25)

        async def handled_second() -> bool:
            return running.done() or seen == [1, 2]

        assert await await_until(handled_second, timeout=15)
        assert not running.done()
        assert seen == [1, 2]
    finally:
        await stopped(running, stop)
    assert [nc.is_closed for nc in agent_connections] == [True]  # closed by the stop alone


async def test_a_connection_closed_for_good_makes_run_raise(
    publisher: Publisher, nats_url: str, agent_connections: list[NatsClient]
) -> None:
    """``run()`` returning normally would read as a clean stop to a supervisor; an agent
    that can no longer consume fails instead."""
    agent = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2)

    @agent.handler
    async def handle(request: Request) -> bytes:
        return b"ok"

    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))

    async def connected() -> bool:
        return len(agent_connections) == 1 and agent_connections[0].is_connected

    assert await await_until(connected, timeout=10)

    async def consuming() -> bool:  # its first heartbeat comes once its start is done
        kv = await publisher.js.key_value(AGENT_LOAD_BUCKET)
        try:
            return bool(await kv.keys())
        except nats.js.errors.NoKeysError:
            return False

    assert await await_until(consuming, timeout=10)
    await agent_connections[0].close()
    with pytest.raises(Unavailable, match="stopped consuming"):
        await asyncio.wait_for(running, 15)
    assert not stop.is_set()


async def test_a_connection_closed_while_the_agent_starts_says_so(
    publisher: Publisher, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed before the start was done, it surfaced as a bare nats-py error, or, when a
    request of the start was cut off, as a JetStream permission question."""
    agent = Agent(MANIFEST, nats_url=nats_url)

    @agent.handler
    async def handle(request: Request) -> bytes:
        return b"ok"

    subscribe = agent._subscribe

    async def closed_first(*args: Any) -> Any:
        assert agent._nc is not None
        await agent._nc.close()
        return await subscribe(*args)

    monkeypatch.setattr(agent, "_subscribe", closed_first)
    with pytest.raises(Unavailable, match="closed while the agent was starting"):
        await asyncio.wait_for(agent.run(asyncio.Event()), 15)


async def test_a_long_handler_is_kept_alive_on_the_consumers_ack_wait_not_the_asked_one(
    publisher: Publisher, nats_url: str
) -> None:
    """The inbox consumer exists with ``ack_wait`` 1 s (an earlier deployment made it);
    an instance asking 30 s binds to it as it is, so its keep-alive must beat every
    half second, or a 3 s handler is delivered again and runs twice."""
    inbox = inbox_subject("default", NAME)
    agent = Agent(MANIFEST, nats_url=nats_url, ack_wait=30.0, heartbeat_interval=0.2)
    await publisher.js.add_consumer(
        Stream.ROUTES,
        ConsumerConfig(
            durable_name=agent.consumer_name,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=1.0,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=inbox,
        ),
    )
    calls: list[int] = []

    @agent.handler
    async def handle(request: Request) -> bytes:
        calls.append(request.message_seq)
        await asyncio.sleep(3)
        return b"done"

    await send(publisher, 1)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:

        async def handled() -> bool:
            return agent.handled >= 1

        assert await await_until(handled, timeout=15)
    finally:
        await stopped(running, stop)
    assert calls == [1]
    info = await publisher.js.consumer_info(Stream.ROUTES, agent.consumer_name)
    assert info.config.ack_wait == 1.0  # bound as it was, not changed under other instances
    assert (info.num_redelivered, info.num_ack_pending) == (0, 0)


async def test_a_handler_cancelled_at_the_end_of_the_drain_hands_its_message_back_at_once(
    publisher: Publisher, nats_url: str
) -> None:
    """An instance stopping with a handler still running past ``drain_timeout`` cancels it;
    its message used to wait out the consumer's ack_wait (60 s) before another instance got
    it. It is handed back (a nak) as the handler is cancelled."""
    await send(publisher, 1)
    first = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2, drain_timeout=0.3)
    started = asyncio.Event()

    @first.handler
    async def slow(request: Request) -> str:
        started.set()
        await asyncio.sleep(60)
        return "too late"

    stop_first = asyncio.Event()
    running_first = asyncio.create_task(first.run(stop_first))
    await asyncio.wait_for(started.wait(), 10)
    second = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2)
    handled: list[bytes] = []

    @second.handler
    async def quick(request: Request) -> str:
        handled.append(request.payload)
        return "done"

    stop_second = asyncio.Event()
    running_second = asyncio.create_task(second.run(stop_second))
    try:
        await stopped(running_first, stop_first)

        async def taken_over() -> bool:
            return handled == [b"doc-1"]

        assert await await_until(taken_over, timeout=5)
    finally:
        await stopped(running_second, stop_second)


async def test_an_agent_subscribes_to_its_reply_acks_before_its_first_reply(
    publisher: Publisher, nats_server: NatsServer
) -> None:
    """Subscribing on the first stored reply flushed the connection between the reply sent
    to the caller and its stored copy: an agent killed then (before its ack) had answered
    the caller with a reply never stored, and a retry of the request waited in vain. The
    subscription is made as the agent connects, before any message."""
    async with running_echo(nats_server.url, heartbeat_interval=0.2) as agent:

        def connz() -> Any:
            url = f"{nats_server.monitor_url}/connz?subs=1"
            with urllib.request.urlopen(url) as answer:
                return json.loads(answer.read())

        async def subscribed() -> bool:
            store = agent._reply_store
            acks = f"{store._prefix}*" if store is not None and store._prefix else None
            connections = (await asyncio.to_thread(connz))["connections"]
            mine = [c for c in connections if c.get("name", "").startswith("agent-")]
            return any(acks in c.get("subscriptions_list", []) for c in mine)

        assert await await_until(subscribed, timeout=10)
        assert agent.handled == 0
