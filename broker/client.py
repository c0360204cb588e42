"""The Python client: ``BrokerClient`` (async) and ``SyncBrokerClient``.

One HTTP/2 connection is multiplexed across calls. Publishes are safe to retry by
construction: each logical publish gets an idempotency key (generated unless given) that
every retry reuses, so a retried publish never stores a second copy. Retries back off
exponentially with full jitter on 429, 503 and connection errors, honouring ``Retry-After``;
a connection the broker shuts down (HTTP/2 GOAWAY, as it does when it stops) is one.
``total_timeout`` (none by default) bounds a request's tries and the waits between them.
An agent put or delete without ``if_match`` is the one write that is not safe to repeat: it
is retried only while it cannot have reached the broker (see :meth:`BrokerClient._request`).
Errors come back as the server's :mod:`broker.errors` classes, chosen by ``error_code``.
Subjects, names and versions go into the URL path percent-encoded, one segment each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import random
import re
import ssl
import struct
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlencode

import h2.exceptions
import httpx
import orjson

from broker import _h2client, b64
from broker._h2stream import ConnectionLost, DuplexRequest
from broker.envelope import (
    H_STREAM_FIRST_SEQ,
    H_STREAM_FIRST_TIME,
    H_STREAM_LAST_SEQ,
    read_number,
)
from broker.errors import (
    BadRequest,
    BrokerError,
    DeadlineExceeded,
    RequestTimeout,
    StreamFull,
    Unavailable,
    Unprocessable,
    error_class,
)
from broker.publisher import PublishAck
from broker.registry.manifest import AGENT_NAME_PATTERN

__all__ = [
    "AgentChange",
    "BrokerClient",
    "PublishAck",
    "PublishResult",
    "RecordsLost",
    "RetryPolicy",
    "RouteReply",
    "RouteResult",
    "StoredMessage",
    "SyncBrokerClient",
    "TotalTimeoutExceeded",
]

T = TypeVar("T")
#: Where a replay says what it found gone when its caller passed no ``on_lost``: the
#: standard library's logging, which an application routes as it likes (and which, left
#: unconfigured, writes warnings to stderr, never among records written to stdout).
_log = logging.getLogger(__name__)
_RETRYABLE_STATUS = frozenset({429, 503})
#: What a proxy answers when the broker behind it does not (bad gateway, gateway timeout):
#: without the broker's error code, retried as a 503 is (a repeatable request only).
_GATEWAY_STATUS = frozenset({502, 504})
#: Transport errors raised before a request was sent: no connection could be had.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: A connection that failed or was shut down. TLS 1.3 servers refuse a client certificate
#: after the handshake: the alert comes as a bare ssl.SSLError on the first read. A stopping
#: broker sends GOAWAY and then a PING, which h2 refuses (it takes the GOAWAY for the end of
#: the connection); while a response body is read, h2's ProtocolError reaches us unwrapped.
CONNECTION_FAILED = (httpx.TransportError, ssl.SSLError, h2.exceptions.ProtocolError)
#: Where the broker ends a replay answer before its ``limit`` (``MAX_RESPONSE_BYTES`` of
#: ``broker.http.replay``, which the client does not import).
_ANSWER_BYTES = 16 * 1024 * 1024
#: The 503 of a write whose outcome the broker does not know (it may be stored).
_OUTCOME_UNKNOWN = frozenset({"publish_timeout"})
_AGENT_NAME = re.compile(AGENT_NAME_PATTERN)
#: A header name: an HTTP token (RFC 9110).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A header value the broker can read: visible ASCII, space and tab. Its HTTP server hands
#: nothing else on (``broker.http._rsgi.check_headers``), and httpx sends text as ASCII only.
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")

_h2client.install()  # larger HTTP/2 frames, a cheaper frame text: see the module


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry (full-jitter exponential backoff)."""

    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay * 4)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True)
class PublishResult:
    """One record's outcome in a batch: an ack or an error."""

    ack: PublishAck | None = None
    error: BrokerError | None = None

    @property
    def ok(self) -> bool:
        return self.ack is not None


