"""The Publisher at the edges of its connection: a message over the server's
``max_payload`` once its headers count, and publishes still awaiting their ack when the
publisher closes. Against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import orjson
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from broker.embedded import NatsServer, ServerSpec
from broker.envelope import NATS_MSG_ID, Outbound
from broker.errors import PayloadTooLarge, PublishTimeout, Unavailable
from broker.publisher import Publisher
from broker.settings import Settings
from broker.streams import provision

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 4096


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server whose ``max_payload`` is small enough to reach with a few headers."""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats", max_payload=MAX_PAYLOAD)).start()
    yield server
    server.stop()


async def _publisher(url: str, *, publish_timeout: float = 5.0) -> Publisher:
    nc = await nats.connect(url)
    await provision(nc.jetstream(), Settings())
    await nc.close()
    pub = Publisher([url], publish_timeout=publish_timeout)
    pub.start()
    assert await pub.wait_connected(5)
    return pub


@pytest_asyncio.fixture
async def small_publisher(small_server: NatsServer) -> AsyncIterator[Publisher]:
    pub = await _publisher(small_server.url, publish_timeout=2.0)
    yield pub
    await pub.close()


async def test_a_message_over_max_payload_with_its_headers_is_refused_without_dropping_others(
    small_publisher: Publisher,
) -> None:
    """A payload under ``max_payload`` whose headers take it over: nats-py checks the payload
    alone, and the server closes the connection on it. The sender was told "may be stored,
    retry with the same key" (which fails the same way every time), and every other publish
    in flight on the connection timed out with it. Now it is refused as too large, before
    anything is sent, and the publish sent just before it is acked."""
    before = await small_publisher.submit(Outbound("msg.default.before", b"{}", {}))
    big = Outbound("msg.default.big", b"x" * (MAX_PAYLOAD - 50), {NATS_MSG_ID: "k" * 100})
    with pytest.raises(PayloadTooLarge):
        await small_publisher.publish(big)
    ack = await asyncio.wait_for(before, 10)
    assert ack.stream == "MESSAGES"
    assert small_publisher.connected
    after = await small_publisher.publish(Outbound("msg.default.after", b"{}", {}))
    assert after.seq == ack.seq + 1  # the big one was never stored


async def test_a_message_exactly_at_max_payload_with_its_headers_is_stored(
    small_publisher: Publisher,
) -> None:
    """The limit is inclusive: headers and payload adding up to ``max_payload`` are stored."""
    headers = {NATS_MSG_ID: "exact"}
    header_block = len(b"NATS/1.0\r\nNats-Msg-Id: exact\r\n\r\n")
    out = Outbound("msg.default.exact", b"x" * (MAX_PAYLOAD - header_block), headers)
    ack = await small_publisher.publish(out)
    assert ack.seq == 1


async def _silent_responder(url: str, subject: str) -> NatsClient:
    """A plain subscriber on ``subject`` that never answers: a publish there awaits an ack
    that never comes (no JetStream stream, and no "no responders" either)."""
    nc = await nats.connect(url)

    async def ignore(msg: Msg) -> None:
        return None

    await nc.subscribe(subject, cb=ignore)
    await nc.flush()
    return nc


async def test_a_publish_awaiting_its_ack_when_the_publisher_closes_fails_instead_of_hanging(
    nats_url: str,
) -> None:
    """close() stopped the sweeper that times out publishes, then unsubscribed their replies:
    a publish still waiting for its ack waited for ever (a request hung through shutdown).
    Now it fails with PublishTimeout (may be stored: retry with the same key)."""
    other = await _silent_responder(nats_url, "elsewhere.silent")
    pub = await _publisher(nats_url, publish_timeout=30.0)
    try:
        pending = await pub.submit(Outbound("elsewhere.silent", b"{}", {NATS_MSG_ID: "a"}))
        await pub.close()
        with pytest.raises(PublishTimeout):
            await asyncio.wait_for(pending, 5)
    finally:
        await pub.close()
        await other.close()


async def test_publishes_sent_just_before_close_get_their_acks(publisher: Publisher) -> None:
    """Stored by JetStream, their acks on the way when close() unsubscribed from them: the
    callers waited for ever though their messages were stored. Now each gets its ack."""
    pending = [
        await publisher.submit(Outbound(f"msg.default.closing.{i}", b"{}", {NATS_MSG_ID: str(i)}))
        for i in range(1000)
    ]
    await publisher.close()
    acks = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert sorted(ack.seq for ack in acks) == list(range(1, 1001))


async def test_an_ack_arriving_while_the_publisher_closes_still_answers_its_publish(
    nats_url: str,
) -> None:
    """close() flushes what is pending: an ack that comes a moment after close() began (a
    slow JetStream) answers its publish, rather than being unsubscribed from."""
    nc = await nats.connect(nats_url)

    async def answer_late(msg: Msg) -> None:
        await asyncio.sleep(0.3)
        await nc.publish(msg.reply, orjson.dumps({"stream": "MESSAGES", "seq": 7}))

    await nc.subscribe("elsewhere.slow", cb=answer_late)
    await nc.flush()
    pub = await _publisher(nats_url, publish_timeout=30.0)
    try:
        pending = await pub.submit(Outbound("elsewhere.slow", b"{}", {NATS_MSG_ID: "b"}))
        await pub.close()
        ack = await asyncio.wait_for(pending, 5)
        assert (ack.stream, ack.seq) == ("MESSAGES", 7)
    finally:
        await pub.close()
        await nc.close()


async def test_a_publish_submitted_while_the_publisher_closes_is_refused(nats_url: str) -> None:
    """Once close() has begun, a submit is refused as unavailable (retry elsewhere) instead
    of being sent on a connection whose reply subscription is going away."""
    other = await _silent_responder(nats_url, "elsewhere.silent")
    pub = await _publisher(nats_url, publish_timeout=30.0)
    try:
        first = await pub.submit(Outbound("elsewhere.silent", b"{}", {NATS_MSG_ID: "c"}))
        closing = asyncio.create_task(pub.close())
        await asyncio.sleep(0)  # close() has begun, the connection is still up
        with pytest.raises(Unavailable):
            await pub.submit(Outbound("elsewhere.silent", b"{}", {NATS_MSG_ID: "d"}))
        await closing
        with pytest.raises(PublishTimeout):
            await asyncio.wait_for(first, 5)
    finally:
        await pub.close()
        await other.close()
