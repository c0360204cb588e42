"""nats-py's ``fetch(n)`` returns every message its subscription had queued (those that
arrived after an earlier fetch timed out), even more than ``n``. The agent then has more
handlers running than slots; it must wait for one to free, not fetch a batch of 0 or fewer
(``ValueError: nats: invalid batch size``, logged as ``agent_fetch_failed``)."""

from __future__ import annotations

import asyncio
from typing import Any

from broker.agent import Agent
from tests.e2e._agents import manifest


class Overfull:
    def __init__(self, stop: asyncio.Event) -> None:
        self.sizes: list[int] = []
        self.stop = stop

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        self.sizes.append(batch)
        if batch <= 0:
            self.stop.set()
            raise ValueError("nats: invalid batch size")
        if len(self.sizes) == 1:
            return [object(), object(), object()]  # 3 for a batch of 2: queued earlier
        await asyncio.sleep(timeout)
        self.stop.set()
        raise TimeoutError


async def test_more_messages_than_slots_never_fetch_a_batch_under_one() -> None:
    agent = Agent(manifest("alpha", "answers questions"), concurrency=2)
    agent._nc = type("NC", (), {"is_closed": False})()
    release = asyncio.Event()

    async def handle(message: Any, alone: bool) -> None:
        await release.wait()

    agent._handle = handle  # type: ignore[method-assign]
    stop = asyncio.Event()
    sub = Overfull(stop)
    asyncio.get_running_loop().call_later(1.5, release.set)
    await asyncio.wait_for(agent._consume(sub, stop), 10)
    await asyncio.gather(*agent._tasks)
    assert all(size >= 1 for size in sub.sizes), sub.sizes
