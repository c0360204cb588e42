"""Agent reply benchmark: what storing each reply in ``ROUTES`` costs the agent SDK.

Routed messages with a waiting caller (``Broker-Reply-To``) are appended to an agent's
inbox (as a router appends them), and a caller subscription counts the replies. Each round
sends ``--messages`` messages to each configuration; a configuration's throughput is its
replies from the first to the last, over the time between them: the messages are queued
first, then the configuration's consumer starts (its start is not counted), and stops
once it has replied to all of them. Configurations, in interleaved rounds against one nats-server:

- ``raw``: a bare nats-py loop on the same kind of inbox: fetch a batch, publish each reply
  on core NATS, ack. The baseline: no SDK, nothing stored.
- ``agent, reply not stored``: the SDK (``concurrency`` handlers, an echo handler) with
  ``store_replies=False``: what it did before replies were stored.
- ``agent`` (the default): the SDK, each reply also appended to ``ROUTES`` before the ack.

Prints msgs/s per configuration (median of rounds), each one's ratio to ``raw`` in the same
round (median), and stored against not stored.

Usage: ``python benchmarks/agent_replies.py [--messages 3000] [--rounds 5]
[--concurrency 16] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.agent import Agent, Request  # noqa: E402
from broker.embedded import NatsServer, ServerSpec  # noqa: E402
from broker.envelope import Outbound  # noqa: E402
from broker.logs import configure_logging  # noqa: E402
from broker.publisher import Publisher  # noqa: E402
from broker.routing.events import H_REPLY_TO, RouteDecided, inbox_subject  # noqa: E402
from broker.routing.types import Decision, DecisionReason  # noqa: E402
from broker.settings import Settings  # noqa: E402
from broker.streams import Stream, provision  # noqa: E402

TENANT = "bench"
CALLER = "_BROKER_REPLY.bench.caller"
CONFIGS = ("raw", "agent, reply not stored", "agent")
AGENT_OF = {"raw": "b-raw", "agent, reply not stored": "b-plain", "agent": "b-stored"}


def server_cpu(server: NatsServer) -> float:
    """CPU seconds nats-server has used (user + system), from ``/proc``."""
    fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def manifest(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0.0",
        "description": "Echoes",
        "capabilities": [{"action": "echo"}],
    }


class Caller:
    """Counts the replies to each agent, with the time of the first and the last."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    async def heard(self, message: Msg) -> None:
        agent = (message.headers or {}).get("Broker-Agent", "b-raw")
        self.times.setdefault(agent, []).append(time.perf_counter())

    async def rate(self, agent: str, n: int, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while len(self.times.get(agent, ())) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{agent}: {len(self.times.get(agent, ()))} of {n} replies")
            await asyncio.sleep(0.01)
        times = self.times.pop(agent)
        return (len(times) - 1) / (times[-1] - times[0])


async def send(publisher: Publisher, agent: str, first_seq: int, n: int) -> None:
    decision = Decision(agent, "echo", DecisionReason.SCORED, "bench", (), "bench-1")
    for seq in range(first_seq, first_seq + n):
        route = RouteDecided(TENANT, seq, f"msg.{TENANT}.jobs", decision)
        headers = route.to_headers({H_REPLY_TO: CALLER, "Content-Type": "text/plain"})
        await publisher.publish(Outbound(route.subject, b"x" * 200, headers))


async def raw_loop(nc: Client, stop: asyncio.Event) -> None:
    """The baseline: fetch, reply on core NATS, ack."""
    js = nc.jetstream()
    name = AGENT_OF["raw"]
    durable = f"raw-{name}"
    await js.add_consumer(  # the same durable each round: made at the first, found after
        Stream.ROUTES,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=inbox_subject(TENANT, name),
        ),
    )
    sub = await js.pull_subscribe_bind(durable, stream=Stream.ROUTES)
    while not stop.is_set():
        try:
            batch = await sub.fetch(64, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for message in batch:
            to = (message.headers or {})[H_REPLY_TO]
            await nc.publish(to, message.data, headers={"Content-Type": "text/plain"})
            await message.ack()


@contextlib.asynccontextmanager
async def running(url: str, config: str, concurrency: int) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task: asyncio.Task[None]
    if config == "raw":
        nc = await nats.connect(url)
        task = asyncio.create_task(raw_loop(nc, stop))
    else:
        agent = Agent(
            manifest(AGENT_OF[config]),
            nats_url=url,
            tenant=TENANT,
            concurrency=concurrency,
            store_replies=config == "agent",
        )

        async def echo(request: Request) -> bytes:
            return request.payload

        agent.handler(echo)
        task = asyncio.create_task(agent.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        if config == "raw":
            await nc.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("warning")
    with (
        tempfile.TemporaryDirectory() as tmp,
        NatsServer(ServerSpec(store_dir=Path(tmp))) as server,
    ):
        nc = await nats.connect(server.url)
        await provision(nc.jetstream(), Settings())
        publisher = Publisher([server.url])
        publisher.start()
        await publisher.wait_connected(5)
        caller = Caller()
        await nc.subscribe(CALLER, cb=caller.heard)
        rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
        cpu: dict[str, list[tuple[float, float]]] = {c: [] for c in CONFIGS}
        seq = 1
        for _ in range(args.warmup_rounds + args.rounds):
            for config in CONFIGS:
                # Queued first, then consumed: the rate is the consumer's, not the sender's.
                await send(publisher, AGENT_OF[config], seq, args.messages)
                seq += args.messages
                async with running(server.url, config, args.concurrency):
                    began = (time.process_time(), server_cpu(server))
                    rates[config].append(await caller.rate(AGENT_OF[config], args.messages))
                    ours, theirs = time.process_time() - began[0], server_cpu(server) - began[1]
                    cpu[config].append((ours / args.messages, theirs / args.messages))
        stored = await nc.jetstream().stream_info(Stream.ROUTES)
        await publisher.close()
        await nc.close()
    w = args.warmup_rounds
    measured = {c: r[w:] for c, r in rates.items()}
    result: dict[str, Any] = {"messages": args.messages, "rounds": args.rounds, "configs": {}}
    for config in CONFIGS:
        ratios = [o / b for o, b in zip(measured[config], measured["raw"], strict=True)]
        result["configs"][config] = {
            "msgs_per_s": round(statistics.median(measured[config])),
            "ratio_to_raw": round(statistics.median(ratios), 3),
            "ratio_per_round": [round(r, 3) for r in ratios],
            # CPU per message while it ran (from a little after its start until the last
            # reply): this process (agent or raw loop, and the caller) and nats-server
            "cpu_us_per_msg": round(statistics.median(a for a, _ in cpu[config][w:]) * 1e6, 1),
            "server_cpu_us_per_msg": round(
                statistics.median(b for _, b in cpu[config][w:]) * 1e6, 1
            ),
        }
    stored_vs_not = [
        s / p for s, p in zip(measured["agent"], measured["agent, reply not stored"], strict=True)
    ]
    result["stored_vs_not_stored"] = round(statistics.median(stored_vs_not), 3)
    result["routes_messages"] = stored.state.messages
    return result


def report(result: dict[str, Any]) -> None:
    print(f"agent replies: {result['messages']} messages x {result['rounds']} rounds")
    for config, row in result["configs"].items():
        print(
            f"{config:26s} {row['msgs_per_s']:8,} msgs/s  ratio to raw {row['ratio_to_raw']:.2f}x"
            f"  per round {row['ratio_per_round']}\n{'':26s} CPU µs/msg: this process "
            f"{row['cpu_us_per_msg']}, nats-server {row['server_cpu_us_per_msg']}"
        )
    print(f"stored vs not stored: {result['stored_vs_not_stored']:.2f}x")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16, help="the agents' handlers")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def run(main_fn: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]) -> None:
    args = parse()
    result = asyncio.run(main_fn(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    run(main)
