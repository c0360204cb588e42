"""Concurrent replays of large messages must not make nats-server cut the ingress's one NATS
connection as a slow consumer: every publish sharing it would fail meanwhile (503)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.e2e._broker import start_broker

pytestmark = pytest.mark.e2e

REPLAYS = 12


def test_concurrent_replays_leave_publishes_alone(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, args=("--projection-workers", "0", "--routers", "0"))
    try:
        base = broker.base_url
        with httpx.Client(http2=True, http1=False, timeout=30) as client:
            for _ in range(40):  # 40 messages of 800 kB: each replay fetches ~8 MiB at a time
                answer = client.post(
                    f"{base}/v1/publish/big.data",
                    content=os.urandom(800_000),
                    headers={"content-type": "application/octet-stream"},
                )
                assert answer.status_code == 200, answer.text

        async def replay(outcomes: Counter[object]) -> None:
            async with httpx.AsyncClient(http2=True, http1=False, timeout=60) as c:
                url = f"{base}/v1/streams/MESSAGES/messages?subject=big.>&limit=100000"
                async with c.stream("GET", url) as r:
                    tail = b""
                    async for chunk in r.aiter_bytes():
                        tail = (tail + chunk)[-200:]
                    outcomes[(r.status_code, b"read_interrupted" in tail)] += 1

        async def publish(stop: asyncio.Event, statuses: Counter[int]) -> None:
            async with httpx.AsyncClient(http2=True, http1=False, timeout=30) as c:
                while not stop.is_set():
                    r = await c.post(
                        f"{base}/v1/publish/other.work",
                        content=b'{"a": 1}',
                        headers={"content-type": "application/json"},
                    )
                    statuses[r.status_code] += 1
                    await asyncio.sleep(0.01)

        async def run() -> tuple[Counter[object], Counter[int]]:
            outcomes: Counter[object] = Counter()
            statuses: Counter[int] = Counter()
            stop = asyncio.Event()
            publisher = asyncio.create_task(publish(stop, statuses))
            await asyncio.gather(*(replay(outcomes) for _ in range(REPLAYS)))
            stop.set()
            await publisher
            return outcomes, statuses

        outcomes, statuses = asyncio.run(run())
        nats_log = (tmp_path / "data" / "nats" / "nats-server.log").read_text(errors="replace")
        assert "Slow Consumer" not in nats_log, [
            line for line in nats_log.splitlines() if "Slow Consumer" in line
        ]
        assert outcomes == Counter({(200, False): REPLAYS}), outcomes
        assert set(statuses) == {200}, statuses
        assert "nats_disconnected" not in broker.log_tail(400)
    finally:
        broker.stop()
