"""Messages fetched beside a poison message do not share its fate: an agent process that
dies running one message (a segfault, the OOM killer) had other messages in hand, and
JetStream counts a delivery for each of them too. Without care they reached
``max_deliveries`` with the poison and were given up (``RouteFailed``) although they
never failed; the SDK runs a redelivered message alone, so only the poison's own
deliveries are counted after its first crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import textwrap
from dataclasses import dataclass, field

import nats.js.errors
import pytest
from nats.aio.msg import Msg

from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.routing.events import (
    H_MESSAGE_SEQ,
    H_REPLY_TO,
    FailureReason,
    RouteDecided,
    RouteFailed,
    failed_subject,
)
from broker.streams import Stream
from tests._wait import await_until
from tests.integration.test_agent_fixes import CALLER, MANIFEST, NAME, caller_replies
from tests.integration.test_agent_poison import ROOT
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration

MAX_DELIVERIES = 3

#: An agent process (``concurrency=4``) whose handler ends the process on ``poison`` (after
#: a moment, so that the messages fetched with it are running) and takes half a second over
#: any other message. SIGTERM stops it cleanly.
CHILD = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from broker.agent import Agent, Request

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        agent = Agent(
            json.loads(sys.argv[2]),
            nats_url=sys.argv[1],
            concurrency=4,
            ack_wait=float(sys.argv[3]),
            heartbeat_interval=0.2,
            max_deliveries=int(sys.argv[4]),
        )

        @agent.handler
        async def handle(request: Request) -> bytes:
            print("ran", request.payload.decode(), flush=True)
            if request.payload == b"poison":
                await asyncio.sleep(0.2)
                os._exit(137)
            await asyncio.sleep(0.5)
            return b"ok"

        await agent.run(stop)

    asyncio.run(main())
    """
)


async def send(publisher: Publisher, seq: int, payload: bytes) -> None:
    route = RouteDecided("default", seq, "msg.default.docs", _decision(agent=NAME))
    headers = route.to_headers({H_REPLY_TO: CALLER})
    await publisher.publish(Outbound(route.subject, payload, headers))


async def failures(publisher: Publisher) -> list[RouteFailed]:
    """Every ``RouteFailed`` the agent appended to ``ROUTES``, in order."""
    found: list[RouteFailed] = []
    seq = 1
    while True:
        try:
            raw = await publisher.js.get_msg(
                Stream.ROUTES, seq, subject=failed_subject("default", NAME), next=True
            )
        except nats.js.errors.NotFoundError:
            return found
        found.append(RouteFailed.from_headers(raw.headers or {}))
        assert raw.seq is not None
        seq = raw.seq + 1


def replied(replies: list[Msg]) -> set[int]:
    return {int((reply.headers or {})[H_MESSAGE_SEQ]) for reply in replies}


@dataclass
class Supervisor:
    """Runs the agent process and starts it again each time it dies, as systemd or
    Kubernetes would, until :meth:`stop`; keeps each start's exit code and what it ran."""

    nats_url: str
    ack_wait: float
    exits: list[int] = field(default_factory=list)
    runs: list[list[str]] = field(default_factory=list)
    child: asyncio.subprocess.Process | None = None
    stopping: bool = False

    async def run(self) -> None:
        while not self.stopping and len(self.exits) < 10:
            self.child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CHILD,
                self.nats_url,
                json.dumps(MANIFEST),
                str(self.ack_wait),
                str(MAX_DELIVERIES),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await self.child.communicate()
            self.exits.append(self.child.returncode or 0)
            lines = out.decode().splitlines()
            self.runs.append([line.split()[1] for line in lines if line[:4] == "ran "])

    async def stop(self, task: asyncio.Task[None]) -> None:
        self.stopping = True
        if self.child is not None and self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGTERM)
        await asyncio.wait_for(task, 30)


