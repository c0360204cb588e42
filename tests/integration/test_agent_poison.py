"""A message that takes down whatever runs it is not run for ever: a handler that kills its
process (a segfault, the OOM killer) is not run again on the ``max_deliveries``-th delivery,
which becomes ``RouteFailed``; and a ``CancelledError`` of the handler's own is a failure,
not a stop to hand the message back for."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker.agent import Agent, Request
from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.routing.events import FailureReason, RouteDecided
from broker.streams import Stream
from tests._wait import await_until
from tests.integration.test_agent_fixes import MANIFEST, NAME, stopped, stored_failure
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: An agent process whose handler ends the process on ``poison`` (as a segfault in a native
#: model would) and stops cleanly once it has handled ``good``.
CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from broker.agent import Agent, Request

    async def main() -> None:
        stop = asyncio.Event()
        agent = Agent(
            json.loads(sys.argv[2]),
            nats_url=sys.argv[1],
            ack_wait=1.0,
            heartbeat_interval=0.2,
            max_deliveries=3,
        )

        @agent.handler
        async def handle(request: Request) -> bytes:
            print("ran", request.payload.decode(), flush=True)
            if request.payload == b"poison":
                os._exit(137)
            stop.set()
            return b"ok"

        await agent.run(stop)

    asyncio.run(main())
    """
)


async def send(publisher: Publisher, seq: int, payload: bytes = b"doc") -> None:
    route = RouteDecided("default", seq, "msg.default.docs", _decision(agent=NAME))
    await publisher.publish(Outbound(route.subject, payload, route.to_headers({})))


def run_child(nats_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, nats_url, json.dumps(MANIFEST)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_message_that_kills_the_process_is_a_route_failure_on_its_last_delivery(
    publisher: Publisher, nats_url: str
) -> None:
    """With ``max_deliveries=3`` the poison runs (and kills the instance) twice; the third
    delivery records ``RouteFailed`` and terminates it instead of killing a third instance,
    which goes on to handle the next message. Without the limit every start died."""
    await send(publisher, 1, payload=b"poison")
    exits: list[int] = []
    ran: list[str] = []
    for _ in range(5):  # a supervisor restarting the instance each time it dies
        child = await asyncio.to_thread(run_child, nats_url)
        exits.append(child.returncode)
        ran += [line.split()[1] for line in child.stdout.splitlines() if line.startswith("ran")]
        if child.returncode == 0:
            break
        if len(exits) == 2:  # the third start takes the third delivery, and a good one
            await send(publisher, 2, payload=b"good")
    assert exits == [137, 137, 0]
    assert ran == ["poison", "poison", "good"]
    failure = await stored_failure(publisher)
    assert failure is not None
    assert failure.route.message_seq == 1
    assert failure.reason is FailureReason.ERROR
    assert "delivered 3 times without being settled" in failure.message
    info = await publisher.js.consumer_info(Stream.ROUTES, f"agent-default~{NAME}")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_handler_that_raises_cancelled_error_itself_fails_once(
    publisher: Publisher, nats_url: str
) -> None:
    """An inner task the handler awaits is cancelled by some library: the handler raises
    ``CancelledError`` while the agent is not stopping. That is the handler's failure
    (``RouteFailed``, acked), not a stop: it used to be handed back at once, and run again
    hundreds of times a second."""
    agent = Agent(MANIFEST, nats_url=nats_url, ack_wait=1.0, heartbeat_interval=0.2)
    calls: list[int] = []

    @agent.handler
    async def handle(request: Request) -> bytes:
        calls.append(request.message_seq)
        inner = asyncio.create_task(asyncio.sleep(10))
        asyncio.get_running_loop().call_later(0.01, inner.cancel)
        await inner
        return b"never"

    await send(publisher, 1)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:

        async def failure_recorded() -> bool:
            return await stored_failure(publisher) is not None

        assert await await_until(failure_recorded, timeout=10)
        await asyncio.sleep(2.5)  # over two ack_waits: a message handed back runs again
        assert not running.done()
    finally:
        await stopped(running, stop)
    assert calls == [1]
    failure = await stored_failure(publisher)
    assert failure is not None
    assert failure.reason is FailureReason.ERROR
    assert "CancelledError" in failure.message
    assert (agent.handled, agent.failed) == (0, 1)
    info = await publisher.js.consumer_info(Stream.ROUTES, agent.consumer_name)
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


async def test_a_handler_stopped_at_the_end_of_the_drain_is_handed_back_not_failed(
    publisher: Publisher, nats_url: str
) -> None:
    """The agent's own cancellation at the end of the drain is still a stop: no
    ``RouteFailed``, and the message is delivered again (to the next instance)."""
    agent = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2, drain_timeout=0.2)
    started = asyncio.Event()

    @agent.handler
    async def handle(request: Request) -> bytes:
        started.set()
        await asyncio.sleep(60)
        return b"too late"

    await send(publisher, 1)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(started.wait(), 10)
    await stopped(running, stop)
    assert await stored_failure(publisher) is None
    assert agent.failed == 0
    second = Agent(MANIFEST, nats_url=nats_url, heartbeat_interval=0.2)
    seen: list[RouteDecided] = []

    @second.handler
    async def quick(request: Request) -> bytes:
        seen.append(request.route)
        return b"done"

    stop_second = asyncio.Event()
    running_second = asyncio.create_task(second.run(stop_second))
    try:

        async def taken_over() -> bool:
            return len(seen) == 1

        assert await await_until(taken_over, timeout=10)
    finally:
        await stopped(running_second, stop_second)
    assert seen[0].message_seq == 1
    assert await stored_failure(publisher) is None
