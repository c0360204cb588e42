"""Replay at its edges: starts NATS would refuse are a 422, not a 500, and every read deletes
its consumer when it ends instead of leaving it on the server for its inactivity threshold.

The HTTP cases use the module's ``broker serve`` (tests/e2e/conftest.py); the reader cases
use :mod:`broker.reader` directly on a server of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
import nats
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from broker.embedded import NatsServer
from broker.reader import read_batches, read_messages
from tests._wait import await_until
from tests.e2e._broker import BrokerProcess

pytestmark = pytest.mark.e2e

REPLAY = "/v1/streams/MESSAGES/messages"
MAX_SEQ = 2**63 - 1


async def consumers(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.consumer_count


async def readers_left(js: JetStreamContext, subject: str) -> list[str]:
    """The MESSAGES consumers still reading ``subject``: a replay's, by its filter. Other
    consumers of the module's broker (the router, projections, other tests' reads whose
    deletion finishes late) come and go meanwhile, so a count would not tell."""
    return [
        info.name
        for info in await js.consumers_info("MESSAGES")
        if info.config.filter_subject == f"msg.default.{subject}"
    ]


async def no_reader_left(js: JetStreamContext, subject: str) -> bool:
    """No replay of ``subject`` holds a consumer within two seconds (an expired one would
    take its 30 s inactivity threshold)."""

    async def gone() -> bool:
        return not await readers_left(js, subject)

    return await await_until(gone, timeout=2.0)


async def back_to(js: JetStreamContext, stream: str, count: int) -> bool:
    """The stream's consumer count is ``count`` again within a second or two (an expired
    consumer would take its 30 s inactivity threshold)."""

    async def settled() -> bool:
        return await consumers(js, stream) == count

    return await await_until(settled, timeout=2.0)


def assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_code"] == "unprocessable"
    assert isinstance(body["message"], str)
    assert body["message"]


# --- Last-Event-ID and start_time NATS cannot take ------------------------------------------


@pytest.mark.parametrize(
    "last_event_id",
    [
        "18446744073709551615",  # 2^64 - 1: the next one is 2^64, no uint64 (NATS 10025)
        "99999999999999999999",  # 20 digits, the most the header may carry
        str(MAX_SEQ),  # its next one is above the cap start_seq has
    ],
)
async def test_last_event_id_past_the_cap_is_422(
    client: httpx.AsyncClient, last_event_id: str
) -> None:
    for accept in ("text/event-stream", "application/x-ndjson"):
        r = await client.get(REPLAY, headers={"Last-Event-ID": last_event_id, "Accept": accept})
        assert_refused(r)


async def test_last_event_id_just_below_the_cap_reads_nothing(client: httpx.AsyncClient) -> None:
    r = await client.get(
        REPLAY, headers={"Last-Event-ID": str(MAX_SEQ - 1), "Accept": "text/event-stream"}
    )
    assert r.status_code == 200, r.text
    assert r.content == b""


@pytest.mark.parametrize(
    "start_time",
    [
        "0001-01-01T00:00:00+05:00",  # year 0 in UTC
        "9999-12-31T23:00:00-05:00",  # year 10000 in UTC
    ],
)
async def test_start_time_out_of_range_in_utc_is_422(
    client: httpx.AsyncClient, start_time: str
) -> None:
    assert_refused(await client.get(REPLAY, params={"start_time": start_time}))


async def test_start_time_at_the_ends_of_the_range_is_read(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = f"bounds.{uuid.uuid4().hex[:8]}"
    stored = (await js.publish(f"msg.default.{subject}", b"{}")).seq
    params = {"subject": subject}
    r = await client.get(REPLAY, params={**params, "start_time": "0001-01-01T00:00:00Z"})
    assert r.status_code == 200, r.text
    assert b'"seq":%d' % stored in r.content
    r = await client.get(REPLAY, params={**params, "start_time": "9999-12-31T23:59:59Z"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "start_time",
    [
        "1700000000",  # a Unix time: pydantic took it for 2023-11-14
        "2026-11-24",  # a date alone
        "2026-11-24T10:00:00",  # no offset
        "2026-11-24 10:00:00Z",  # a space for the T
        "2026-11-24T10:00Z",  # no seconds
        "2026-11-24T10:00:00+0100",  # an offset without its colon
        "2026-02-30T10:00:00Z",  # no such day
    ],
)
async def test_start_time_is_rfc_3339_only(client: httpx.AsyncClient, start_time: str) -> None:
    r = await client.get(REPLAY, params={"start_time": start_time})
    assert_refused(r)
    assert "start_time" in r.json()["message"]


async def test_start_time_takes_any_rfc_3339_form(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = f"bounds.{uuid.uuid4().hex[:8]}"
    stored = (await js.publish(f"msg.default.{subject}", b"{}")).seq
    for start_time in ("2000-01-01t00:00:00z", "2000-01-01T01:30:00.123456789+01:30"):
        r = await client.get(REPLAY, params={"subject": subject, "start_time": start_time})
        assert r.status_code == 200, r.text
        assert b'"seq":%d' % stored in r.content


# --- consumers deleted when a replay ends --------------------------------------------------


async def test_http_replays_leave_no_consumer_behind(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = f"bounds.{uuid.uuid4().hex[:8]}"
    for i in range(20):
        await js.publish(f"msg.default.{subject}", b'{"n": %d}' % i)
    for _ in range(5):
        r = await client.get(REPLAY, params={"subject": subject})  # to the end
        assert r.status_code == 200
        assert r.content.count(b"\n") == 20
        r = await client.get(REPLAY, params={"subject": subject, "limit": 3})  # cut by limit
        assert r.status_code == 200
        assert r.content.count(b"\n") == 3
        r = await client.get(
            REPLAY, params={"subject": subject}, headers={"Accept": "text/event-stream"}
        )
        assert r.status_code == 200
        assert r.content.count(b"event: message") == 20
    assert await no_reader_left(js, subject), await readers_left(js, subject)


async def test_a_replay_the_client_walks_away_from_leaves_no_consumer_behind(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = f"bounds.{uuid.uuid4().hex[:8]}"
    payload = b'{"pad": "%s"}' % (b"x" * 4000)
    for _ in range(0, 3000, 250):  # 3 000 at once timed out on a loaded machine
        await asyncio.gather(
            *(js.publish(f"msg.default.{subject}", payload, timeout=30) for _ in range(250))
        )
    async with (
        httpx.AsyncClient(base_url=broker.base_url, timeout=15) as walker,
        walker.stream("GET", REPLAY, params={"subject": subject}) as r,
    ):
        assert r.status_code == 200
        async for _ in r.aiter_bytes():
            break  # far from the ~4 MB (1000 records): the server is still writing
    assert await no_reader_left(js, subject), await readers_left(js, subject)


# --- the reader itself (agent history, as_of and schema catch-up read through it) ----------


@pytest_asyncio.fixture
async def stream(nats_url: str) -> AsyncIterator[tuple[JetStreamContext, str]]:
    """A stream of 50 messages on ``bounds.<n>`` and a JetStream context to read it."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name="BOUNDS", subjects=["bounds.>"])
    for i in range(50):
        await js.publish(f"bounds.{i % 5}", b"%d" % i)
    yield js, "BOUNDS"
    await nc.close()


