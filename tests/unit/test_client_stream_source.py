"""The record source behind ``BrokerClient.publish_stream``, across the streams it takes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from broker.client import _RecordSource

pytestmark = pytest.mark.unit


async def test_a_record_pulled_in_the_instant_its_stream_ends_goes_to_the_next_stream() -> None:
    """The stream's sender is cancelled when the stream ends. A record the caller's source
    produced in that same instant was dropped (2 149 results for 2 150 records, once in a
    full run): the next stream must send it."""
    release = asyncio.Event()

    async def records() -> AsyncIterator[dict[str, int]]:
        yield {"i": 0}
        await release.wait()
        yield {"i": 1}

    source = _RecordSource(records())
    first = source.lines([])
    assert orjson.loads(await anext(first))["i"] == 0
    sender = asyncio.ensure_future(anext(first))
    await asyncio.sleep(0)  # the sender waits on the source
    release.set()
    await asyncio.sleep(0)  # the source yields record 1: the pull is done, not yet handed on
    sender.cancel()  # the stream ends now
    with pytest.raises(asyncio.CancelledError):
        await sender
    second = source.lines([])
    assert orjson.loads(await anext(second))["i"] == 1
    with pytest.raises(StopAsyncIteration):
        await anext(second)
    assert source.exhausted
    assert source.taken == 2
