"""``GET /v1/streams/{stream}/messages``: read a stream from any point, as NDJSON.

The read is scoped to the caller's tenant (``msg.<tenant>.…``, ``reg.<tenant>.…``,
``route.<tenant>.…``) and ends at the stream's current end or after ``limit`` records;
clients page on by asking again from the last ``seq`` + 1.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import StreamingResponse
from nats.aio.msg import Msg
from nats.js.errors import APIError, NotFoundError

from broker import b64
from broker.codecs import CodecKind, DecodedMessage, DecodeError, kind_for
from broker.envelope import (
    CONTENT_TYPE,
    H_STREAM_FIRST_SEQ,
    H_STREAM_FIRST_TIME,
    H_STREAM_LAST_SEQ,
    SCHEMA_ID,
    Tenant,
    media_type,
    stored_schema_id,
)
from broker.errors import BrokerError, Unavailable, Unprocessable
from broker.http.datetimes import EXAMPLES as DATE_TIME_EXAMPLES
from broker.http.datetimes import parse_date_time
from broker.http.models import ErrorBody, ReplayRecord
from broker.http.state import IngressState
from broker.reader import ReadInterrupted, read_batches
from broker.registry.schemas.decoders import json_default
from broker.streams import SUBJECT_PREFIX, Stream
from broker.telemetry import metrics

log = structlog.get_logger(__name__)


class Replayable(StrEnum):
    """Streams a tenant may replay, each read under ``<prefix>.<tenant>.>`` only: its
    messages, its registry changes, its route decisions, its dead letters (``dlq.<tenant>.
    route``: messages no agent could take) and its audit trail (e.g. the card numbers a
    replica masked). A projection's dead letters (``dlq.<STREAM>.<projection>``, every
    tenant's events) and tenant-less audit events (``audit._.…``) stay out of every
    tenant's reach: stream names and ``_`` are reserved, no tenant can be named so."""

    MESSAGES = Stream.MESSAGES.value
    REGISTRY = Stream.REGISTRY.value
    ROUTES = Stream.ROUTES.value
    DLQ = Stream.DLQ.value
    AUDIT = Stream.AUDIT.value


#: The ``{stream}`` values, for help texts.
REPLAYABLE_HELP = ", ".join(s.value for s in Replayable)


MAX_LIMIT = 100_000
#: A response ends once it holds this much (after the record that reaches it), before
#: ``limit``: granian queues a streamed answer without bound and says nothing of a slow or
#: vanished reader (an HTTP/2 stream reset, the connection kept), so without it one replay
#: of 100 000 large messages was read into the broker's memory whatever the client took.
#: Clients page on, from the last ``seq`` + 1, until an answer is empty or past
#: ``Broker-Stream-Last-Seq``.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: A record's line at least this long is written to the answer as a chunk of its own.
_OWN_CHUNK = 64 * 1024
#: The highest start sequence, however it is given (``start_seq`` or ``Last-Event-ID``): one
#: bound for both, inside what NATS takes (a uint64; above it, the consumer is refused).
MAX_SEQ = 2**63 - 1
_FILTER_TOKEN = r"[A-Za-z0-9_*-]{1,64}"
_FILTER = rf"^(>|{_FILTER_TOKEN}(\.{_FILTER_TOKEN}){{0,15}}(\.>)?)$"


def _check_wildcards(subject: str | None) -> None:
    """422 for a ``*`` inside a token (``orders.creat*``): NATS takes ``*`` as a wildcard
    only as a whole token, and no stored subject holds one, so the replay would be empty
    (the pattern's token class lets it through: the published schema keeps that class)."""
    if subject is not None and any("*" in t and t != "*" for t in subject.split(".")):
        raise Unprocessable(
            "subject: * is a wildcard only as a whole token (orders.*), not inside one"
        )


class Decode(StrEnum):
    NONE = "none"
    JSON = "json"