@dataclass(frozen=True)
class AgentChange:
    """What a registry command did; ``seq`` is the version to send back as ``if_match``."""

    seq: int
    changed: bool
    event: str | None
    agent: dict[str, Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StoredMessage:
    """A message as stored: where, when, headers and the payload bytes as sent."""

    stream: str
    seq: int
    subject: str
    time: datetime | None
    headers: dict[str, str]
    payload: bytes
    value: Any = None
    decode_error: str | None = None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> StoredMessage:
        return cls(
            stream=item["stream"],
            seq=item["seq"],
            subject=item["subject"],
            time=datetime.fromisoformat(item["time"]) if item.get("time") else None,
            headers=item.get("headers") or {},
            payload=b64.decode(item["payload_base64"]),
            value=item.get("value"),
            decode_error=item.get("decode_error"),
        )


class TotalTimeoutExceeded(DeadlineExceeded):
    """The client's ``total_timeout`` passed while a try was still unanswered: the client
    gave up, and the request may or may not have been done (sent again with the same
    ``key=``, a publish or route is stored once). A :class:`DeadlineExceeded`, so code that
    catches that catches this too; it is not the broker's own 504, which says an agent was
    asked and did not reply in time."""

    error_code = "client_total_timeout"


@dataclass(frozen=True)
class RecordsLost:
    """What a replay found gone: it asked to read ``stream`` from ``start_seq`` (the
    ``start_seq`` given, 1 for a replay from the start, or where a next page or a resume
    began), or from the time ``since`` (``start_seq`` is ``None`` then), and the stream's
    first stored sequence was ``first_seq``. Records before ``first_seq`` (from
    ``start_seq`` on; from ``since``, some stored at or after it) aged out (max age, max
    messages) or were purged, and any of them may have been in the replay's range: a
    filtered read cannot tell, as other subjects' and tenants' messages take sequences too
    (which is also why gaps between the records read are no sign of loss)."""

    stream: str
    start_seq: int | None
    first_seq: int
    since: datetime | None = None

    def __str__(self) -> str:
        start = f"seq {self.start_seq}" if self.since is None else self.since.isoformat()
        return (
            f"replay of {self.stream} from {start}: records before seq "
            f"{self.first_seq} aged out or were purged (some may have been in range)"
        )


def _stream_first_time(response: httpx.Response) -> datetime | None:
    """``Broker-Stream-First-Time``: the time at or before which every record before the
    stream's first sequence was stored; ``None`` when absent or no time with an offset."""
    value = response.headers.get(H_STREAM_FIRST_TIME, "")
    try:
        moment = datetime.fromisoformat(value) if value.isascii() else None
    except ValueError:
        return None
    return moment if moment is not None and moment.utcoffset() is not None else None


def _say_lost(
    response: httpx.Response,
    stream: str,
    start: int | None,
    since: datetime | None,
    reported: int,
    on_lost: Callable[[RecordsLost], None] | None,
) -> int:
    """Tell ``on_lost`` (else the log) of the records a replay answer to a read from
    ``start`` (else from ``since``, else from the stream's start: seq 1) says are gone:
    those before the stream's first sequence (``Broker-Stream-First-Seq``) when ``start``
    is below it, or, from ``since``, when some of them were stored at or after it (it is
    not after ``Broker-Stream-First-Time``), unless a first sequence as high (``reported``)
    was told already. Nothing without the headers (a broker from before them). Returns the
    highest first sequence told."""
    first_seq = read_number(response.headers.get(H_STREAM_FIRST_SEQ))
    if first_seq is None or first_seq <= reported:
        return reported
    if start is not None or since is None:
        start = 1 if start is None else start  # no start: the whole stream, from seq 1
        if start >= first_seq:
            return reported
        lost = RecordsLost(stream, start, first_seq)
    else:
        # Both times are to the microsecond (records' `time` is cut to it): `since` is at
        # or before the first record's time to the nanosecond exactly when it is so here.
        stored = _stream_first_time(response)
        if first_seq <= 1 or stored is None or since.utcoffset() is None or since > stored:
            return reported
        lost = RecordsLost(stream, None, first_seq, since)
    if on_lost is None:
        _log.warning("%s", lost)
    else:
        on_lost(lost)
    return first_seq


@functools.cache
def _every_error_class() -> None:
    """Import the modules that define error classes a server answer can name, so that
    :func:`error_class` knows them all: which class a caller got used to depend on what the
    program happened to have imported (a stale ``If-Match`` was a plain ``Conflict`` in a
    script that never imported the registry)."""
    import broker.registry.commands
    import broker.registry.manifest
    import broker.routing.features
    import broker.routing.policy  # noqa: F401


def _error(response: httpx.Response) -> BrokerError:
    try:
        body = response.json()
        raw, message = body["error_code"], str(body["message"])
    except (ValueError, KeyError, TypeError):
        raw, message = "", f"HTTP {response.status_code}: {response.text[:200]}"
    if raw == "" and response.status_code in _GATEWAY_STATUS:
        # A proxy's or load balancer's answer: the broker's never came (its own 502 and 504
        # say agent_error, deadline_exceeded), and the request may or may not have been done.
        return Unavailable(
            f"a gateway between answered for the broker ({message}): the request may or "
            "may not have been done"
        )
    # The schema registry answers Confluent's integer codes (40401 ...); the rest strings.
    code: str | int = raw if isinstance(raw, int) else str(raw)
    _every_error_class()
    error = error_class(code, response.status_code)(message)
    if isinstance(code, str) and code and code != error.error_code:
        error.error_code = code  # type: ignore[misc]  # keep the server's code
    return error


def _not_the_broker(where: str, why: str) -> Unavailable:
    """A 2xx the client cannot read: a proxy's login page, or a URL that points at another
    server. Unavailable (not a decoding error): the broker's answer never came."""
    return Unavailable(
        f"the answer from {where} is not the broker's: {why}; is the URL the broker's, "
        "not a proxy's or another server's?"
    )


def _answered(response: httpx.Response) -> str:
    kind = response.headers.get("content-type") or "no content type"
    return f"HTTP {response.status_code} ({kind})"


def _body(response: httpx.Response) -> Any:
    """The JSON a 2xx answer carries; :func:`_not_the_broker` when it carries none."""
    try:
        return response.json()
    except ValueError:  # not JSON, or not UTF-8
        why = f"{_answered(response)} that is not JSON: {response.text[:80]!r}"
        raise _not_the_broker(str(response.url), why) from None


def broker_document(response: httpx.Response, *keys: str) -> dict[str, Any]:
    """The JSON object a broker's 2xx answer carries, with ``keys`` (what the caller reads)
    in it. Anything else (a proxy's redirect or login page, ``--url`` pointing at another
    server) is :class:`Unavailable` naming the URL: the broker's answer never came. The SDK
    and the CLI commands read every answer through this one check."""
    if 300 <= response.status_code < 400:
        where = response.headers.get("location") or "nowhere"
        why = f"{_answered(response)}, a redirect to {where[:200]}"
        raise _not_the_broker(str(response.url), why)
    body = _body(response)
    if not isinstance(body, dict):
        why = f"{_answered(response)} with a JSON {type(body).__name__}, not an object"
        raise _not_the_broker(str(response.url), why)
    if missing := [key for key in keys if key not in body]:
        why = f"{_answered(response)} without {', '.join(missing)}"
        raise _not_the_broker(str(response.url), why)
    return body


def _result(item: Any, where: str) -> PublishResult:
    """One record's outcome as the broker answers it (from ``where``, to say so if not)."""
    _every_error_class()
    try:
        if "error_code" in item:
            return PublishResult(error=error_class(item["error_code"], 0)(item["message"]))
        return PublishResult(PublishAck(item["stream"], item["seq"], item["duplicate"]))
    except (KeyError, TypeError):
        raise _not_the_broker(where, f"a record's result {str(item)[:80]!r}") from None


def next_page(document: Mapping[str, Any], start: int) -> int | None:
    """Where the page after a history page that began at ``start`` begins (its
    ``next_from_seq``), or ``None`` at the end: a next page must start past this one, or a
    reader could go round for ever."""
    after = document.get("next_from_seq")
    return after if isinstance(after, int) and after > start else None


def next_after(document: Mapping[str, Any], after: str | None) -> str | None:
    """The name the page after an agent list page read from ``after`` follows (its
    ``next_after``), or ``None`` at the end: as with :func:`next_page`, it must be past
    ``after`` (names compare as the broker sorts them), or a reader could go round for ever."""
    name = document.get("next_after")
    return name if isinstance(name, str) and (after is None or name > after) else None


def _listed(response: httpx.Response, key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``key`` of a 2xx answer's object, a list of objects (else not the broker's answer),
    and the object itself (a page's cursor is read from it too)."""
    document = broker_document(response, key)
    items = document[key]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        why = f"{_answered(response)} whose {key} is not a list of objects"
        raise _not_the_broker(str(response.url), why)
    return items, document


async def _ndjson_lines(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The lines of an NDJSON answer, as bytes, split at ``\\n`` only. Not ``aiter_lines``:
    it splits where ``str.splitlines`` does, inside a record too (a text value holding
    U+2028, U+2029 or NEL, which JSON writes unescaped), and what it counts is characters,
    where the broker ends an answer after ``_ANSWER_BYTES`` bytes."""
    pending: list[bytes] = []  # the start of a line that is not complete yet
    async for chunk in response.aiter_bytes():
        *lines, tail = chunk.split(b"\n")
        if lines:
            if pending:  # else the line is whole already: joined, it was copied once more
                lines[0] = b"".join([*pending, lines[0]])
                pending.clear()
            for line in lines:
                yield line
        if tail:
            pending.append(tail)
    if last := b"".join(pending):
        yield last


def _stored(line: bytes, response: httpx.Response) -> StoredMessage | None:
    """A line of a replay: a message, or ``None`` for the error line of a read that broke
    off after the 200; any other line is :func:`_not_the_broker`."""
    try:
        record = orjson.loads(line)
        if isinstance(record, dict) and "error_code" in record:
            return None
        return StoredMessage.from_json(record)
    except (ValueError, KeyError, TypeError):  # binascii.Error is a ValueError
        why = f"{_answered(response)} with a line {line[:80]!r}"
        raise _not_the_broker(str(response.url), why) from None


def _error_code(response: httpx.Response) -> Any:
    try:
        return response.json().get("error_code")
    except (ValueError, AttributeError):
        return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    return float(value) if value and value.isascii() and value.isdigit() else None


def _failure(e: BaseException, timeout: float) -> str:
    """What a failed try says: httpx's timeouts carry no text (``ReadTimeout('')``), which
    made "cannot reach the broker: " end in nothing, for a broker connected but silent too."""
    if isinstance(e, httpx.TimeoutException):
        return f"no answer within the client's timeout of {timeout} s ({type(e).__name__})"
    return str(e) or type(e).__name__


def _in_time(deadline: float | None, wait: float) -> bool:
    """Whether a try after ``wait`` seconds starts before ``deadline`` (event loop time)."""
    return deadline is None or asyncio.get_running_loop().time() + wait < deadline


def _segment(value: str | int) -> str:
    """``value`` as one URL path segment: percent-encoded, so that a ``?``, ``#``, ``%`` or
    ``/`` in it stays in it (the server decodes it and refuses what it does not accept, e.g.
    ``422 invalid_subject``), and ``.`` or ``..`` is not taken for a dot segment, which
    would send the request to another path."""
    text = quote(str(value), safe="")
    return text.replace(".", "%2E") if text in {".", ".."} else text


def _agent_segment(name: str) -> str:
    """An agent's name as a path segment. Checked here: the server decodes a ``%2F`` before
    it routes, so ``x/history`` would reach another endpoint rather than be refused."""
    if not _AGENT_NAME.fullmatch(name):
        raise Unprocessable(f"agent name {name[:64]!r} must be 1-64 of A-Z a-z 0-9 _ -")
    return name


def _json(value: Any) -> bytes:
    """Compact JSON of ``value``; an integer past 64 bits, which orjson does not write, with
    all its digits (the broker stores it so)."""
    try:
        return orjson.dumps(value)
    except TypeError as e:
        if "Integer exceeds" not in str(e):
            raise
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _payload(payload: bytes | str | Any, content_type: str | None) -> tuple[bytes, str]:
    if isinstance(payload, bytes):
        return payload, content_type or "application/octet-stream"
    if isinstance(payload, str):
        return payload.encode(), content_type or "text/plain; charset=utf-8"
    return _json(payload), content_type or "application/json"


@dataclass(frozen=True)
class RouteResult:
    """Where a routed message was stored and who got it.

    ``agent`` is ``None`` when nobody qualified (the message is in the DLQ; ``decision``
    says why), when the decision did not come in time (``decided`` is ``False``: the
    message is stored and is routed when a router runs), or for a duplicate."""

    stream: str
    seq: int
    duplicate: bool
    decision: dict[str, Any] | None

    @property
    def decided(self) -> bool:
        return self.decision is not None

    @property
    def agent(self) -> str | None:
        return None if self.decision is None else self.decision.get("agent")


@dataclass(frozen=True)
class RouteReply:
    """An agent's reply to a routed request."""

    agent: str
    message_seq: int
    content_type: str
    payload: bytes
    #: The reply stored for an earlier send of the request (a retry after a lost connection).
    duplicate: bool = False

    def text(self) -> str:
        return self.payload.decode()

    def json(self) -> Any:
        return orjson.loads(self.payload)


def _with_callers(
    sent: dict[str, str],
    headers: Mapping[str, str] | None,
    **arguments: str | None,
) -> dict[str, str]:
    """``sent`` (lower-case names) with the caller's ``headers`` over it, names compared
    without case: an ``Idempotency-Key`` the caller passes is the one sent (it went out
    beside the client's own fresh key, which the broker read, so retries were stored again),
    and so is a ``Content-Type``. ``arguments`` name the headers the call's own arguments
    set (``key=`` for ``idempotency-key``...): ``ValueError`` when both say different things.
    Every header is then checked with :func:`_sendable`."""
    for name, value in (headers or {}).items():
        lower = name.lower()
        argument = arguments.get(lower.replace("-", "_"))
        if argument is not None and argument != value:
            raise ValueError(
                f"{name} is given twice, as an argument ({argument!r}) and in headers ({value!r})"
            )
        sent[lower] = value
    return _sendable(sent)


def _sendable(headers: dict[str, str]) -> dict[str, str]:
    """``headers``, or :class:`BadRequest` naming the first one the broker could not read,
    before anything is sent: a name that is not a token, or a text value with a character
    that is not visible ASCII (``é``, a line feed). The broker answers a header it reads
    (``Idempotency-Key``, ``Broker-Tenant``, ``Broker-Intent``...) with such a value so, and
    its HTTP server drops any other unread; httpx, which encodes text as ASCII, raised a bare
    ``UnicodeEncodeError``. The value is not in the message: it may be a credential."""
    for name, value in headers.items():
        if isinstance(name, str) and not _HEADER_NAME.fullmatch(name):
            raise BadRequest(f"header name {name[:100]!r} is not an HTTP token")
        if isinstance(value, str) and not _HEADER_VALUE.fullmatch(value):
            raise BadRequest(
                f"header {name[:100]!r} has a value that is not visible ASCII; "
                "send it percent-encoded or as ASCII"
            )
    return headers


def _route_headers(
    media: str,
    content_type: str | None,
    key: str | None,
    intent: str | None,
    text: str | None,
    embedding: Iterable[float] | None,
    embedding_model: str | None,
    env: str | None,
    headers: Mapping[str, str] | None,
) -> dict[str, str]:
    sent = {"content-type": media, "idempotency-key": key or uuid.uuid4().hex}
    if intent is not None:
        sent["broker-intent"] = intent
    if text is not None:
        sent["broker-text"] = quote(text, safe="")
    if embedding is not None:
        vector = [float(x) for x in embedding]
        packed = struct.pack(f"<{len(vector)}f", *vector)
        sent["broker-embedding"] = b64.encode(packed)
        if embedding_model is not None:
            sent["broker-embedding-model"] = embedding_model
    if env is not None:
        sent["x-env"] = env
    return _with_callers(sent, headers, idempotency_key=key, content_type=content_type, x_env=env)


def credential_headers(api_key: str | None, tenant: str | None = None) -> dict[str, str]:
    """The headers that authenticate a request (see ``docs/tenants.md``)."""
    sent = {"authorization": f"Bearer {api_key}"} if api_key else {}
    if tenant:
        sent["broker-tenant"] = tenant
    return sent


class _RecordSource:
    """The records of :meth:`BrokerClient.publish_stream` as NDJSON lines, across the streams
    it takes: the lines sent and not answered yet, in order (to send again, first, in a new
    stream when the broker ends one as full or the connection is lost; each line keeps its
    idempotency key, so one the broker had stored is not stored again), and a pull from the
    caller's iterator that survives the end of a stream (a stream's sender is cancelled when
    it ends; the pull goes on, shielded, and the next stream takes its record)."""

    def __init__(self, records: AsyncIterable[Mapping[str, Any]]) -> None:
        self._records = aiter(records)
        self._next: asyncio.Future[Mapping[str, Any]] | None = None
        self.unanswered: collections.deque[bytes] = collections.deque()
        self.taken = 0
        self.exhausted = False

    async def _pull(self) -> Mapping[str, Any]:
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._records))
        # Cancelled (the stream ended), the pull goes on and the next stream takes its record,
        # even one that came in the same instant: only a record handed on here is let go.
        record = await asyncio.shield(self._next)
        self._next = None
        return record

    def close(self) -> None:
        """Stop a pull still running (the caller stopped reading the results)."""
        if self._next is not None:
            self._next.cancel()

    async def lines(self, resend: list[bytes]) -> AsyncIterator[bytes]:
        """``resend`` (lines still in :attr:`unanswered`: they stay there until answered, so
        a stream cut while sending them sends them all again), then the records to come."""
        for line in resend:
            yield line
        while not self.exhausted:
            try:
                record = await self._pull()
            except StopAsyncIteration:
                self.exhausted = True
                return
            if not isinstance(record, Mapping):
                raise TypeError(
                    f"record {self.taken + 1} is {type(record).__name__}, not a mapping"
                )
            keyed = {**record, "idempotency_key": record.get("idempotency_key") or uuid.uuid4().hex}
            self.taken += 1
            line = _json(keyed) + b"\n"
            self.unanswered.append(line)
            yield line


class BrokerClient:
    """Async client for one broker. Use ``async with BrokerClient(url) as broker: ...``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        verify: Any = True,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        tenant: str | None = None,
        total_timeout: float | None = None,
    ) -> None:
        """``api_key`` (an API key or a JWT) is sent as a bearer token; ``tenant`` picks one
        of the key's tenants (``Broker-Tenant``), else the key's first tenant is used.

        ``timeout`` bounds each try (connecting, and each read or write of it);
        ``total_timeout``, when given, bounds each request to the broker, all its tries and
        the waits between them together (see :meth:`_request`). A paged read
        (``list_agents``, ``agent_history``) gives each page its own; ``replay`` and
        ``publish_stream``, which last as long as the data they carry, are not bounded by it.
        ``None`` (the default) leaves a call bounded by ``retry.attempts`` tries of at most
        ``timeout`` each: a fixed default would cut calls that are meant to be long (a
        ``request`` waiting for its reply, a large batch on a slow link)."""
        if total_timeout is not None and not total_timeout > 0:
            raise ValueError(f"total_timeout must be positive seconds or None, not {total_timeout}")
        self._total_timeout = total_timeout
        self.retry = retry or RetryPolicy()
        # publish_stream speaks HTTP/2 itself: it needs what httpx is given
        self._stream_headers = _with_callers(credential_headers(api_key, tenant), headers)
        self._verify = verify
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            http2=True,
            http1=base_url.startswith("https"),  # h2c needs prior knowledge; TLS negotiates
            timeout=timeout,
            verify=verify,
            headers=self._stream_headers,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _url(self, path: str) -> str:
        """The absolute URL of ``path`` (``/v1/...``) on the broker, as ``self._http`` sends
        it: under the base URL's own path. (httpx gives a base URL with a path a trailing
        slash: an f-string of it and ``path`` had ``//`` in it.)"""
        return str(self._http.base_url).rstrip("/") + path

    async def _request(
        self,
        method: str,
        path: str,
        *,
        final: frozenset[str] = frozenset(),
        repeatable: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send, retrying 429/503/connection errors; raise the server's error for other 4xx/5xx.

        Reads and writes that carry an idempotency key or an expected version are
        ``repeatable``: the broker answers a repeat of one that was done as it answered the
        first. A write that is not (an agent put or delete without ``if_match``) would be
        misreported after an answer was lost: a repeated put finds its own manifest there
        (``changed=False``), a repeated delete finds no agent (``NotFound``). So it is sent
        again only when it cannot have reached the broker (no connection could be had, or a
        429/503 that is not ``publish_timeout``); otherwise :class:`Unavailable` says that
        its outcome is unknown. Making it conditional instead (read the version, send
        ``If-Match``) would cost a read per call, turn a concurrent change into a conflict
        the caller did not ask for, and still answer a repeat with ``changed=False``.

        With a ``total_timeout``, a retry is made only if its wait (and the server's
        ``Retry-After``, which may be longer than the policy waits) ends before the deadline;
        otherwise the last error is raised at once, as when the attempts run out. A try
        still unanswered at the deadline is given up: :class:`TotalTimeoutExceeded`.
        """
        if not repeatable:
            final = final | _OUTCOME_UNKNOWN
        loop = asyncio.get_running_loop()
        deadline = None if self._total_timeout is None else loop.time() + self._total_timeout
        attempt = 0
        while True:
            window = asyncio.timeout_at(deadline)
            try:
                async with window:
                    response = await self._http.request(method, path, **kwargs)
            except TimeoutError as e:
                if not window.expired():
                    raise
                raise TotalTimeoutExceeded(
                    f"no answer to {method} {path} within the client's total_timeout of "
                    f"{self._total_timeout} s: it may or may not have been done"
                ) from e
            except CONNECTION_FAILED as e:
                if not repeatable and not isinstance(e, _NOT_SENT):
                    raise Unavailable(
                        f"the connection failed after {method} {path} was sent ({e!r}): it may "
                        "or may not have been done, and is not repeated; read it back, or "
                        "pass if_match to have it retried safely"
                    ) from e
                wait = self.retry.delay(attempt, None)
                if attempt + 1 >= self.retry.attempts or not _in_time(deadline, wait):
                    why = _failure(e, self._timeout)
                    raise Unavailable(f"cannot reach the broker: {why}") from e
                await asyncio.sleep(wait)
                attempt += 1
                continue
            if (
                (
                    response.status_code in _RETRYABLE_STATUS
                    or (
                        repeatable
                        and response.status_code in _GATEWAY_STATUS
                        and _error_code(response) is None
                    )
                )
                and attempt + 1 < self.retry.attempts
                and not (final and _error_code(response) in final)
            ):
                retry_after = _retry_after(response)
                wait = self.retry.delay(attempt, retry_after)
                if _in_time(deadline, max(wait, retry_after or 0.0)):
                    await asyncio.sleep(wait)
                    attempt += 1
                    continue
            if response.status_code >= 400 and response.status_code != 207:
                raise _error(response)
            return response

    # --- publishing -------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: bytes | str | Any,
        *,
        content_type: str | None = None,
        key: str | None = None,
        schema_id: int | None = None,
        expected_last_subject_sequence: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> PublishAck:
        """Append one message. ``payload``: bytes as they are, ``str`` as UTF-8 text,
        anything else as JSON. ``key`` defaults to a fresh idempotency key, reused on retry."""
        body, media = _payload(payload, content_type)
        sent = _with_callers(
            {"content-type": media, "idempotency-key": key or uuid.uuid4().hex},
            headers,
            idempotency_key=key,
            content_type=content_type,
        )
        if schema_id is not None:
            sent["schema-id"] = str(schema_id)
        if expected_last_subject_sequence is not None:
            sent["expected-last-subject-sequence"] = str(expected_last_subject_sequence)
        path = f"/v1/publish/{_segment(subject)}"
        response = await self._request("POST", path, content=body, headers=sent)
        data = broker_document(response, "stream", "seq", "duplicate")
        return PublishAck(data["stream"], data["seq"], data["duplicate"])

    async def route(
        self,
        subject: str,
        payload: bytes | str | Any,
        *,
        content_type: str | None = None,
        key: str | None = None,
        intent: str | None = None,
        text: str | None = None,
        embedding: Iterable[float] | None = None,
        embedding_model: str | None = None,
        env: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RouteResult:
        """Append a message and have a router choose its agent; returns the decision.

        ``intent`` names the wanted capability action, ``text`` is what to match by meaning
        when the payload is not text (a caption, an instruction), ``embedding`` your own
        query vector (``embedding_model``: the model that made it, which the router checks
        is its own), ``env="canary"`` routes to canary agents. A retry reuses ``key``:
        the message is stored and routed once."""
        body, media = _payload(payload, content_type)
        sent = _route_headers(
            media, content_type, key, intent, text, embedding, embedding_model, env, headers
        )
        path = f"/v1/route/{_segment(subject)}"
        response = await self._request("POST", path, content=body, headers=sent)
        data = broker_document(response, "stream", "seq", "duplicate")
        return RouteResult(data["stream"], data["seq"], data["duplicate"], data.get("decision"))

    async def request(
        self,
        subject: str,
        payload: bytes | str | Any,
        *,
        timeout: float = 30.0,
        content_type: str | None = None,
        key: str | None = None,
        intent: str | None = None,
        text: str | None = None,
        embedding: Iterable[float] | None = None,
        embedding_model: str | None = None,
        env: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RouteReply:
        """Route a message and wait up to ``timeout`` seconds for the agent's reply.

        Raises :class:`~broker.errors.NoRoute` when no agent qualifies,
        :class:`~broker.errors.AgentFailed` when the agents tried failed, and
        :class:`~broker.errors.DeadlineExceeded` when no reply came in time (the agent is
        told to stop at the same deadline). Retried after a lost connection with the same
        idempotency key: the broker does not route the message again, and answers with the
        reply stored for it, or the one still to come."""
        body, media = _payload(payload, content_type)
        sent = _route_headers(
            media, content_type, key, intent, text, embedding, embedding_model, env, headers
        )
        response = await self._request(
            "POST",
            f"/v1/route/{_segment(subject)}",
            final=frozenset({"no_route"}),
            content=body,
            headers=sent,
            params={"wait": "true", "timeout": str(timeout)},
            timeout=timeout + 10.0,
        )
        seq = response.headers.get("broker-message-seq", "")
        if response.status_code != 200 or not (seq.isascii() and seq.isdigit()):
            # a redirect, or a page without the reply's headers: not the broker's answer
            why = f"{_answered(response)} without a broker-message-seq header"
            raise _not_the_broker(str(response.url), why)
        return RouteReply(
            agent=response.headers.get("broker-agent", ""),
            message_seq=int(seq),
            content_type=response.headers.get("content-type", "application/octet-stream"),
            payload=response.content,
            duplicate=response.headers.get("broker-duplicate") == "true",
        )

    async def publish_batch(
        self, records: Iterable[Mapping[str, Any]], *, subject: str | None = None
    ) -> list[PublishResult]:
        """Append many records in one request (see ``POST /v1/publish``); one result each.

        Records without an ``idempotency_key`` get one, so retrying the batch is safe.
        """
        keyed = [
            {**record, "idempotency_key": record.get("idempotency_key") or uuid.uuid4().hex}
            for record in records
        ]
        response = await self._request(
            "POST",
            "/v1/publish",
            content=b"\n".join(_json(r) for r in keyed),
            headers={"content-type": "application/x-ndjson"},
            params={"subject": subject} if subject else None,
        )
        results = broker_document(response, "results")["results"]
        if not isinstance(results, list):
            raise _not_the_broker(str(response.url), f"results {str(results)[:80]!r}")
        return [_result(item, str(response.url)) for item in results]

    async def publish_stream(
        self, records: AsyncIterable[Mapping[str, Any]], *, subject: str | None = None
    ) -> AsyncIterator[PublishResult]:
        """Stream records over one full-duplex HTTP/2 request; yield each record's result,
        in order, as soon as it is acked, while later records are still being sent.

        The broker ends a stream after ten times ``BROKER_MAX_BATCH_RECORDS`` records
        (``stream_full``); the records from there on, those already sent included, go on in
        a new stream, and the results keep coming in order. A connection that cannot be had,
        is lost, or is shut down by the broker (HTTP/2 GOAWAY, as when it stops) is retried
        like a publish (see :class:`RetryPolicy`): the records not answered go again, first,
        in a new stream, each with the idempotency key it was sent with (one without gets a
        key when it is first sent), so none is stored twice; a record the broker had
        stored answers its first sequence as a duplicate. When the attempts run out, the
        results yielded so far are the records acked, and :class:`Unavailable` says how
        many were sent: give each record an ``idempotency_key`` if you may re-send it
        yourself (one without gets a fresh key in a new call, so a re-sent record the
        broker had stored is stored again). A record that is not a mapping, or an error in
        ``records``, ends the stream with that error. A source that yields nothing for the
        broker's ``BROKER_STREAM_IDLE_TIMEOUT`` (300 s) has its stream ended by the broker:
        :class:`Unavailable`, after the results of every record sent. The client's
        credentials, TLS settings and timeout apply: the timeout bounds connecting and each
        wait for an ack while records are unanswered; a broker that does not answer in
        time is :class:`Unavailable`, not retried.
        """
        answered = 0
        attempt = 0  # connections lost in a row with no answer in between
        source = _RecordSource(records)
        try:
            while True:
                full = False
                answered_before = answered
                try:
                    async with contextlib.aclosing(
                        self._one_publish_stream(source, subject)
                    ) as answers:
                        async for answer in answers:
                            if answer.get("error_code") == StreamFull.error_code:
                                full = True  # the broker's last line: this record on was not read
                                break
                            answered += 1
                            yield _result(answer, self._url("/v1/publish"))
                except ConnectionLost:
                    if source.exhausted and not source.unanswered:
                        break  # every record was answered: nothing is left to send
                    attempt = 0 if answered > answered_before else attempt
                    if attempt + 1 >= self.retry.attempts:
                        raise
                    await asyncio.sleep(self.retry.delay(attempt, None))
                    attempt += 1
                    continue
                if not full:
                    break
        except Unavailable as e:
            raise Unavailable(
                f"{e}; {answered} of the {source.taken} records sent were acked"
            ) from e
        finally:
            source.close()
        if source.unanswered or not source.exhausted:
            raise Unavailable(
                f"the stream ended with {answered} answers for {source.taken} records"
            )

    async def _one_publish_stream(
        self, source: _RecordSource, subject: str | None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """One full-duplex request of :meth:`publish_stream`: sends the lines ``source`` has
        not had answered (an earlier stream's), then what it yields, and yields each answer
        line as it arrives."""
        resend = list(source.unanswered)
        query = f"?{urlencode({'subject': subject})}" if subject else ""
        request = DuplexRequest(
            self._url(f"/v1/publish{query}"),
            {
                **self._stream_headers,
                "content-type": "application/x-ndjson",
                "accept": "application/x-ndjson",
            },
            ssl_context=httpx.create_ssl_context(verify=self._verify),
            connect_timeout=self._timeout,
        )
        buffer = b""
        chunks = request.exchange(source.lines(resend))
        try:
            while True:
                next_chunk = asyncio.ensure_future(anext(chunks))
                while not (await asyncio.wait({next_chunk}, timeout=self._timeout))[0]:
                    if source.unanswered or source.exhausted:  # an answer was due: it is gone
                        next_chunk.cancel()
                        await asyncio.wait({next_chunk})  # the stream closes itself
                        raise Unavailable(f"no answer from the broker in {self._timeout} s")
                try:
                    chunk = next_chunk.result()
                except StopAsyncIteration:
                    break
                buffer += chunk
                if request.status is not None and request.status != 200:
                    continue
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    if line.strip():
                        try:
                            answer = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            answer = None
                        if not isinstance(answer, dict):
                            where = self._url("/v1/publish")
                            raise _not_the_broker(where, f"a line {line[:80]!r}")
                        if answer.get("error_code") == RequestTimeout.error_code:
                            # the broker's last line: it heard nothing for its idle time
                            raise Unavailable(f"the broker ended the stream: {answer['message']}")
                        if answer.get("error_code") != StreamFull.error_code and source.unanswered:
                            source.unanswered.popleft()
                        yield answer
        finally:
            await chunks.aclose()
        if request.status != 200:
            raise _error(httpx.Response(request.status or 502, content=buffer))

    # --- replay ---------------------------------------------------------------------------

    async def replay(
        self,
        stream: str = "MESSAGES",
        *,
        start_seq: int | None = None,
        since: datetime | None = None,
        subject: str | None = None,
        decode: bool = False,
        page: int = 1000,
        on_lost: Callable[[RecordsLost], None] | None = None,
    ) -> AsyncIterator[StoredMessage]:
        """Every message of ``stream`` (in your namespace) from a sequence or a time to the
        end the stream had when the replay began (messages appended meanwhile are left out,
        so a replay of a stream growing faster than it reads still ends), page by page. A
        dropped connection resumes from the last sequence received: nothing is skipped and
        nothing repeated.

        What the stream no longer holds cannot be read: when a page (the first one, from
        ``start_seq``; a next one; a resume) starts below the stream's first sequence, the
        records before it aged out or were purged, and :class:`RecordsLost` says so, once
        for each first sequence found, before that page's records. ``on_lost`` is called
        with it; without, it is logged as a warning (logger ``broker.client``). To stop at
        such a loss, raise from ``on_lost``: the exception ends the replay. A replay from
        the start (neither ``start_seq`` nor ``since``) starts at seq 1: any record gone is
        reported. One from ``since`` reports the records gone when some of them may have
        been stored at or after it: ``since`` is not after the stream's first record's time
        (its last's, when none is left)."""
        params: dict[str, str] = {"limit": str(page), "decode": "json" if decode else "none"}
        if subject:
            params["subject"] = subject
        if since is not None and start_seq is None:
            params["start_time"] = since.isoformat()
        next_seq = start_seq
        end: int | None = None  # the stream's last seq when the first page was read
        # reported: the highest first seq said to be lost (a page tried again says it once)
        attempt = reported = 0
        while True:
            if next_seq is not None:
                params.pop("start_time", None)
                params["start_seq"] = str(next_seq)
            received = size = 0
            try:
                async with self._http.stream(
                    "GET", f"/v1/streams/{_segment(stream)}/messages", params=params
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        if response.status_code not in _RETRYABLE_STATUS:
                            raise _error(response)
                        raise httpx.TransportError(f"HTTP {response.status_code}")
                    if response.status_code != 200:  # a redirect to a login page ...
                        why = _answered(response)
                        raise _not_the_broker(str(response.url), why)
                    if end is None and (last := response.headers.get(H_STREAM_LAST_SEQ)):
                        end = read_number(last)
                    reported = _say_lost(response, stream, next_seq, since, reported, on_lost)
                    lines = contextlib.aclosing(_ndjson_lines(response))
                    async with lines as records:
                        async for line in records:
                            if line.strip():
                                message = _stored(line, response)
                                if message is None:  # the read broke off after the 200
                                    why = orjson.loads(line).get("message")
                                    raise httpx.TransportError(str(why or line[:200]))
                                if end is not None and message.seq > end:
                                    return  # appended after the replay began
                                next_seq = message.seq + 1
                                received += 1
                                size += len(line) + 1
                                attempt = 0
                                yield message
            except CONNECTION_FAILED as e:
                if attempt + 1 >= self.retry.attempts:
                    where = (
                        "cannot reach the broker"
                        if next_seq is None or next_seq == start_seq  # nothing read yet
                        else f"replay interrupted before seq {next_seq}"
                    )
                    raise Unavailable(f"{where}: {_failure(e, self._timeout)}") from e
                await asyncio.sleep(self.retry.delay(attempt, None))
                attempt += 1
                continue
            # An answer also ends once it holds _ANSWER_BYTES: fewer than `page` records
            # under that is the end, as are an empty answer and the stream's end seen.
            short = received < page and size < _ANSWER_BYTES
            if (
                received == 0
                or short
                or (end is not None and next_seq is not None and next_seq > end)
            ):
                return

    # --- agent registry ---------------------------------------------------------------

    async def put_agent(
        self, manifest: Mapping[str, Any] | Any, *, if_match: int | None = None
    ) -> AgentChange:
        """Register or update an agent (a manifest dict or an ``AgentManifest``).

        With ``if_match`` (the ``seq`` last read) it applies only over that version, and is
        retried like a publish: a repeat whose first try was done answers ``changed=False``
        with the agent's new ``seq``. Without, it is not repeated once it may have reached
        the broker (:class:`Unavailable`: read the agent to see whether it changed)."""
        body = (
            manifest.model_dump(mode="json") if hasattr(manifest, "model_dump") else dict(manifest)
        )
        headers = {"content-type": "application/json"}
        if if_match is not None:
            headers["if-match"] = f'"{if_match}"'
        response = await self._request(
            "PUT",
            f"/v1/agents/{_agent_segment(str(body.get('name', '')))}",
            repeatable=if_match is not None,
            content=orjson.dumps(body),
            headers=headers,
        )
        data = broker_document(response, "seq", "changed", "event", "agent")
        return AgentChange(data["seq"], data["changed"], data["event"], data["agent"])

    async def get_agent(self, name: str) -> dict[str, Any]:
        path = f"/v1/agents/{_agent_segment(name)}"
        return broker_document(await self._request("GET", path), "name", "seq", "manifest")

    async def list_agents(self, *, as_of: int | str | None = None) -> list[dict[str, Any]]:
        """Every agent by name, now or as they were at a stream sequence or RFC 3339 time
        (read a page at a time). With ``as_of``, the pages after the first are read at the
        ``seq`` the first answered, so all are of one registry; without, each page is the
        live registry when read (an agent changed meanwhile may show either way)."""
        params: dict[str, str] = {} if as_of is None else {"as_of": str(as_of)}
        agents: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            response = await self._request("GET", "/v1/agents", params=params)
            listed, page = _listed(response, "agents")
            agents.extend(listed)
            if as_of is not None and isinstance(page.get("seq"), int):
                params["as_of"] = str(page["seq"])
            after = next_after(page, after)
            if after is None:
                return agents
            params["after"] = after

    async def delete_agent(self, name: str, *, if_match: int | None = None) -> AgentChange:
        """Deregister an agent; :class:`NotFound` when it is not registered.

        With ``if_match`` it is retried, and a repeat whose first try was done answers
        ``changed=False``; without, it is not repeated once it may have reached the broker
        (:class:`Unavailable`), as a repeat would find no agent and raise ``NotFound``."""
        headers = {"if-match": f'"{if_match}"'} if if_match is not None else None
        path = f"/v1/agents/{_agent_segment(name)}"
        response = await self._request(
            "DELETE", path, repeatable=if_match is not None, headers=headers
        )
        data = broker_document(response, "seq", "changed", "event")
        return AgentChange(data["seq"], data["changed"], data["event"], None)

    async def agent_history(self, name: str) -> list[dict[str, Any]]:
        """Every registry event of the agent, oldest first (read a page at a time)."""
        path = f"/v1/agents/{_agent_segment(name)}/history"
        events: list[dict[str, Any]] = []
        start: int | None = 1
        while start is not None:
            response = await self._request("GET", path, params={"from_seq": str(start)})
            listed, page = _listed(response, "events")
            events.extend(listed)
            start = next_page(page, start)
        return events

    # --- schema registry (the Confluent-compatible API under /registry) ----------------

    @staticmethod
    def _schema_body(
        schema: str, schema_type: str, references: Iterable[Mapping[str, Any]]
    ) -> bytes:
        return orjson.dumps(
            {"schema": schema, "schemaType": schema_type, "references": list(references)}
        )

    async def register_schema(
        self,
        subject: str,
        schema: str,
        *,
        schema_type: str = "AVRO",
        references: Iterable[Mapping[str, Any]] = (),
    ) -> int:
        """Register ``schema`` under ``subject``; its global id. An identical schema answers
        its existing id (so a retry is safe); an incompatible one raises ``IncompatibleSchema``."""
        body = self._schema_body(schema, schema_type, references)
        path = f"/registry/subjects/{_segment(subject)}/versions"
        response = await self._request("POST", path, content=body, headers=_REGISTRY_JSON)
        return int(broker_document(response, "id")["id"])

    async def get_schema(self, schema_id: int) -> RegisteredSchema:
        """The schema under a global id (what a payload's schema id points at)."""
        path = f"/registry/schemas/ids/{_segment(schema_id)}"
        data = broker_document(await self._request("GET", path), "schema")
        return RegisteredSchema.from_json(data, schema_id)

    async def get_schema_version(
        self, subject: str, version: int | str = "latest"
    ) -> RegisteredSchema:
        path = f"/registry/subjects/{_segment(subject)}/versions/{_segment(version)}"
        return RegisteredSchema.from_json(
            broker_document(await self._request("GET", path), "schema")
        )

    async def list_subjects(self) -> list[str]:
        response = await self._request("GET", "/registry/subjects")
        subjects = _body(response)
        if not isinstance(subjects, list):
            why = f"{_answered(response)} with a JSON {type(subjects).__name__}, not a list"
            raise _not_the_broker(str(response.url), why)
        return [str(subject) for subject in subjects]

    async def check_compatibility(
        self,
        subject: str,
        schema: str,
        *,
        schema_type: str = "AVRO",
        references: Iterable[Mapping[str, Any]] = (),
    ) -> list[str]:
        """Why ``schema`` could not be registered under ``subject`` now (empty: it could)."""
        path = f"/registry/compatibility/subjects/{_segment(subject)}/versions"
        response = await self._request(
            "POST",
            path,
            params={"verbose": "true"},
            content=self._schema_body(schema, schema_type, references),
            headers=_REGISTRY_JSON,
        )
        messages: list[str] = broker_document(response, "is_compatible").get("messages") or []
        return messages

    async def set_compatibility(self, level: str, subject: str | None = None) -> str:
        """Set a subject's compatibility level (or the global one)."""
        path = "/registry/config" + (f"/{_segment(subject)}" if subject else "")
        body = orjson.dumps({"compatibility": level})
        response = await self._request("PUT", path, content=body, headers=_REGISTRY_JSON)
        return str(broker_document(response, "compatibility")["compatibility"])


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    """A schema as the registry holds it (``subject``/``version`` when read through one)."""

    schema_id: int
    schema: str
    schema_type: str
    references: tuple[dict[str, Any], ...] = ()
    subject: str | None = None
    version: int | None = None

    @classmethod
    def from_json(cls, item: Mapping[str, Any], schema_id: int | None = None) -> RegisteredSchema:
        return cls(
            schema_id=int(item.get("id", schema_id or 0)),
            schema=item["schema"],
            schema_type=item.get("schemaType", "AVRO"),
            references=tuple(item.get("references") or ()),
            subject=item.get("subject"),
            version=item.get("version"),
        )


_REGISTRY_JSON = {"content-type": "application/vnd.schemaregistry.v1+json"}


class SyncBrokerClient:
    """The same API without ``await``, for scripts (not for use inside an event loop)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(self._make(base_url, options))

    @staticmethod
    async def _make(base_url: str, options: dict[str, Any]) -> BrokerClient:
        return BrokerClient(base_url, **options)

    def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        async def wrapped() -> T:
            return await call()

        return self._runner.run(wrapped())

    def publish(self, subject: str, payload: bytes | str | Any, **options: Any) -> PublishAck:
        return self._run(lambda: self._client.publish(subject, payload, **options))

    def route(self, subject: str, payload: bytes | str | Any, **options: Any) -> RouteResult:
        return self._run(lambda: self._client.route(subject, payload, **options))

    def request(self, subject: str, payload: bytes | str | Any, **options: Any) -> RouteReply:
        return self._run(lambda: self._client.request(subject, payload, **options))

    def publish_batch(
        self, records: Iterable[Mapping[str, Any]], **options: Any
    ) -> list[PublishResult]:
        return self._run(lambda: self._client.publish_batch(records, **options))

    def put_agent(self, manifest: Mapping[str, Any] | Any, **options: Any) -> AgentChange:
        return self._run(lambda: self._client.put_agent(manifest, **options))

    def get_agent(self, name: str) -> dict[str, Any]:
        return self._run(lambda: self._client.get_agent(name))

    def list_agents(self, **options: Any) -> list[dict[str, Any]]:
        return self._run(lambda: self._client.list_agents(**options))

    def delete_agent(self, name: str, **options: Any) -> AgentChange:
        return self._run(lambda: self._client.delete_agent(name, **options))

    def agent_history(self, name: str) -> list[dict[str, Any]]:
        return self._run(lambda: self._client.agent_history(name))

    def register_schema(self, subject: str, schema: str, **options: Any) -> int:
        return self._run(lambda: self._client.register_schema(subject, schema, **options))

    def get_schema(self, schema_id: int) -> RegisteredSchema:
        return self._run(lambda: self._client.get_schema(schema_id))

    def get_schema_version(self, subject: str, version: int | str = "latest") -> RegisteredSchema:
        return self._run(lambda: self._client.get_schema_version(subject, version))

    def list_subjects(self) -> list[str]:
        return self._run(self._client.list_subjects)

    def check_compatibility(self, subject: str, schema: str, **options: Any) -> list[str]:
        return self._run(lambda: self._client.check_compatibility(subject, schema, **options))

    def set_compatibility(self, level: str, subject: str | None = None) -> str:
        return self._run(lambda: self._client.set_compatibility(level, subject))

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