async def test_every_way_a_read_ends_deletes_its_consumer(
    stream: tuple[JetStreamContext, str],
) -> None:
    js, name = stream
    assert await consumers(js, name) == 0

    assert len([m async for m in read_messages(js, name, batch=7)]) == 50  # to the end
    assert await back_to(js, name, 0)

    assert [m async for m in read_messages(js, name, start_seq=51)] == []  # nothing to read
    assert await back_to(js, name, 0)

    async with contextlib.aclosing(read_batches(js, name, batch=5)) as batches:
        async for _ in batches:
            break  # the caller found what it wanted
    assert await back_to(js, name, 0)

    async for _ in read_messages(js, name, subject="bounds.1", batch=2):
        break  # not closed by the caller: closed when collected
    assert await back_to(js, name, 0)

    async def failing_reader() -> None:
        async for _ in read_messages(js, name):
            raise RuntimeError("the caller failed")

    with pytest.raises(RuntimeError, match="the caller failed"):
        await failing_reader()
    assert await back_to(js, name, 0)

    started = asyncio.Event()

    async def slow_reader() -> None:
        async for _ in read_messages(js, name, batch=1):
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(slow_reader())
    await started.wait()
    task.cancel()  # e.g. the HTTP client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await back_to(js, name, 0)


async def test_closing_a_read_when_nats_is_gone_does_not_raise(
    nats_server: NatsServer, stream: tuple[JetStreamContext, str]
) -> None:
    js, name = stream
    batches = read_batches(js, name, batch=5)
    assert len(await anext(batches)) == 5
    nats_server.stop()
    await batches.aclose()  # the unsubscribe and the deletion fail quietly
