"""Serve an ASGI application (the FastAPI part of the API) from the RSGI entry point.

Only the non-hot routes come through here: health, version, the OpenAPI document and, as
they land, the registry APIs. Request bodies are bounded like everywhere else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from broker.http._rsgi import HTTPProtocol, Scope, StreamTransport, read_body

ASGIMessage = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[ASGIMessage]],
        Callable[[ASGIMessage], Awaitable[None]],
    ],
    Awaitable[None],
]


def _address(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    return (host.strip("[]"), int(port)) if sep and port.isascii() and port.isdigit() else None


async def call_asgi(app: ASGIApp, scope: Scope, proto: HTTPProtocol, *, body_limit: int) -> None:
    """Run one HTTP request through ``app`` and write its response to ``proto``."""
    headers = scope.headers
    asgi_scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "2" if scope.http_version.startswith("2") else "1.1",
        "method": scope.method,
        "scheme": scope.scheme,
        "path": scope.path,
        "raw_path": scope.path.encode(),
        # granian hands over text it decoded as UTF-8: back to those bytes (latin-1 raised on
        # a raw '€' in a query or header, a 500 on every FastAPI route)
        "query_string": scope.query_string.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": _address(scope.client),
        "server": _address(scope.server),
    }
    # Read before the app runs: refused inside receive() (413, 408, a body cut short), the
    # error would reach FastAPI's body parsing, which answers its own 400 for any exception
    # (on the schema registry, with a text error code where its clients expect a number).
    body = await read_body(proto, headers, body_limit)
    received = False

    async def receive() -> ASGIMessage:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await proto.client_disconnect()
        return {"type": "http.disconnect"}

    status = 500
    response_headers: list[tuple[str, str]] = []
    parts: list[bytes] = []
    transport: StreamTransport | None = None

    async def send(message: ASGIMessage) -> None:
        nonlocal status, response_headers, transport
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
            ]
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if message.get("more_body", False):
                if transport is None:
                    transport = proto.response_stream(status, response_headers)
                if chunk:
                    await transport.send_bytes(chunk)
            elif transport is not None:
                if chunk:
                    await transport.send_bytes(chunk)
            else:
                parts.append(chunk)
                proto.response_bytes(status, response_headers, b"".join(parts))

    await app(asgi_scope, receive, send)
