"""The Python client while the broker stops gracefully (SIGTERM) and comes back.

granian's graceful stop sends HTTP/2 GOAWAY and then a PING. python-h2, under httpx and
under the client's own duplex stream, takes the GOAWAY for the end of the connection and
refuses the PING, so the answers still to come on that connection are lost. The client must
take that for a lost connection: keyed publishes, a publish stream's records and a replay go
again on a new connection once a broker answers there, nothing is stored twice, and nothing
stored is reported as failed.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext

import tests.e2e._broker as broker_process
from broker.client import BrokerClient, PublishResult, RetryPolicy
from broker.embedded import NatsServer
from broker.envelope import NATS_MSG_ID, idempotency_key
from tests._wait import await_until, wait_for
from tests.e2e.conftest import E2E_ENV

pytestmark = pytest.mark.e2e

#: Patient enough to outlast the broker's restart: no wait over a quarter of a second.
PATIENT = RetryPolicy(attempts=400, base_delay=0.05, max_delay=0.25)
PUBLISHERS = 4
AHEAD = 32  # stream records sent before their acks came
REPLAYED = 1000
#: The ingress alone: no projection worker, no router (quicker to start, twice).
INGRESS_ONLY = ("--projection-workers", "0", "--routers", "0")


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def stored(js: JetStreamContext, subject: str) -> list[Msg]:
    """Every message stored under ``subject``, in stream order."""
    info = await js.stream_info("MESSAGES", subjects_filter=subject)
    total = sum((info.state.subjects or {}).values())
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=10) for _ in range(total)]
    finally:
        await sub.unsubscribe()


def key_of(message: Msg) -> str:
    return idempotency_key("default", (message.headers or {})[NATS_MSG_ID])


def seq_of(message: Msg) -> int:
    return int(message.metadata.sequence.stream)


@dataclass
class Load:
    """Keyed publishes, a publish stream and replays, all at once, until told to stop."""

    client: BrokerClient
    base: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    acked: dict[str, int] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)
    results: list[PublishResult] = field(default_factory=list)
    result_came: asyncio.Event = field(default_factory=asyncio.Event)
    passes: list[list[int]] = field(default_factory=list)
    broken: list[BaseException] = field(default_factory=list)  # what ended a stream or replay

    def start(self) -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(self.publisher(i)) for i in range(PUBLISHERS)]
        return [*tasks, asyncio.create_task(self.streamer()), asyncio.create_task(self.replayer())]

    def counts(self) -> tuple[int, int, int]:
        return len(self.acked), len(self.results), len(self.passes)

    async def grew(self, publishes: int, streamed: int, replays: int) -> bool:
        assert not self.broken, self.broken
        acked, results, passes = self.counts()
        return acked >= publishes and results >= streamed and passes >= replays

    async def publisher(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            key = f"{self.base}-{worker}-{n}"
            n += 1
            try:
                ack = await self.client.publish(f"{self.base}.one", {"key": key}, key=key)
            except Exception as e:  # a bare h2 error too: the test reports it
                self.failed[key] = e
            else:
                self.acked[key] = ack.seq

    async def records(self) -> AsyncIterator[dict[str, object]]:
        n = 0
        while not self.stop.is_set():
            while n - len(self.results) >= AHEAD:
                self.result_came.clear()
                await self.result_came.wait()
            yield {"data": {"n": n}}  # no key: the client's own must go again
            n += 1

    async def streamer(self) -> None:
        try:
            stream = self.client.publish_stream(self.records(), subject=f"{self.base}.stream")
            async for result in stream:
                self.results.append(result)
                self.result_came.set()
        except Exception as e:
            self.broken.append(e)

    async def replayer(self) -> None:
        try:
            while not self.stop.is_set():
                messages = self.client.replay("MESSAGES", subject=f"{self.base}.replay", page=200)
                self.passes.append([message.seq async for message in messages])
        except Exception as e:
            self.broken.append(e)

    async def finish(self, tasks: list[asyncio.Task[None]]) -> None:
        self.stop.set()
        self.result_came.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)

    @staticmethod
    async def cancel(tasks: list[asyncio.Task[None]]) -> None:
        """Stop what is left (a failed test must not leave tasks publishing)."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def restart(
    broker: broker_process.BrokerProcess,
    nats_url: str,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> broker_process.BrokerProcess:
    """SIGTERM to ``broker``, and a new one on its port as soon as the port is free."""
    broker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(wait_for, lambda: port_closed(broker.port), 10)
    monkeypatch.setattr(broker_process, "free_port", lambda: broker.port)
    return await asyncio.to_thread(
        broker_process.start_broker, workdir, nats_url=nats_url, args=INGRESS_ONLY, env=E2E_ENV
    )


async def test_publishes_streams_and_replays_go_on_across_a_graceful_stop(
    module_nats: NatsServer, js: JetStreamContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing over HTTP/2 while the broker is sent SIGTERM and started again on the same
    port: every publish reported stored is stored once, at the sequence reported, and none
    is reported failed; the stream's records (given no key: the client's keys must be
    reused) all get their result, in order, each stored once; a replay reads every message
    once."""
    base = f"goaway.{uuid.uuid4().hex[:8]}"
    brokers = [
        broker_process.start_broker(
            tmp_path / "first", nats_url=module_nats.url, args=INGRESS_ONLY, env=E2E_ENV
        )
    ]
    try:
        async with BrokerClient(brokers[0].base_url, retry=PATIENT, timeout=5) as client:
            for start in range(0, REPLAYED, 250):
                await client.publish_batch(
                    [{"data": {"i": i, "pad": "x" * 1000}} for i in range(start, start + 250)],
                    subject=f"{base}.replay",
                )
            load = Load(client, base)
            tasks = load.start()
            try:
                assert await await_until(lambda: load.grew(50, 50, 1), timeout=20)
                brokers.append(
                    await restart(brokers[0], module_nats.url, tmp_path / "second", monkeypatch)
                )
                acked, results, passes = load.counts()
                assert await await_until(
                    lambda: load.grew(acked + 50, results + 50, passes + 1), timeout=20
                )
                await load.finish(tasks)
            finally:
                await Load.cancel(tasks)
    finally:
        for broker in reversed(brokers):
            broker.stop()

    assert not load.broken, load.broken
    # Keyed publishes: what was reported stored is stored once, where it was said to be;
    # nothing stored was reported failed (and, the broker being back, nothing failed).
    messages = await stored(js, f"msg.default.{base}.one")
    keys = collections.Counter(key_of(m) for m in messages)
    assert [key for key, times in keys.items() if times > 1] == []
    assert sorted(set(load.failed) & set(keys)) == [], "stored, yet reported failed"
    assert {key_of(m): seq_of(m) for m in messages} == load.acked
    assert load.failed == {}
    # The stream: one result per record, in order, each stored once at the sequence acked.
    assert [r.error for r in load.results if not r.ok] == []
    in_stream = await stored(js, f"msg.default.{base}.stream")
    assert [orjson.loads(m.data)["n"] for m in in_stream] == list(range(len(load.results)))
    assert [seq_of(m) for m in in_stream] == [r.ack.seq for r in load.results if r.ack]
    # Every replay read every message once, in order.
    replayed = [seq_of(m) for m in await stored(js, f"msg.default.{base}.replay")]
    assert len(replayed) == REPLAYED
    assert all(seqs == replayed for seqs in load.passes)
