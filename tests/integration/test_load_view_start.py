"""A router's load view holds the bucket's heartbeats as soon as it has started: a router
that decided before (started by ``broker serve`` again after a crash, under traffic) found
no live instance and dead-lettered messages that live agents could take."""

from __future__ import annotations

import time

import pytest

from broker.publisher import Publisher
from broker.routing.load import InstanceLoad, LoadView
from broker.streams import AGENT_LOAD_BUCKET

pytestmark = pytest.mark.integration

T = "loadstart"


async def test_the_view_holds_the_current_heartbeats_once_started(publisher: Publisher) -> None:
    bucket = await publisher.js.key_value(AGENT_LOAD_BUCKET)
    for i in range(20):
        beat = InstanceLoad(tenant=T, agent=f"a{i}", instance="i-1", at=time.time())
        await bucket.put(beat.key, beat.to_json())
    view = LoadView()
    await view.start(publisher.js)
    try:
        assert len(view.loads(T)) == 20, sorted(view.loads(T))
    finally:
        await view.stop()


async def test_an_empty_bucket_does_not_hold_the_start(publisher: Publisher) -> None:
    view = LoadView()
    began = time.monotonic()
    await view.start(publisher.js)
    try:
        assert time.monotonic() - began < 2.0
        assert view.loads("nobody-here") == {}
    finally:
        await view.stop()
