"""``broker router``, ``broker worker`` and an agent stop in bounded time when their NATS hangs
(SIGSTOP): the router leaves the rest of a batch to be delivered again instead of waiting
out each message's ack timeout, each gives its connection seconds before cutting its socket
(nats-py's drain waited 10 s more for a PONG), and a stop that still takes longer than
``BROKER_STOP_DEADLINE_SECONDS`` ends the process (exit code 1, what its tasks wait on and
every thread's stack on stderr) rather than leaving it running with nothing to end it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from broker.agent import Agent, Request
from broker.embedded import NatsServer
from broker.routing.events import H_ROUTE_MODE, ROUTE_MODE_AUTO
from broker.settings import Settings
from broker.streams import provision

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
ROOT = Path(__file__).resolve().parents[2]
AGENT = {
    "name": "render",
    "version": "1.0.0",
    "description": "Renders documents",
    "capabilities": [{"action": "render", "description": "render", "content_types": []}],
}


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


def start(args: list[str], log: Path, ready: bytes, **env: str) -> subprocess.Popen[bytes]:
    """``broker <args>``, its output in ``log``, once ``ready`` is in it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | env
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", *args], cwd=ROOT, env=environ, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 60
    while ready not in log.read_bytes():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"broker {args[0]} did not start"
        time.sleep(0.05)
    return process


def start_router(url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    args = ["router", "--nats-url", url, "--embedder", "hashing"]
    return start(args, log, b"router_started", **env)


def start_worker(url: str, tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """A projection worker into SQLite, once it has its partitions."""
    replica = f"sqlite:///{tmp_path / 'replica.db'}"
    args = ["worker", "--nats-url", url, "--replica-url", replica]
    return start(args, tmp_path / "worker.log", b"worker_started", **env)


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
    # What a report needs: where its tasks wait (an asyncio hang shows in them, not in the
    # thread, which only waits in the loop), and the threads' stacks.
    main = text.split("task Task-1:")[1].split("\ntask ")[0]  # asyncio.run's task
    assert "service.py" in main
    assert "broker/routing/router.py" in main  # each coroutine it awaits, innermost last
    assert "Thread 0x" in text or "Current thread 0x" in text


@pytest.mark.parametrize(("deadline", "exit_code", "within"), [("25", 0, 6.0), ("0.5", 1, 3.0)])
def test_a_projection_worker_whose_nats_hangs_stops_within_seconds(
    hung_nats: NatsServer, tmp_path: Path, deadline: str, exit_code: int, within: float
) -> None:
    """Its leases given up on for 2 s, then the connection for 3 s: 14 s before, most of it
    nats-py's drain waiting for a PONG; a deadline shorter than that ends it."""
    asyncio.run(backlog(hung_nats.url, 0))  # the streams
    worker = start_worker(hung_nats.url, tmp_path, BROKER_STOP_DEADLINE_SECONDS=deadline)
    hung_nats.pause()
    took = stopped_in(worker)
    text = (tmp_path / "worker.log").read_text()
    assert worker.returncode == exit_code, text[-3000:]
    assert took < within, (took, text[-3000:])
    assert ("broker worker did not stop within" in text) == (exit_code == 1)


async def test_an_agent_whose_nats_hangs_stops_within_seconds(hung_nats: NatsServer) -> None:
    """Its heartbeat's removal and its connection's close, 2 s each at most: 12.5 s before
    (the removal's JetStream timeout, a flush, the close)."""
    await backlog(hung_nats.url, 0)  # the streams and buckets
    agent = Agent(AGENT, nats_url=hung_nats.url, heartbeat_interval=0.2)

    @agent.handler
    async def render(request: Request) -> bytes:
        return b"done"

    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(1.0)  # connected, consuming, heartbeating
    assert not running.done()
    hung_nats.pause()
    began = time.monotonic()
    stop.set()
    await asyncio.wait_for(running, 30)
    assert time.monotonic() - began < 6


def unused_url() -> str:
    """The URL of a port nothing listens on: every connect attempt is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"nats://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("nats", ["refused", "hung"])
async def test_an_agent_stopped_before_nats_answered_stops_at_once(
    nats: str, nats_server: NatsServer
) -> None:
    """Its start (connect, then bind the inbox consumer) waited for NATS however long, the
    stop ignored: an agent started before its NATS, or against a wrong URL, could not be
    stopped with Ctrl-C."""
    url = unused_url() if nats == "refused" else nats_server.url
    if nats == "hung":
        nats_server.pause()  # connections accepted by the kernel, never answered
    agent = Agent(AGENT, nats_url=url)

    @agent.handler
    async def render(request: Request) -> bytes:
        return b"done"

    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.sleep(1.0)  # a few attempts
        assert not running.done()
        began = time.monotonic()
        stop.set()
        done, _ = await asyncio.wait({running}, timeout=10)
        assert running in done, "the agent did not stop"
        assert running.result() is None
        assert time.monotonic() - began < 3
    finally:
        nats_server.resume()
        running.cancel()


def test_a_projection_worker_stopped_before_nats_answered_stops_at_once(tmp_path: Path) -> None:
    replica = f"sqlite:///{tmp_path / 'replica.db'}"
    args = ["worker", "--nats-url", unused_url(), "--replica-url", replica]
    worker = start(args, tmp_path / "worker.log", b"worker_nats_error")
    took = stopped_in(worker)
    text = (tmp_path / "worker.log").read_text()
    assert worker.returncode == 0, text[-3000:]
    assert "worker_stopped_before_connecting" in text, text[-3000:]
    assert took < 5, (took, text[-3000:])
