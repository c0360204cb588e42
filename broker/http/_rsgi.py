"""Small helpers over granian's RSGI protocol for the hot paths.

The ingress is an RSGI application: on the same granian build, a trivial RSGI handler
answers about 3.5x the requests per second of the equivalent ASGI one (35k vs 10k/s over
h2c on this 2-core machine, BENCHMARKS.md), because RSGI hands the body and the response to
Rust in one call instead of a message round trip per ASGI ``receive``/``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from granian._granian import RSGIProtocolClosed, RSGIProtocolError

from broker.errors import BadRequest, BrokerError, PayloadTooLarge, RequestTimeout
from broker.settings import get_settings

JSON = "application/json"
NDJSON = "application/x-ndjson"


class Headers(Protocol):
    """granian's ``RSGIHeaders``: ``len`` and ``keys`` count each name once; ``values``,
    ``items``, ``get`` and ``get_all`` leave out every value that is not visible ASCII."""

    def __contains__(self, key: str) -> bool: ...
    def __len__(self) -> int: ...
    def get(self, key: str, default: Any = None) -> Any: ...
    def get_all(self, key: str) -> list[str]: ...
    def keys(self) -> list[str]: ...
    def values(self) -> list[str]: ...
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


#: The request headers the broker acts on (publish, route, auth, registry, replay). One of
#: them granian cannot read is refused; any other is left out, as granian leaves it out.
READ_HEADERS = frozenset(
    {
        "accept",
        "authorization",
        "content-length",
        "content-type",
        "expected-last-subject-sequence",
        "idempotency-key",
        "if-match",
        "last-event-id",
        "schema-id",
        "traceparent",
        "tracestate",
        "x-api-key",
        "x-env",
    }
)
#: Name prefixes the broker reads every header of: CloudEvents attributes, ``Broker-Tenant``
#: and the routing headers.
READ_HEADER_PREFIXES = ("ce-", "broker-")


def check_headers(headers: Headers) -> None:
    """Refuse a request whose header the broker reads has a value granian cannot read
    (``400 bad_request``, naming it), before anything reads it.

    granian hands a header value to Python only when it is visible ASCII (space and tab
    included): one with another byte (UTF-8 ``\u00e9``, a full-width digit) is listed by
    ``keys()``, but ``get()`` answers ``None`` and ``items()`` leaves it out, so an
    ``Idempotency-Key`` or a ``Broker-Tenant`` would silently count as absent. As many
    readable values as names, the common case (one value per name), costs a length
    comparison (about 0.25 us); fewer or more (a repeated name) looks at every name. Not
    seen, as granian keeps no trace of them: an unreadable value behind a readable one of
    the same name (``get()`` answers the readable one), and, with a repeated name, a name
    with no readable value that makes the counts agree by chance.
    """
    if len(headers.values()) == len(headers):
        return
    for name in headers.keys():  # noqa: SIM118 (granian's headers, not a dict)
        if headers.get(name) is None and (
            name in READ_HEADERS or name.startswith(READ_HEADER_PREFIXES)
        ):
            raise BadRequest(
                f"header {name[:100]!r} has a value that is not visible ASCII; "
                "send it percent-encoded or as ASCII"
            )


def content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise BadRequest("Content-Length is not a non-negative integer")
    return int(value)


async def read_body(
    proto: HTTPProtocol, headers: Headers, limit: int, *, timeout: float | None = None
) -> bytes:
    """The whole request body, refusing with 413 as soon as it exceeds ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading anything; a body
    without one is counted chunk by chunk as it arrives, so it is never buffered whole. A body
    that has not arrived whole within ``timeout`` seconds (default
    ``BROKER_BODY_READ_TIMEOUT``) is refused with 408: granian has no body read timeout of
    its own, and a slow client would otherwise hold its stream and buffers for ever.
    """
    declared = content_length(headers)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    seconds = get_settings().body_read_timeout if timeout is None else timeout
    task = _deadlines.start(seconds)
    try:
        if declared is not None:
            try:
                body = await proto()
            except RSGIProtocolClosed:  # what granian raises for a body that fails
                body = None
            # granian enforces the declared length over HTTP/1.1 only: an HTTP/2 stream the
            # client resets with NO_ERROR in the middle of its body is handed over as a whole
            # body of what had arrived, which was stored as if it were the message sent.
            if body is None or len(body) != declared:
                raise BadRequest(
                    f"the request body ended before its Content-Length of {declared} bytes"
                )
            return body
        return await _read_counted(proto, limit, chunked="transfer-encoding" in headers)
    except asyncio.CancelledError:
        if not _deadlines.expired(task):
            raise
        raise RequestTimeout(f"request body not received within {seconds:g} s") from None
    finally:
        _deadlines.stop(task)


class Vanished:
    """Whether the client of ``proto`` is gone, asked on each empty chunk of its body.

    granian hands the body of a connection closed in its middle as empty chunks, for ever:
    a read that only counted them (or waited for the next) looped until its deadline, a
    core busy for each such client. Only the client's disconnect tells the two apart; it is
    asked for at the first empty chunk (a body that ends with one, as HTTP/2 allows, pays a
    future and nothing more), and told at a later one. :meth:`close` once the read ends."""

    __slots__ = ("_gone", "_proto")

    def __init__(self, proto: HTTPProtocol) -> None:
        self._proto = proto
        self._gone: asyncio.Future[None] | None = None

    def __call__(self) -> bool:
        if self._gone is None:
            self._gone = asyncio.ensure_future(self._proto.client_disconnect())
            self._gone.add_done_callback(_retrieved)
            return False
        return self._gone.done()

    def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()


def _retrieved(future: asyncio.Future[None]) -> None:
    """Read a finished future's exception, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