async def settled(publisher: Publisher, replies: list[Msg], innocent: set[int]) -> bool:
    """Whether every message was answered or failed, the poison (seq 1) included."""
    failed = {f.route.message_seq for f in await failures(publisher)}
    return innocent | {1} <= replied(replies) | failed


async def check_outcome(publisher: Publisher, replies: list[Msg], innocent: set[int]) -> None:
    assert replied(replies) == innocent
    found = await failures(publisher)
    assert [f.route.message_seq for f in found] == [1], [f.message for f in found]
    assert found[0].reason is FailureReason.ERROR
    assert f"delivered {MAX_DELIVERIES} times without being settled" in found[0].message
    info = await publisher.js.consumer_info(Stream.ROUTES, f"agent-default~{NAME}")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_messages_fetched_with_a_poison_message_are_handled_not_given_up(
    publisher: Publisher, nats_url: str
) -> None:
    """The poison and three innocent messages are fetched together and all running when
    the poison kills the process. Each start after that runs the redelivered messages one
    at a time, alone: the poison dies on its second delivery without taking anything with
    it and is given up on its third, and each innocent message is answered on its second
    delivery. Before, they ran side by side again, died with the poison on every start,
    and were given up with it."""
    replies = await caller_replies(publisher)
    await send(publisher, 1, b"poison")
    for seq in (2, 3, 4):
        await send(publisher, seq, b"doc-%d" % seq)
    innocent = {2, 3, 4}
    supervisor = Supervisor(nats_url, ack_wait=1.0)
    task = asyncio.create_task(supervisor.run())
    try:

        async def done() -> bool:
            return await settled(publisher, replies, innocent) or task.done()

        assert await await_until(done, timeout=60, interval=0.1)
    finally:
        await supervisor.stop(task)
    await check_outcome(publisher, replies, innocent)
    assert supervisor.runs == [
        ["poison", "doc-2", "doc-3", "doc-4"],  # one fetch, all running when it dies
        ["poison"],  # its second delivery, alone
        ["doc-2", "doc-3", "doc-4"],  # one at a time; the poison's third is not run
    ]
    assert supervisor.exits == [137, 137, 0]


async def test_bystanders_are_spared_while_new_messages_keep_arriving(
    publisher: Publisher, nats_url: str
) -> None:
    """As above, with new messages arriving all along. A restarted instance fetches those
    (first deliveries) before the ``ack_wait`` of the messages its predecessor died with
    is over; it stays cautious for that ``ack_wait`` all the same, so the redelivered
    messages do not come back in one batch and run beside the poison again."""
    replies = await caller_replies(publisher)
    await send(publisher, 1, b"poison")
    for seq in (2, 3, 4):
        await send(publisher, seq, b"doc-%d" % seq)
    innocent = {2, 3, 4}
    supervisor = Supervisor(nats_url, ack_wait=10.0)  # room for a slow restart to fetch new ones
    task = asyncio.create_task(supervisor.run())

    async def feed() -> None:
        seq = 5
        while True:
            await asyncio.sleep(0.25)
            innocent.add(seq)
            await send(publisher, seq, b"doc-%d" % seq)
            seq += 1

    feeder = asyncio.create_task(feed())
    try:

        async def poison_settled() -> bool:
            return await settled(publisher, replies, {1}) or task.done()

        await await_until(poison_settled, timeout=60, interval=0.1)
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder

        async def done() -> bool:
            return await settled(publisher, replies, innocent) or task.done()

        assert await await_until(done, timeout=30, interval=0.1)
    finally:
        feeder.cancel()
        await supervisor.stop(task)
    await check_outcome(publisher, replies, innocent)
    assert supervisor.exits == [137, 137, 0]
    first, second, _ = supervisor.runs
    assert first[:4] == ["poison", "doc-2", "doc-3", "doc-4"]
    assert second.count("poison") == 1
    before = second[: second.index("poison")]
    assert any(int(name.split("-")[1]) > 4 for name in before), second  # new ones came first
