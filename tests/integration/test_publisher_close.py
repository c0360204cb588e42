"""Closing a publisher whose server stopped answering (SIGSTOP: the process is there, its
sockets open, nothing read or answered) takes seconds, not for ever.

nats-py's ``drain()``, given 2 s, swallowed its cancellation and waited for a PONG (10 s);
its ``close()`` then waited, with no bound, for the socket to take what was buffered, which
a server that stopped reading never does: a router or an ingress worker stopping while its
NATS hung stayed up until something killed it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats.errors
import pytest
import pytest_asyncio

from broker.embedded import NatsServer
from broker.publisher import Publisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

#: What the slowest close may take: the publisher's 2 s for acks, then its 3 s for the
#: server before the socket is cut, and some slack for a busy machine.
CLOSED_WITHIN = 9.0


@pytest_asyncio.fixture
async def publisher(nats_server: NatsServer) -> AsyncIterator[Publisher]:
    publisher = Publisher([nats_server.url], name="close-test")
    publisher.start()
    assert await publisher.wait_connected(10)
    yield publisher
    nats_server.resume()


async def closed_in(publisher: Publisher) -> float:
    began = time.monotonic()
    async with asyncio.timeout(40):  # a failure of the test, not a hang of the suite
        await publisher.close()
    return time.monotonic() - began


async def test_a_hung_server_is_given_up_on(publisher: Publisher, nats_server: NatsServer) -> None:
    """With a subscription open (a router's registry and load views): draining it waited for
    the server's answer to a PING, twice."""
    await publisher.nc.subscribe("reg.>")
    await publisher.nc.flush()
    nats_server.pause()
    assert await closed_in(publisher) < CLOSED_WITHIN
    assert publisher.nc.is_closed


async def test_a_hung_server_that_stopped_reading_has_its_socket_cut(
    publisher: Publisher, nats_server: NatsServer
) -> None:
    """Publishes until the socket's buffers are full and writes stall: what is buffered
    then can never be written, and the close cuts the socket instead of waiting on it."""
    nats_server.pause()
    chunk = b"\0" * 512 * 1024
    stalled = False
    for _ in range(400):  # 200 MiB at most; loopback buffers fill after a few MiB
        began = time.monotonic()
        try:
            async with asyncio.timeout(0.5):  # nats-py may swallow it: timed as well
                await publisher.nc.publish("fill.up", chunk)
        except (TimeoutError, nats.errors.OutboundBufferLimitError):
            stalled = True  # writes wait, or the client refuses to buffer more
            break
        if time.monotonic() - began >= 0.5:
            stalled = True
            break
    assert stalled, "the paused server's socket took everything: nothing tested"
    assert await closed_in(publisher) < CLOSED_WITHIN
    assert publisher.nc.is_closed
