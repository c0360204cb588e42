"""Body reads stop at once when the client is gone: granian hands the rest of a body whose
connection closed as empty chunks, for ever, and the reads only counted them until their
deadlines (30 s, 5 s), a core busy for each such client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from broker.errors import BadRequest
from broker.http._rsgi import discard_body, read_body

pytestmark = pytest.mark.unit


class CutOff:
    """A protocol whose client sent ``first`` and went away: empty chunks from then on."""

    def __init__(self, first: bytes, *, gone: bool = True) -> None:
        self.first = first
        self.gone = gone
        self.chunks = 0

    async def __call__(self) -> bytes:
        raise AssertionError("a body without Content-Length is read chunk by chunk")

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self.first
        while True:
            self.chunks += 1
            await asyncio.sleep(0)
            yield b""

    async def client_disconnect(self) -> None:
        if not self.gone:
            await asyncio.Event().wait()


async def test_a_body_without_length_whose_client_left_is_refused_at_once() -> None:
    proto = CutOff(b"half of a body")
    started = time.monotonic()
    with pytest.raises(BadRequest, match="went away in the middle"):
        await read_body(proto, {}, 1024, timeout=30)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    assert proto.chunks < 100


async def test_empty_chunks_of_a_client_still_there_are_not_taken_for_a_departure() -> None:
    """An HTTP/2 body may carry empty DATA frames: while the client is there, the read
    goes on to its deadline (here 0.3 s) rather than refusing it as gone."""
    proto = CutOff(b"part", gone=False)
    with pytest.raises(Exception, match="not received within"):
        await read_body(proto, {}, 1024, timeout=0.3)  # type: ignore[arg-type]


async def test_a_discarded_body_whose_client_left_is_given_up_at_once() -> None:
    proto = CutOff(b"x")
    started = time.monotonic()
    await discard_body(proto, {"content-length": "100"})  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0


class ShortBody:
    """A protocol whose client declared more than it sent, then reset the stream with
    NO_ERROR: granian hands what had arrived as the whole body (HTTP/2 only)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __call__(self) -> bytes:
        return self.body

    def __aiter__(self) -> AsyncIterator[bytes]:
        raise AssertionError("a body with Content-Length is read whole")

    async def client_disconnect(self) -> None:
        return None


async def test_a_body_short_of_its_content_length_is_refused() -> None:
    proto = ShortBody(b"half of a body")
    with pytest.raises(BadRequest, match="ended before its Content-Length of 100 bytes"):
        await read_body(proto, {"content-length": "100"}, 1024)  # type: ignore[arg-type]


async def test_a_body_of_its_content_length_is_taken() -> None:
    proto = ShortBody(b"a whole body")
    assert await read_body(proto, {"content-length": "12"}, 1024) == b"a whole body"  # type: ignore[arg-type]