#: The largest unread body an answer given before reading it waits for: :func:`discard_body`.
DISCARDED_BODY_BYTES = 4 * 1024 * 1024
#: The same for a request refused its credentials: whoever sent it is no one the broker knows.
DISCARDED_UNKNOWN_BYTES = 64 * 1024
#: How long it waits for such a body.
DISCARD_SECONDS = 5.0


async def discard_body(
    proto: HTTPProtocol, headers: Headers, limit: int = DISCARDED_BODY_BYTES
) -> None:
    """Read and drop a request body that no one read, when it is declared and at most
    ``limit`` bytes, before an answer given without it (a refusal of the subject, a key,
    the credentials, or of a declared length over an endpoint's limit).

    Answered with the body unread, the stream ends with the answer and then
    ``RST_STREAM(NO_ERROR)``: correct HTTP/2, which some clients report as a failure
    without showing the answer (curl 7.88, Debian 12's, exits 92 with nothing printed, two
    times in three for a small body). It is read as it arrives and nothing of it is kept.
    Bodies without a ``Content-Length``, over ``limit``, or not there within
    :data:`DISCARD_SECONDS` are left to that reset. A body already read (the error came
    after) raises at once, ignored."""
    try:
        declared = content_length(headers)
    except BadRequest:
        return
    if not declared or declared > limit:
        return
    vanished = Vanished(proto)
    try:
        with contextlib.suppress(RSGIProtocolError, RSGIProtocolClosed, TimeoutError):
            async with asyncio.timeout(DISCARD_SECONDS):
                async for chunk in proto:
                    if not chunk and vanished():
                        return
    finally:
        vanished.close()


class _Deadlines:
    """Body read deadlines, checked by one timer per event loop every ``SWEEP`` seconds.

    ``asyncio.timeout`` arms and cancels a timer per request, which measured several
    microseconds on the hot path; here a request costs two dict operations, and a body is cut
    off between ``timeout`` and ``timeout + SWEEP`` seconds after its read began.
    """

    SWEEP = 0.25

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._overdue: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, seconds: float) -> asyncio.Task[Any]:
        loop = asyncio.get_running_loop()
        # Given the loop, current_task looks it up without asking for it again: on Python 3.11
        # each lookup of the running loop is a getpid() system call.
        task = asyncio.current_task(loop)
        assert task is not None, "read_body runs in a task"
        self._due[task] = loop.time() + seconds
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_later(self.SWEEP, self._sweep)
        return task

    def stop(self, task: asyncio.Task[Any]) -> None:
        self._due.pop(task, None)
        self._overdue.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` was cancelled for its deadline (then the cancel is consumed)."""
        if task in self._overdue:
            self._overdue.discard(task)
            task.uncancel()
            return True
        return False

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for task, due in list(self._due.items()):
            if due <= now:
                del self._due[task]
                self._overdue.add(task)
                task.cancel()
        self._timer = self._loop.call_later(self.SWEEP, self._sweep) if self._due else None


_deadlines = _Deadlines()


async def _read_counted(proto: HTTPProtocol, limit: int, *, chunked: bool) -> bytes:
    """A body without a declared length, counted chunk by chunk.

    granian hands a body that fails as it is read (an HTTP/1.1 chunk of malformed framing,
    a connection closed mid-chunk) as an empty chunk, then the body's end, which is also an
    empty chunk: a ``chunked`` body (HTTP/1.1, where the reader yields no empty data frame
    of its own) that shows more than one is refused, or half a message would be stored as
    if it were whole. Request trailers look the same there, and are refused with it. Over
    HTTP/2 an empty DATA frame may end a whole body, so nothing is concluded from one (a
    stream reset with CANCEL never reaches the handler's end; one reset with NO_ERROR ends
    the body as a complete one, to the server too)."""
    chunks: list[bytes] = []
    size = empties = 0
    vanished = Vanished(proto)
    try:
        async for chunk in proto:
            if not chunk:
                empties += 1
                if vanished():
                    raise BadRequest("the client went away in the middle of the request body")
                continue
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    finally:
        vanished.close()
    if chunked and empties > 1:
        raise BadRequest(
            "the request body was cut short or its chunked framing is malformed "
            "(request trailers are not taken either)"
        )
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
    extra = [("retry-after", str(retry_after))] if error.retryable else []
    respond_json(proto, error.status, error.to_dict(), [*extra, *error.headers])
