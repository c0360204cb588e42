"""``broker.client._ndjson_lines``: an answer's lines, however its bytes are chunked."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import httpx
from hypothesis import given
from hypothesis import strategies as st

from broker.client import _ndjson_lines


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def _lines(chunks: list[bytes]) -> list[bytes]:
    response = httpx.Response(200, stream=_Chunks(chunks))
    return [line async for line in _ndjson_lines(response)]


@given(
    data=st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b"\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_lines_are_split_at_newlines_wherever_the_chunks_end(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert asyncio.run(_lines(chunks)) == expected


def test_a_whole_line_in_its_own_chunk_is_handed_on_as_it_is() -> None:
    line = b'{"seq": 1}' * 1000
    assert asyncio.run(_lines([line + b"\n", line + b"\n"])) == [line, line]
    assert asyncio.run(_lines([line[:7], line[7:] + b"\n" + line[:3], line[3:]])) == [line, line]
