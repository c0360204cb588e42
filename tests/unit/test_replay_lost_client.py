"""``BrokerClient.replay`` on ``Broker-Stream-First-Seq`` and ``Broker-Stream-First-Time``,
against an in-process stand-in for the broker (``httpx.MockTransport``): a loss is reported
once, however often the page that found it is tried; a replay from the start or from a time
reports one too; a header that is no sequence or no time is not taken for one."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import orjson
import pytest

from broker.client import BrokerClient, RecordsLost, RetryPolicy
from broker.envelope import H_STREAM_FIRST_SEQ, H_STREAM_FIRST_TIME, H_STREAM_LAST_SEQ

pytestmark = pytest.mark.unit

BASE = "http://broker.test"


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> BrokerClient:
    client = BrokerClient(BASE, retry=RetryPolicy(attempts=3, base_delay=0, max_delay=0))
    client._http = httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(handler))
    return client


def _line(seq: int) -> bytes:
    record: dict[str, Any] = {
        "stream": "MESSAGES",
        "seq": seq,
        "subject": "msg.default.audit",
        "time": None,
        "headers": {},
        "payload_base64": base64.b64encode(b"-").decode(),
    }
    return orjson.dumps(record) + b"\n"


async def _cut_before_any_record() -> AsyncIterator[bytes]:
    raise httpx.ReadError("connection cut")
    yield b""  # pragma: no cover - makes this an async generator


async def test_a_page_tried_again_reports_its_loss_once() -> None:
    """The connection is cut after the answer's headers, before its first record: the page
    is asked for again from the same start, which the stream's first sequence is still
    above. One loss, told once."""
    starts: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        starts.append(request.url.params["start_seq"])
        headers = {
            "content-type": "application/x-ndjson",
            H_STREAM_FIRST_SEQ: "5",
            H_STREAM_LAST_SEQ: "6",
        }
        if len(starts) == 1:
            return httpx.Response(200, content=_cut_before_any_record(), headers=headers)
        return httpx.Response(200, content=_line(5) + _line(6), headers=headers)

    lost: list[RecordsLost] = []
    async with _client(answer) as client:
        got = [m.seq async for m in client.replay(start_seq=2, on_lost=lost.append)]
    assert starts == ["2", "2"]
    assert got == [5, 6]
    assert lost == [RecordsLost("MESSAGES", 2, 5)]


@pytest.mark.parametrize("first", ["", "abc", "\u00b2", "-1"])
async def test_a_first_seq_header_that_is_no_sequence_reports_nothing(first: str) -> None:
    """Only ASCII digits are a sequence (``"\u00b2".isdigit()`` is true, ``int`` refuses it):
    anything else in the header is left unread, not a failed replay nor a false loss."""

    def answer(request: httpx.Request) -> httpx.Response:
        headers = [(b"content-type", b"application/x-ndjson"), (H_STREAM_LAST_SEQ.encode(), b"3")]
        if first:  # as a server may send it: bytes, read back as Latin-1
            headers.append((H_STREAM_FIRST_SEQ.encode(), first.encode("latin-1")))
        return httpx.Response(200, content=_line(3), headers=headers)

    lost: list[RecordsLost] = []
    async with _client(answer) as client:
        got = [m.seq async for m in client.replay(start_seq=1, on_lost=lost.append)]
    assert got == [3]
    assert lost == []


async def test_a_last_seq_header_that_is_no_sequence_leaves_the_end_open() -> None:
    """``²`` in ``Broker-Stream-Last-Seq`` made ``int()`` raise inside the replay; it is
    read as no end (a page short of ``limit`` ends the replay then)."""
    pages: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        pages.append(request.url.params.get("start_seq", ""))
        headers = [(b"content-type", b"application/x-ndjson")]
        headers.append((H_STREAM_LAST_SEQ.encode(), "\u00b2".encode("latin-1")))
        return httpx.Response(200, content=_line(3) if len(pages) == 1 else b"", headers=headers)

    async with _client(answer) as client:
        got = [m.seq async for m in client.replay(start_seq=1)]
    assert got == [3]
    assert pages == ["1"]


def _answer_with(
    first_seq: str, first_time: str | None
) -> Callable[[httpx.Request], httpx.Response]:
    """An answer of one record (seq 8) whose stream begins at ``first_seq``, first stored
    at ``first_time`` (no ``Broker-Stream-First-Time`` when ``None``)."""

    def answer(request: httpx.Request) -> httpx.Response:
        headers = [
            (b"content-type", b"application/x-ndjson"),
            (H_STREAM_FIRST_SEQ.encode(), first_seq.encode()),
            (H_STREAM_LAST_SEQ.encode(), b"8"),
        ]
        if first_time is not None:  # as a server may send it: bytes, read back as Latin-1
            headers.append((H_STREAM_FIRST_TIME.encode(), first_time.encode("latin-1")))
        return httpx.Response(200, content=_line(8), headers=headers)

    return answer


@pytest.mark.parametrize(("first_seq", "lost_before"), [("5", 5), ("1", None), ("0", None)])
async def test_a_replay_from_the_start_reports_a_first_seq_above_1(
    first_seq: str, lost_before: int | None
) -> None:
    """No start is seq 1: a stream that begins later lost records (some may have been in
    range); one that begins at 1, or never held a record (0), lost none."""
    lost: list[RecordsLost] = []
    async with _client(_answer_with(first_seq, "2026-11-28T10:00:00+00:00")) as client:
        got = [m.seq async for m in client.replay(on_lost=lost.append)]
    assert got == [8]
    assert lost == ([] if lost_before is None else [RecordsLost("MESSAGES", 1, lost_before)])


FIRST_TIME = "2026-11-28T10:00:00.000005+00:00"
AT_FIRST = datetime(2026, 11, 28, 10, 0, 0, 5, tzinfo=UTC)
TICK = timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("since", "first_seq", "first_time", "reported"),
    [
        (AT_FIRST, "7", FIRST_TIME, True),  # equal to the microsecond: may be in range
        (AT_FIRST.astimezone(timezone(timedelta(hours=5))), "7", FIRST_TIME, True),
        (AT_FIRST - TICK, "7", FIRST_TIME, True),
        (AT_FIRST + TICK, "7", FIRST_TIME, False),  # every record gone was before it
        (AT_FIRST - TICK, "1", FIRST_TIME, False),  # nothing removed
        (AT_FIRST - TICK, "7", "2026-11-28T10:00:00.000005Z", True),
        (AT_FIRST - TICK, "7", None, False),  # a broker from before the header
        (AT_FIRST - TICK, "7", "yesterday", False),
        (AT_FIRST - TICK, "7", "2026-11-28T10:00:00", False),  # no offset: no instant
        (AT_FIRST - TICK, "7", "\u00b2026-11-28T10:00:00+00:00", False),
    ],
)
async def test_a_replay_since_a_time_reports_a_loss_unless_after_the_first_record(
    since: datetime, first_seq: str, first_time: str | None, reported: bool
) -> None:
    """Records before the first sequence were stored at or before ``Broker-Stream-First-
    Time``: a ``since`` at or before it (in any offset) may have asked for some, one after
    it for none. With the header missing or no time with an offset, nothing is said."""
    lost: list[RecordsLost] = []
    async with _client(_answer_with(first_seq, first_time)) as client:
        got = [m.seq async for m in client.replay(since=since, on_lost=lost.append)]
    assert got == [8]
    assert lost == ([RecordsLost("MESSAGES", None, 7, since)] if reported else [])


async def test_a_page_since_a_time_tried_again_reports_its_loss_once() -> None:
    """The first page (from a time) is cut before its first record and asked for again from
    that time: the loss both answers show is told once."""
    asked: list[dict[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(dict(request.url.params))
        headers = {
            "content-type": "application/x-ndjson",
            H_STREAM_FIRST_SEQ: "5",
            H_STREAM_FIRST_TIME: FIRST_TIME,
            H_STREAM_LAST_SEQ: "6",
        }
        if len(asked) == 1:
            return httpx.Response(200, content=_cut_before_any_record(), headers=headers)
        return httpx.Response(200, content=_line(5) + _line(6), headers=headers)

    lost: list[RecordsLost] = []
    async with _client(answer) as client:
        replay = client.replay(since=AT_FIRST, page=2, on_lost=lost.append)
        got = [m.seq async for m in replay]
    assert [params.get("start_time") for params in asked] == [AT_FIRST.isoformat()] * 2
    assert got == [5, 6]
    assert lost == [RecordsLost("MESSAGES", None, 5, AT_FIRST)]
    assert str(lost[0]) == (
        f"replay of MESSAGES from {AT_FIRST.isoformat()}: records before seq 5 aged out or "
        "were purged (some may have been in range)"
    )
