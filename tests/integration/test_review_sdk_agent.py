"""The agent SDK lets go of what it holds however ``run()`` ends: its NATS connection (and
with it the inbox subscription) and its heartbeat task, also when it is cancelled."""

from __future__ import annotations

import asyncio
import threading

import pytest

from broker.agent import Agent, Request
from broker.publisher import Publisher
from tests._wait import await_until

pytestmark = pytest.mark.integration

MANIFEST = {
    "name": "sketch",
    "version": "1.0.0",
    "description": "Draws sketches",
    "capabilities": [{"action": "sketch", "description": "sketch", "content_types": []}],
}


class _SlowGpuProbe:
    """A ``LoadSource`` that blocks its first call until released: ``nvidia-smi`` can take
    seconds to answer (its own timeout is 5 s)."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.release = threading.Event()

    def gpu(self) -> tuple[float | None, float | None]:
        self.called.set()
        self.release.wait(10)
        return None, None


async def test_a_run_cancelled_during_its_first_heartbeat_closes_its_connection(
    publisher: Publisher, nats_url: str
) -> None:
    """``run()`` cancelled (a supervisor's timeout, a task group whose other task failed)
    while its first heartbeat read the GPU probe left the NATS connection open for good:
    the connection was closed only by the ``finally`` that came after that heartbeat, so
    the instance went on holding its inbox subscription and reconnecting forever."""
    probe = _SlowGpuProbe()
    agent = Agent(MANIFEST, nats_url=nats_url, load_source=probe)

    @agent.handler
    async def handle(request: Request) -> str:
        return "drawn"

    running = asyncio.create_task(agent.run(asyncio.Event()))
    try:
        assert await asyncio.to_thread(probe.called.wait, 10)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, 10)
    finally:
        probe.release.set()
    nc = agent._nc
    assert nc is not None

    async def closed() -> bool:
        return nc.is_closed

    assert await await_until(closed, timeout=5)
