"""The member listing of each lease tick leaves no consumer behind on the leases bucket:
nats-py's ``kv.keys()`` left one for 5 minutes a tick, and at nats-server's 1,000 consumers
a stream every listing failed; against a real nats-server."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from projections.leases import BUCKET, PartitionLeases
from tests._wait import await_until

pytestmark = pytest.mark.integration

STREAM = f"KV_{BUCKET}"


async def _consumers(js: JetStreamContext) -> int:
    return int((await js.stream_info(STREAM)).state.consumer_count)


async def _started(js: JetStreamContext, worker: str) -> PartitionLeases:
    leases = PartitionLeases(js, "replica_messages", 4, worker)
    await leases.start()
    assert leases._task is not None
    leases._task.cancel()  # this test ticks by hand
    return leases


async def test_ticks_leave_no_consumers_on_the_bucket(nc: NATS) -> None:
    js = nc.jetstream()
    leases = await _started(js, "w1")
    for _ in range(40):
        await leases.tick()

    async def few() -> bool:
        return await _consumers(js) <= 2

    assert await await_until(few, timeout=15.0), await _consumers(js)
    await leases.stop()


async def test_workers_still_see_each_other_and_split_the_partitions(nc: NATS) -> None:
    js = nc.jetstream()
    one = await _started(js, "w1")
    two = await _started(js, "w2")
    for _ in range(3):
        await one.tick()
        await two.tick()
    assert await one._members(one._kv) == ["w1", "w2"]  # type: ignore[arg-type]
    assert len(one.owned()) == 2
    assert len(two.owned()) == 2
    assert one.owned().isdisjoint(two.owned())
    await two.stop()
    await one.tick()  # two's member key is deleted: one takes every partition back
    assert await one._members(one._kv) == ["w1"]  # type: ignore[arg-type]
    assert len(one.owned()) == 4
    await one.stop()
