"""Reading a stream never ends early in silence: a fetch sized by bytes, and a read that
goes on with a new consumer after deliveries were lost on the way."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from broker.reader import read_batches, read_messages

pytestmark = pytest.mark.integration

PAYLOAD = 100 * 1024


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc: Client = await nats.connect(nats_url, error_cb=_ignore)
    jetstream = nc.jetstream()
    await jetstream.add_stream(name="READ", subjects=["read.>"])
    yield jetstream
    await nc.close()


async def _ignore(_error: Exception) -> None:  # the slow consumer errors of the test below
    return None


async def publish(js: JetStreamContext, count: int, size: int = PAYLOAD) -> None:
    for i in range(count):
        await js.publish(f"read.{i % 3}", i.to_bytes(4, "big") * (size // 4))


async def test_large_messages_are_fetched_a_few_at_a_time(js: JetStreamContext) -> None:
    """1,024 messages of 100 KB asked for at once would be 100 MB in flight; a fetch holds
    about READ_BYTES of them, after a first fetch of 16."""
    await publish(js, 120)
    sizes = [len(batch) async for batch in read_batches(js, "READ", batch=1024)]
    assert sum(sizes) == 120
    assert sizes[0] == 16
    assert max(sizes) <= 8 * 1024 * 1024 // PAYLOAD


async def test_deliveries_lost_on_the_way_are_read_again_in_order(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's subscription holds at most 1 MB, so most of each fetch of 100 KB
    messages is dropped on arrival (a slow consumer), leaving gaps in the consumer's
    sequence: the read goes on from the last message it handed out, and every message
    comes out once, in order."""
    await publish(js, 60)
    bind: Any = js.pull_subscribe_bind
    monkeypatch.setattr(
        js, "pull_subscribe_bind", functools.partial(bind, pending_bytes_limit=1024 * 1024)
    )
    seen = [
        int.from_bytes(m.data[:4], "big")
        async for m in read_messages(js, "READ", batch=60, fetch_timeout=0.5)
    ]
    assert seen == list(range(60))


async def test_a_fetch_that_times_out_with_the_builtin_timeout_error_is_read_past(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py's fetch raises the builtin ``TimeoutError`` (not ``nats.errors.TimeoutError``)
    when its deadline passes between its two requests, as it does on a loaded machine: the
    read goes on with a new consumer instead of failing (a replay answered 500)."""
    await publish(js, 30, size=64)
    bind: Any = js.pull_subscribe_bind
    timeouts = 0

    async def bind_once_timing_out(*args: Any, **kwargs: Any) -> Any:
        sub = await bind(*args, **kwargs)
        fetch = sub.fetch

        async def fetch_or_time_out(*a: Any, **kw: Any) -> Any:
            nonlocal timeouts
            if timeouts == 0:
                timeouts += 1
                raise TimeoutError  # what nats/js/client.py raises past its deadline
            return await fetch(*a, **kw)

        sub.fetch = fetch_or_time_out
        return sub

    monkeypatch.setattr(js, "pull_subscribe_bind", bind_once_timing_out)
    seen = [int.from_bytes(m.data[:4], "big") async for m in read_messages(js, "READ", batch=10)]
    assert timeouts == 1
    assert seen == list(range(30))
