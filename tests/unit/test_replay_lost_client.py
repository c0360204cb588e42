"""``BrokerClient.replay`` on ``Broker-Stream-First-Seq``, against an in-process stand-in
for the broker (``httpx.MockTransport``): a loss is reported once, however often the page
that found it is tried, and a header that is no sequence is not taken for one."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from broker.client import BrokerClient, RecordsLost, RetryPolicy
from broker.envelope import H_STREAM_FIRST_SEQ, H_STREAM_LAST_SEQ

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
