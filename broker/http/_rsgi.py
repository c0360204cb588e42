"""Small helpers over granian's RSGI protocol for the hot paths.

The ingress is an RSGI application: on the same granian build, a trivial RSGI handler
answers about 3.5x the requests per second of the equivalent ASGI one (35k vs 10k/s over
h2c on this 2-core machine, BENCHMARKS.md), because RSGI hands the body and the response to
Rust in one call instead of a message round trip per ASGI ``receive``/``send``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson

from broker.errors import BadRequest, BrokerError, PayloadTooLarge

JSON = "application/json"
NDJSON = "application/x-ndjson"


class Headers(Protocol):
    def __contains__(self, key: str) -> bool: ...
    def get(self, key: str, default: Any = None) -> Any: ...
    def items(self) -> list[tuple[str, str]]: ...


class Scope(Protocol):
    """The RSGI HTTP scope (granian's ``Scope``)."""

    proto: str
    http_version: str
    scheme: str
    method: str
    path: str
    query_string: str
    server: str
    client: str

    @property
    def headers(self) -> Headers: ...


class StreamTransport(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...


class HTTPProtocol(Protocol):
    """The RSGI HTTP protocol object (granian's ``RSGIHTTPProtocol``)."""

    async def __call__(self) -> bytes: ...
    def __aiter__(self) -> AsyncIterator[bytes]: ...
    async def client_disconnect(self) -> None: ...
    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...
    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> StreamTransport: ...


def content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise BadRequest("Content-Length is not a non-negative integer")
    return int(value)


async def read_body(proto: HTTPProtocol, headers: Headers, limit: int) -> bytes:
    """The whole request body, refusing with 413 as soon as it exceeds ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading anything; a body
    without one is counted chunk by chunk as it arrives, so it is never buffered whole.
    """
    declared = content_length(headers)
    if declared is not None:
        if declared > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
        return await proto()  # the server enforces the declared length
    chunks: list[bytes] = []
    size = 0
    async for chunk in proto:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def respond_json(
    proto: HTTPProtocol,
    status: int,
    body: Any,
    headers: list[tuple[str, str]] | None = None,
) -> None:
    proto.response_bytes(status, [("content-type", JSON), *(headers or ())], orjson.dumps(body))


def respond_error(proto: HTTPProtocol, error: BrokerError, *, retry_after: int) -> None:
    """Answer ``{"error_code", "message"}`` with the error's status (``Retry-After`` on 503)."""
    extra = [("retry-after", str(retry_after))] if error.retryable else None
    respond_json(proto, error.status, error.to_dict(), extra)
