"""The per-process gate on reads' fetches keeps no closed event loop alive."""

from __future__ import annotations

import asyncio

import pytest

from broker import reader

pytestmark = pytest.mark.unit


def test_the_gates_of_closed_loops_are_dropped() -> None:
    """A semaphore that was waited on holds its loop: kept as a weak dictionary's value, it
    kept its own key, and every loop a process ran (a test's, a CLI call's) for good."""

    async def contended() -> None:
        gate = reader._fetch_gate()

        async def hold() -> None:
            async with gate:
                await asyncio.sleep(0.001)

        await asyncio.gather(*(hold() for _ in range(reader.FETCHES_AT_ONCE + 2)))

    for _ in range(5):
        asyncio.run(contended())
    assert len(reader._fetch_gates) <= 1  # the last loop's, dropped when the next is made
