"""Small raw-ASGI helpers for the hot paths: headers, bounded body reads, JSON answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from broker.errors import BadRequest, BrokerError, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientDisconnected(Exception):
    """The client went away before the request body was complete."""


def request_headers(scope: Scope) -> dict[str, str]:
    """Request headers as ``{lower-case name: value}`` (the last of repeated names wins)."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("Content-Length is not a non-negative integer")
    return int(value)


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body, refusing with 413 as soon as it exceeds ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading anything; a
    body without one is counted as it arrives, so an oversized body is never buffered whole.
    """
    declared = content_length(headers)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        if chunk:
            chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives, chunk by chunk."""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        more = message.get("more_body", False)


async def send_json(
    send: Send, status: int, body: Any, *, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*JSON_HEADERS, *(headers or ())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, error: BrokerError, *, retry_after: int = 1) -> None:
    """Answer ``{"error_code", "message"}`` with the error's status (``Retry-After`` on 503)."""
    extra = [(b"retry-after", str(retry_after).encode())] if error.retryable else None
    await send_json(send, error.status, error.to_dict(), headers=extra)
