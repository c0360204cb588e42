"""Publishes whose PubAck does not come in time, against a real nats-server that stops
answering (SIGSTOP): they are what the ack latency histogram and its alert exist for."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from broker.embedded import NatsServer
from broker.envelope import Outbound
from broker.errors import PublishTimeout
from broker.publisher import Publisher
from broker.settings import Settings
from broker.streams import provision
from broker.telemetry import metrics
from tests._wait import wait_for

pytestmark = pytest.mark.integration

TIMEOUT = 0.5  # short, so the test is quick
ACKS = "broker_jetstream_ack_duration_seconds"
TIMEOUTS = "broker_jetstream_ack_timeouts_total"


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def snapshot() -> dict[str, float]:
    """The ack metrics as /metrics would show them now (this process's buffer flushed)."""
    metrics.flush()
    return {
        "count": sample(f"{ACKS}_count"),
        "sum": sample(f"{ACKS}_sum"),
        "le_0.25": sample(f"{ACKS}_bucket", {"le": "0.25"}),
        "timeouts": sample(TIMEOUTS),
    }


@pytest.fixture
def metrics_on() -> Iterator[None]:
    was = metrics.enabled()
    metrics.set_enabled(True)
    yield
    metrics.set_enabled(was)


@pytest_asyncio.fixture
async def quick_publisher(nats_url: str) -> AsyncIterator[Publisher]:
    nc = await nats.connect(nats_url)
    await provision(nc.jetstream(), Settings())
    await nc.close()
    pub = Publisher([nats_url], publish_timeout=TIMEOUT)
    pub.start()
    assert await pub.wait_connected(5)
    yield pub
    await pub.close()


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state ``T`` in /proc)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return all((task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks)


def message(i: int) -> Outbound:
    return Outbound(f"msg.default.stall.{i}", b"{}", {})


@pytest.mark.usefixtures("metrics_on")
async def test_publishes_timed_out_while_jetstream_stalls_are_observed_and_counted(
    quick_publisher: Publisher, nats_server: NatsServer
) -> None:
    """While the server is stopped, every publish (also one whose caller went away) fails
    with PublishTimeout, and each is observed in the ack histogram at the time it was given
    up (above 250 ms, where BrokerSlowJetStreamAcks looks) and counted in
    broker_jetstream_ack_timeouts_total; their late acks after the stall add nothing."""
    for i in range(5):
        await quick_publisher.publish(message(i))
    before = snapshot()
    assert nats_server.pid is not None
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: stopped(nats_server.pid), timeout=5)  # a stop is not instant
        stalled = [await quick_publisher.submit(message(i)) for i in range(10)]
        gone = await quick_publisher.submit(message(10))
        gone.cancel()  # the caller went away (an HTTP client that hung up)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*stalled, return_exceptions=True), TIMEOUT * 10
        )
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    assert all(isinstance(outcome, PublishTimeout) for outcome in outcomes), outcomes
    # Same connection, so this ack comes after the stalled ones' late acks.
    await quick_publisher.publish(message(11))
    after = snapshot()

    timed_out = len(stalled) + 1
    assert after["timeouts"] - before["timeouts"] == timed_out
    assert after["count"] - before["count"] == timed_out + 1  # + the publish after the stall
    assert after["le_0.25"] - before["le_0.25"] == 1  # only the healthy one is fast
    # each observed at the time it was given up: at least the timeout
    assert after["sum"] - before["sum"] >= timed_out * TIMEOUT
