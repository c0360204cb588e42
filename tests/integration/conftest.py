"""Fixtures of the integration tier: a provisioned server and a connected publisher."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest_asyncio

from broker.publisher import Publisher
from broker.settings import Settings
from broker.streams import provision


@pytest_asyncio.fixture
async def publisher(nats_url: str) -> AsyncIterator[Publisher]:
    """A :class:`Publisher` connected to a fresh server with every broker stream provisioned."""
    nc = await nats.connect(nats_url)
    await provision(nc.jetstream(), Settings())
    await nc.close()
    pub = Publisher([nats_url])
    pub.start()
    assert await pub.wait_connected(5)
    yield pub
    await pub.close()
