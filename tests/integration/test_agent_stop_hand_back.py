"""An instance told to stop runs what still reaches its inbox subscription, then ends it: a
fetch's pull request outlives the fetch on the server (until it expires, or a moment past a
fetch that timed out here), so messages went on arriving for it after the instance stopped
fetching. Left in nats-py's queue, each waited out the consumer's ack_wait (a minute by
default) before another instance got it: a caller waiting 30 s got 504 although a healthy
instance was idle the whole time. Handed back (a nak), each then reached the other instance
as a redelivery, run alone there as a possible poison message, holding up its other work."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from broker.agent import Agent, Request
from broker.publisher import Publisher
from broker.streams import Stream
from tests._wait import await_until
from tests.integration.test_agent_fixes import MANIFEST, send

pytestmark = pytest.mark.integration


class Instances:
    """Agent instances of one inbox (one handler slot each) that note what they run, and
    whether as a suspect run alone; message 1 holds its instance until ``release``."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.release = asyncio.Event()
        self.seen: list[tuple[str, int]] = []
        self.alone: dict[tuple[str, int], bool] = {}

    def instance(self, tag: str) -> Agent:
        agent = Agent(
            MANIFEST, nats_url=self.nats_url, concurrency=1, ack_wait=30, heartbeat_interval=0.2
        )
        handle_one = agent._handle_one

        async def noting(message: Any, suspect: bool) -> None:
            self.alone[tag, message.metadata.sequence.stream] = suspect
            await handle_one(message, suspect)

        agent._handle_one = noting  # type: ignore[method-assign,assignment]

        @agent.handler
        async def handle(request: Request) -> bytes:
            self.seen.append((tag, request.message_seq))
            if request.message_seq == 1:
                await self.release.wait()  # keeps the stopping instance draining
            return b"ok"

        return agent


@pytest.mark.parametrize(
    ("request_after", "runner"),
    [
        (0.3, "a"),  # while its last fetch's request may still be open: a runs them
        (2.5, "b"),  # once that request expired: a has ended its subscription
    ],
)
async def test_what_reaches_a_stopping_instance_runs_once_as_a_first_delivery(
    publisher: Publisher, nats_url: str, request_after: float, runner: str
) -> None:
    """A pull request for the stopping instance's subscription (as its last fetch's is, on
    the server, for up to a fetch's timeout after it), answered by the next messages: they
    are run once, as first deliveries, by the stopping instance while that request may be
    open, else by the other instance; never handed back nor left to the ack_wait."""
    instances = Instances(nats_url)
    release, seen, alone = instances.release, instances.seen, instances.alone
    instance = instances.instance
    captured: dict[str, Any] = {}

    a = instance("a")
    consume = a._consume

    async def capturing(sub: Any, stop: asyncio.Event) -> None:
        captured["sub"] = sub
        await consume(sub, stop)

    a._consume = capturing  # type: ignore[method-assign]
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    run_a = asyncio.create_task(a.run(stop_a))
    b = instance("b")
    run_b: asyncio.Task[None] | None = None
    try:
        await send(publisher, 1)

        async def started_one() -> bool:
            return ("a", 1) in seen

        assert await await_until(started_one, timeout=10)
        stop_a.set()
        await asyncio.sleep(request_after)  # the drain waits on message 1 meanwhile
        request = orjson.dumps({"batch": 2, "expires": 800_000_000})
        await publisher.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{Stream.ROUTES}.{a.consumer_name}",
            request,
            reply=captured["sub"]._deliver,
        )
        await publisher.nc.flush()
        await send(publisher, 2)
        await send(publisher, 3)
        await asyncio.sleep(0.5)
        run_b = asyncio.create_task(b.run(stop_b))
        await asyncio.sleep(0.5)
        release.set()
        await asyncio.wait_for(run_a, 15)

        async def ran_both() -> bool:
            return {(runner, 2), (runner, 3)} <= set(seen)

        # Within seconds, not after the consumer's 30 s ack_wait.
        assert await await_until(ran_both, timeout=8), seen
        await asyncio.sleep(1.0)  # nothing runs them again
        assert sorted(seq for _, seq in seen if seq > 1) == [2, 3], seen
        assert not any(alone.values()), alone
    finally:
        release.set()
        stop_a.set()
        stop_b.set()
        for run in (run_a, run_b):
            if run is not None:
                await asyncio.wait_for(run, 15)
