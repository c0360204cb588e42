"""``broker router`` stops in bounded time when its NATS hangs (SIGSTOP) in the middle of a
batch: it leaves the rest of the batch to be delivered again instead of waiting out each
message's ack timeout, and a stop that still takes longer than
``BROKER_STOP_DEADLINE_SECONDS`` ends the process (exit code 1, every thread's stack on
stderr) rather than leaving it running with nothing to end it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from broker.embedded import NatsServer
from broker.routing.events import H_ROUTE_MODE, ROUTE_MODE_AUTO
from broker.settings import Settings
from broker.streams import provision

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
ROOT = Path(__file__).resolve().parents[2]


async def backlog(url: str, messages: int) -> None:
    """Messages for the router to route, enough that it is mid-batch when NATS hangs."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js, Settings())
    headers = {H_ROUTE_MODE: ROUTE_MODE_AUTO}
    for _ in range(messages // 500):
        acks = [
            await js.publish_async("msg.acme.x", b"route me", headers=headers) for _ in range(500)
        ]
        for ack in acks:
            await ack
    await nc.close()


def start_router(url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | env
    command = [sys.executable, "-m", "broker", "router", "--nats-url", url, "--embedder", "hashing"]
    with log.open("wb") as out:
        router = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while b"router_started" not in log.read_bytes():
        assert router.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the router did not start"
        time.sleep(0.05)
    return router


def stopped_in(router: subprocess.Popen[bytes]) -> float:
    began = time.monotonic()
    router.send_signal(signal.SIGTERM)
    try:
        router.wait(40)
    except subprocess.TimeoutExpired:
        router.kill()
        raise
    return time.monotonic() - began


@pytest.fixture
def hung_nats(nats_server: NatsServer) -> Iterator[NatsServer]:
    yield nats_server
    nats_server.resume()


def test_a_router_whose_nats_hangs_mid_batch_stops_within_seconds(
    hung_nats: NatsServer, tmp_path: Path
) -> None:
    asyncio.run(backlog(hung_nats.url, 5000))
    log = tmp_path / "router.log"
    router = start_router(hung_nats.url, log)
    time.sleep(0.3)  # routing the backlog
    hung_nats.pause()
    took = stopped_in(router)
    text = log.read_text()
    assert router.returncode == 0, text[-3000:]
    # One ack timeout (5 s) for the append in flight, then the socket given up on (3 s):
    # each message left in the batch waited out its own timeout before.
    assert took < 12, (took, text[-3000:])
    assert "router_batch_left" in text


def test_a_stop_past_its_deadline_ends_the_router(hung_nats: NatsServer, tmp_path: Path) -> None:
    asyncio.run(backlog(hung_nats.url, 5000))
    log = tmp_path / "router.log"
    router = start_router(hung_nats.url, log, BROKER_STOP_DEADLINE_SECONDS="0.5")
    time.sleep(0.3)
    hung_nats.pause()
    took = stopped_in(router)
    text = log.read_text()
    assert router.returncode == 1, text[-3000:]
    assert took < 4, took
    assert "broker router did not stop within 0.5 s" in text
    assert "Thread 0x" in text or "Current thread 0x" in text  # the stacks, for a report
