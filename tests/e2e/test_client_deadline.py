"""The client's ``total_timeout``: one bound on a call's tries and the waits between them.

A stand-in broker on loopback (h2c, as the client speaks to a broker without TLS) answers
503 with a ``Retry-After``, or nothing at all, as each test needs; one test has the real
broker answer 503 while its NATS is down.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import orjson
import pytest
import pytest_asyncio

from broker.client import BrokerClient, RetryPolicy, TotalTimeoutExceeded
from broker.embedded import NatsServer, ServerSpec
from broker.errors import (
    DeadlineExceeded,
    InvalidSubject,
    NotFound,
    Unavailable,
    error_class,
)
from tests._wait import await_until
from tests.e2e._broker import start_broker

pytestmark = pytest.mark.e2e

#: An answer: status, headers, body; ``None`` leaves the request unanswered.
Answer = tuple[int, list[tuple[str, str]], bytes] | None
BUSY: Answer = (
    503,
    [("content-type", "application/json"), ("retry-after", "1")],
    orjson.dumps({"error_code": "nats_unavailable", "message": "NATS is not connected"}),
)
STORED: Answer = (
    200,
    [("content-type", "application/json")],
    orjson.dumps({"stream": "MESSAGES", "seq": 1, "duplicate": False}),
)
MISSING: Answer = (
    404,
    [("content-type", "application/json")],
    orjson.dumps({"error_code": "not_found", "message": "no such agent"}),
)
#: Patient beyond any deadline in these tests: only the deadline can end the retries. A
#: ``Retry-After`` is waited up to 4 s (four times ``max_delay``).
PATIENT = RetryPolicy(attempts=1000, base_delay=0.2, max_delay=1.0)


@dataclass
class StandIn:
    """An h2c server that answers the n-th request (from 0) with ``answer(n)``; it keeps
    when each request came."""

    answer: Callable[[int], Answer]
    came: list[float] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65535):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        self.came.append(time.monotonic())
                        answer = self.answer(len(self.came) - 1)
                        if answer is not None:
                            status, headers, body = answer
                            conn.send_headers(event.stream_id, [(":status", str(status)), *headers])
                            conn.send_data(event.stream_id, body, end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def warm(client: BrokerClient) -> None:
    """Have ``client`` connect and read an error answer, so that neither costs time in what
    a test measures next (the client imports the error classes at its first error)."""
    with pytest.raises(NotFound):
        await client.get_agent("warm")


@pytest_asyncio.fixture
async def stand_in() -> AsyncIterator[tuple[StandIn, str]]:
    """A stand-in that answers 503 with ``Retry-After: 1`` until a test says otherwise."""
    standing = StandIn(lambda n: BUSY)
    server = await asyncio.start_server(standing.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield standing, f"http://127.0.0.1:{port}"


async def test_no_retry_is_begun_that_would_start_past_the_deadline(
    stand_in: tuple[StandIn, str],
) -> None:
    """Each 503 asks for a second's wait: tries at 0, 1 and 2 s, and the third 503 is raised
    as it comes, not slept on, as a fourth try would start past the 2.5 s deadline."""
    standing, url = stand_in
    standing.answer = lambda n: MISSING if n == 0 else BUSY
    async with BrokerClient(url, retry=PATIENT, total_timeout=2.5) as client:
        await warm(client)
        began = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            await client.publish("orders.created", {"n": 1})
        ended = time.monotonic()
    assert raised.value.error_code == "nats_unavailable"  # the broker's last answer
    tries = standing.came[1:]
    assert len(tries) == 3
    assert tries[-1] + 1 > began + 2.5  # no time was left for another try
    assert ended - tries[-1] < 0.9  # the last 503 was raised, not slept on


async def test_a_retry_after_past_the_deadline_ends_the_retries(
    stand_in: tuple[StandIn, str],
) -> None:
    """The policy would wait 4 s (four times its ``max_delay``), but the broker asks for 30:
    with 10 s left the client has no time to come back as asked, and raises the 503 at
    once rather than try again early."""
    standing, url = stand_in
    status, headers, body = BUSY
    busy = (status, [*headers[:1], ("retry-after", "30")], body)
    standing.answer = lambda n: MISSING if n == 0 else busy
    async with BrokerClient(url, retry=PATIENT, total_timeout=10) as client:
        await warm(client)
        began = time.monotonic()
        with pytest.raises(Unavailable):
            await client.publish("orders.created", {"n": 1})
        assert time.monotonic() - began < 3
    assert len(standing.came) == 2


async def test_a_try_still_unanswered_at_the_deadline_is_given_up(
    stand_in: tuple[StandIn, str],
) -> None:
    """The first request is never answered: the call ends at the deadline, long before the
    per-try ``timeout``, with DeadlineExceeded; the client's connection still serves."""
    standing, url = stand_in
    standing.answer = lambda n: None if n == 0 else STORED
    async with BrokerClient(url, timeout=60, retry=PATIENT, total_timeout=1) as client:
        began = time.monotonic()
        with pytest.raises(TotalTimeoutExceeded) as raised:
            await client.publish("orders.created", {"n": 1})
        assert 1 <= time.monotonic() - began < 3
        assert "total_timeout of 1 s" in str(raised.value)
        assert isinstance(raised.value, DeadlineExceeded)  # caught where that is
        assert error_class("deadline_exceeded", 504) is DeadlineExceeded  # the broker's stays
        assert (await client.publish("orders.created", {"n": 2})).seq == 1


async def test_a_broker_out_of_reach_is_given_up_at_the_deadline() -> None:
    """Connection errors are retried until the next try would start past the deadline; the
    last is raised (or DeadlineExceeded, should the deadline fall within a try's instant)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens there now
    async with BrokerClient(f"http://127.0.0.1:{port}", retry=PATIENT, total_timeout=1) as client:
        began = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.get_agent("nobody")
        assert time.monotonic() - began < 1.2


async def nats_gone(url: str) -> bool:
    """Whether the broker at ``url`` says it has lost NATS (``/readyz`` is no longer 200)."""
    async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as http:
        return (await http.get(f"{url}/readyz")).status_code != 200


def test_total_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="total_timeout"):
        BrokerClient(total_timeout=0)


async def test_the_brokers_retry_after_past_the_deadline_ends_the_retries(
    tmp_path: Path,
) -> None:
    """NATS is down: the real broker answers 503 with its ``Retry-After`` (30 s here). With
    10 s left, the client raises that 503 without trying again (the policy alone would
    have tried again after 4 s)."""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats")).start()
    broker = start_broker(
        tmp_path / "b",
        nats_url=server.url,
        env={"BROKER_RETRY_AFTER_SECONDS": "30", "BROKER_PUBLISH_TIMEOUT": "1"},
    )
    subject = f"client.deadline.{uuid.uuid4().hex[:6]}"
    try:
        async with BrokerClient(broker.base_url, retry=PATIENT, total_timeout=10) as client:
            await client.publish(subject, {"n": 0})
            with pytest.raises(InvalidSubject):  # an error answered: the client has read one
                await client.publish("not.valid.*", {"n": 0})
            server.stop()
            assert await await_until(lambda: nats_gone(broker.base_url))
            began = time.monotonic()
            with pytest.raises(Unavailable) as raised:
                await client.publish(subject, {"n": 1})
            assert time.monotonic() - began < 3
            assert raised.value.retryable
    finally:
        broker.stop()
        server.stop()