@functools.lru_cache(maxsize=64)
def _second(seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a second since the epoch (UTC): a replay's records share
    a few seconds, and ``isoformat`` was most of a record's time."""
    return datetime.fromtimestamp(seconds, UTC).isoformat()[:19]


def _stored_at(nanoseconds: int) -> str:
    """A stored message's time, to the microsecond at or before it: nats-py's
    ``metadata.timestamp`` rounds NATS's nanoseconds to the nearest microsecond, up about
    half of the time, and a replay from a record's own ``time`` then left that record out.
    Written as ``datetime.isoformat`` writes it (no fraction when it is 0)."""
    seconds, rest = divmod(nanoseconds, 10**9)
    micro = rest // 1000
    return f"{_second(seconds)}.{micro:06d}+00:00" if micro else f"{_second(seconds)}+00:00"


def _record(message: Msg) -> dict[str, Any]:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>, read here once
    # (nats-py's ``metadata`` reads it again at each use); the longer form with a domain and
    # an account hash goes through nats-py.
    tokens = (message.reply or "").split(".")
    time: str | None
    try:
        if len(tokens) != 9:
            raise ValueError(len(tokens))
        stream, seq, time = tokens[2], int(tokens[5]), _stored_at(int(tokens[7]))
    except (ValueError, OverflowError, OSError):
        meta = message.metadata
        stream, seq = meta.stream, meta.sequence.stream
        try:
            time = _stored_at(int(tokens[Msg.Ack.Timestamp]))
        except (IndexError, ValueError, OverflowError, OSError):
            time = meta.timestamp.isoformat() if meta.timestamp else None
    return {
        "stream": stream,
        "seq": seq,
        "subject": message.subject,
        "time": time,
        "headers": dict(message.headers or {}),
        "payload_base64": b64.encode(message.data),
    }


#: A record's line ends as orjson writes it: ``+ b"\n"`` copied every line once more.
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def _text(payload: bytes, content_type: str | None) -> str:
    """A ``text/*`` payload as a string; any other opaque payload stays in payload_base64."""
    kind = media_type(content_type)
    if not kind.startswith("text/"):
        raise DecodeError("raw", f"no decoder for {kind or 'a message without Content-Type'}")
    try:
        return payload.decode()
    except UnicodeDecodeError as e:
        raise DecodeError("text", f"not UTF-8: {e}") from None


def _schema_id(kind: CodecKind, headers: dict[str, str]) -> int | None:
    """The message's ``Broker-Schema-Id``; :class:`DecodeError` for one of more digits than
    ``int()`` reads (4,300), which any NATS client that may write the stream can store: it
    failed the whole replay (a 500, or an answer cut off) at every try."""
    try:
        return stored_schema_id(headers)
    except ValueError:
        raise DecodeError(kind, f"its {SCHEMA_ID} header is no schema id") from None


async def _decoded(
    state: IngressState, tenant: Tenant, message: Msg, record: dict[str, Any]
) -> bytes:
    """The record with ``value`` (decoded with the writer's schema) or ``decode_error``."""
    headers = record["headers"]
    content_type = headers.get(CONTENT_TYPE)
    try:
        kind = kind_for(content_type)
        if kind is CodecKind.RAW:
            record["value"] = _text(message.data, content_type)
        else:
            codec = await state.decoders.codec(tenant, content_type, _schema_id(kind, headers))
            record["value"] = DecodedMessage(message.data, headers, codec).value
    except DecodeError as e:
        metrics.decode_error(e.codec)
        record["decode_error"] = e.message
    try:
        return orjson.dumps(record, default=json_default, option=orjson.OPT_NON_STR_KEYS | _NEWLINE)
    except orjson.JSONEncodeError as e:  # e.g. a msgpack map with binary keys
        del record["value"]
        record["decode_error"] = f"the decoded value has no JSON form: {e}"
        return orjson.dumps(record, option=_NEWLINE)


SSE = "text/event-stream"


def _accepts_sse(accept: str) -> bool:
    """Whether an ``Accept`` header asks for Server-Sent Events: it names
    ``text/event-stream`` (in any case) with a quality above 0, at least as high as any
    other range it names."""
    best_sse, best_other = 0.0, 0.0
    for part in accept.split(",")[:64]:
        media, _, parameters = part.partition(";")
        quality = 1.0
        for parameter in parameters.split(";"):
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        if media.strip().lower() == SSE:
            best_sse = max(best_sse, quality)
        else:
            best_other = max(best_other, quality)
    return best_sse > 0 and best_sse >= best_other


def _event(seq: int, line: bytes) -> bytes:
    """One Server-Sent Event: the record's JSON (one line) as data, its seq as the id."""
    return b"id: %d\nevent: message\ndata: %s\n\n" % (seq, line.rstrip(b"\n"))


class _ReplayResponse(StreamingResponse):
    """A streamed replay that closes its body when the response ends, however it ends.

    A client that goes away cancels the response while the body waits at a ``yield``:
    Starlette leaves it suspended there, and its read (a consumer on the server) was closed
    only once the collector found it, up to the consumer's 30 s inactivity threshold later."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _start(
    start_seq: int | None, start_time: str | None, last_event_id: str | None
) -> tuple[int | None, datetime | None]:
    """Where a replay starts: after ``Last-Event-ID`` when given, else ``start_seq`` or
    ``start_time`` (RFC 3339; in UTC, what NATS is sent); 422 for what NATS would refuse."""
    if last_event_id is not None:
        if not (last_event_id.isascii() and last_event_id.isdigit()):
            raise Unprocessable("Last-Event-ID must be a stream sequence")
        if int(last_event_id) >= MAX_SEQ:
            raise Unprocessable(f"Last-Event-ID must be a stream sequence below {MAX_SEQ}")
        return int(last_event_id) + 1, None
    if start_seq is not None and start_time is not None:
        raise Unprocessable("give start_seq or start_time, not both")
    if start_time is not None:
        moment = parse_date_time(start_time, name="start_time")
        try:
            utc = moment.astimezone(UTC)
        except OverflowError:
            raise Unprocessable("start_time is out of range once in UTC") from None
        # NATS counts it in int64 nanoseconds, which wrap outside 1677 to 2262 (from
        # 9999-12-31 a replay returned the whole stream): a time before every stored
        # message (none is before 1970) or after all of them reads the same, in range.
        return None, min(max(utc, _EPOCH), _LAST_NANOSECOND_TIME)
    return start_seq, None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The last whole second of int64 nanoseconds since 1970 (2262-04-11T23:47:16Z).
_LAST_NANOSECOND_TIME = datetime.fromtimestamp((2**63 - 1) // 10**9, UTC)


def _broke_off(error: ReadInterrupted, stream: str, *, sse: bool) -> bytes:
    """The last line of a replay whose read broke off after its answer began."""
    log.warning("replay_interrupted", stream=stream, error=error.message)
    line = orjson.dumps(error.to_dict())
    return b"event: error\ndata: %s\n\n" % line if sse else line + b"\n"


def _nats_time(value: object) -> str | None:
    """A time of nats-server's stream state (RFC 3339, to the nanosecond) as a record's
    ``time`` is written: to the microsecond at or before it (:func:`parse_date_time` cuts
    the digits past it). ``None`` for Go's zero time (no such record) and what is no time."""
    if not isinstance(value, str):
        return None
    try:
        moment = parse_date_time(value, name="time").astimezone(UTC)
    except (Unprocessable, OverflowError):
        return None
    return moment.isoformat() if moment >= _EPOCH else None


async def _stream_headers(state: IngressState, stream: str) -> dict[str, str]:
    """The stream's extent when the read begins, as the answer's headers: its last sequence
    (a client paging through a stream that grows faster than it reads stops there), its
    first (a client that asked to start below it learns that records before it aged out or
    were purged) and that first record's time (of the last one when none is left): a
    ``start_time`` at or before it may have asked for records before the first sequence.

    ``STREAM.INFO`` asked for as such: nats-py's ``StreamState`` drops ``first_ts`` and
    ``last_ts``. NATS away or refusing raises nats-py's errors, which the app answers."""
    reply = await state.publisher.nc.request(
        f"$JS.API.STREAM.INFO.{stream}", b"", timeout=state.settings.publish_timeout
    )
    info = orjson.loads(reply.data)
    try:
        if isinstance(info, dict) and isinstance(info.get("error"), dict):
            APIError.from_error(info["error"])
    except NotFoundError:  # a 503 in the API's shape, not a 500
        raise Unavailable(
            f"stream {stream} is missing (`broker serve` creates it at start)"
        ) from None
    numbers = info.get("state") if isinstance(info, dict) else None
    if not isinstance(numbers, dict):
        raise BrokerError(f"nats-server's info of stream {stream} has no state")
    headers = {
        H_STREAM_LAST_SEQ: str(numbers.get("last_seq", 0)),
        H_STREAM_FIRST_SEQ: str(numbers.get("first_seq", 0)),
    }
    held = numbers.get("messages", 0)
    first_time = _nats_time(numbers.get("first_ts" if held else "last_ts"))
    if first_time is not None:
        headers[H_STREAM_FIRST_TIME] = first_time
    return headers


async def _answer(
    state: IngressState,
    tenant: Tenant,
    first: list[Msg],
    batches: AsyncGenerator[list[Msg], None],
    *,
    stream: str,
    limit: int,
    decode: Decode,
    sse: bool,
) -> AsyncIterator[bytes]:
    """A replay answer's body: ``first``, then what ``batches`` delivers, as NDJSON lines
    or Server-Sent Events, up to ``limit`` records or MAX_RESPONSE_BYTES."""
    # One chunk per batch the server delivered: a write per record would cost more than
    # encoding it (a line of _OWN_CHUNK or more is a chunk of its own: joined, it would be
    # copied once more). The read is closed on the way out, even at ``limit`` or
    # MAX_RESPONSE_BYTES, so its consumer is deleted at once.
    left, room = limit, MAX_RESPONSE_BYTES
    async with contextlib.aclosing(batches):
        messages = first
        while messages:
            lines: list[bytes] = []
            sent = 0
            for message in messages[:left]:
                record = _record(message)
                if decode is Decode.JSON:
                    line = await _decoded(state, tenant, message, record)
                else:
                    line = orjson.dumps(record, option=_NEWLINE)
                if sse:
                    line = _event(record["seq"], line)
                sent += 1
                room -= len(line)
                if len(line) < _OWN_CHUNK:
                    lines.append(line)
                else:
                    if lines:
                        yield b"".join(lines)
                        lines.clear()
                    yield line
                if room <= 0:
                    break
            if lines:
                yield b"".join(lines)
            left -= sent
            if left <= 0 or room <= 0:
                return
            try:
                messages = await anext(batches, [])
            except ReadInterrupted as e:  # after the 200: say so in the body
                yield _broke_off(e, stream, sse=sse)
                return


def replay_router(state: IngressState) -> APIRouter:
    router = APIRouter(prefix="/v1/streams", tags=["replay"])

    @router.get(
        "/{stream}/messages",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "One JSON object per line: stream, seq, subject, time, headers, "
                "payload_base64, and value or decode_error when decode=json. With "
                "`Accept: text/event-stream`, the same records as Server-Sent Events "
                "(`id` = seq, resumable with `Last-Event-ID`). An answer ends after `limit` "
                "records or once it holds 16 MiB: page on from the last seq + 1 until an "
                "answer is empty or reaches `Broker-Stream-Last-Seq`.",
                "headers": {
                    H_STREAM_LAST_SEQ: {
                        "description": "The stream's last sequence when the read began: "
                        "page on up to it.",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    H_STREAM_FIRST_SEQ: {
                        "description": "The stream's first sequence when the read began. "
                        "A start_seq below it, or no start when it is above 1, asked for "
                        "records that aged out (max age, max messages) or were purged: any "
                        "of them may have been in range.",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    H_STREAM_FIRST_TIME: {
                        "description": "The time of the stream's first record when the "
                        "read began (of its last record when none is left; absent when it "
                        "never held one), to the microsecond as records give `time`: every "
                        "record before Broker-Stream-First-Seq was stored at or before it. "
                        "A start_time at or before it, with Broker-Stream-First-Seq above "
                        "1, may have asked for records that aged out or were purged.",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                },
                "content": {
                    # Each line is one record (as the streamed publish answer describes its
                    # lines): a one-line body is checked as that record.
                    "application/x-ndjson": {
                        "schema": {"$ref": f"#/components/schemas/{ReplayRecord.__name__}"}
                    },
                    SSE: {"schema": {"type": "string"}},
                },
            },
            422: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )
    async def messages(
        *,
        stream: Annotated[Replayable, Path(description=f"One of {REPLAYABLE_HELP}.")],
        start_seq: Annotated[int | None, Query(ge=1, le=MAX_SEQ)] = None,
        start_time: Annotated[
            str | None,
            Query(
                max_length=64,
                description=f"An RFC 3339 date-time with an offset, {DATE_TIME_EXAMPLES}.",
                json_schema_extra={"format": "date-time"},
            ),
        ] = None,
        subject: Annotated[
            str | None,
            Query(pattern=_FILTER, description="Filter inside your namespace; * and > allowed."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
        decode: Decode = Decode.NONE,
        accept: Annotated[str | None, Header(include_in_schema=False)] = None,
        last_event_id: Annotated[
            str | None,
            Header(
                alias="Last-Event-ID",
                max_length=20,
                description="SSE resume: the last seq received (replay starts after it).",
            ),
        ] = None,
    ) -> StreamingResponse:
        """Replay a stream from a sequence or a time (default: the start) as NDJSON, or as
        Server-Sent Events when the client accepts ``text/event-stream``.

        Out-of-range starts are refused (422) before NATS sees them, where they would fail
        the consumer's creation (a 500): a ``Last-Event-ID`` whose next sequence is above
        ``MAX_SEQ``, as ``start_seq`` is, and a ``start_time`` whose UTC form falls outside
        years 1 to 9999 (``0001-01-01T00:00:00+05:00``), which has no datetime to send."""
        sse = accept is not None and _accepts_sse(accept)
        _check_wildcards(subject)
        first_seq, first_time = _start(start_seq, start_time, last_event_id)
        tenant = state.tenant
        scope = f"{SUBJECT_PREFIX[Stream(stream.value)]}.{tenant}"
        filter_subject = f"{scope}.{subject or '>'}"
        js = state.publisher.js  # 503 when NATS is not connected
        headers = await _stream_headers(state, stream.value)
        batches = read_batches(
            js,
            stream,
            subject=filter_subject,
            start_seq=first_seq,
            start_time=first_time,
            batch=min(limit, 1024),
        )
        # The first batch is read before the answer starts: a read NATS refuses (or NATS
        # gone) is then a 4xx/503 in the API's shape, not a stream cut off after its 200.
        try:
            first: list[Msg] = await anext(batches, [])
        except BaseException:
            await batches.aclose()
            raise

        body = _answer(
            state, tenant, first, batches, stream=stream.value, limit=limit, decode=decode, sse=sse
        )
        if sse:
            headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return _ReplayResponse(body, media_type=SSE, headers=headers)
        return _ReplayResponse(body, media_type="application/x-ndjson", headers=headers)

    return router
