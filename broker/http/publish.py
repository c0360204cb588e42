"""Publish handlers, raw ASGI for speed: single, batch, and streaming NDJSON.

They only translate: headers and body in, :mod:`broker.envelope` to validate and map,
:class:`~broker.publisher.Publisher` to append, and the ack (or error) out.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import replace
from itertools import islice
from typing import Any
from urllib.parse import unquote

import orjson
import structlog

from broker.envelope import (
    CLOUDEVENTS_BATCH,
    CLOUDEVENTS_JSON,
    H_CONTENT_TYPE,
    H_EXPECTED_LAST_SUBJECT_SEQUENCE,
    H_IDEMPOTENCY_KEY,
    H_SCHEMA_ID,
    NDJSON_TYPES,
    Outbound,
    PublishRequest,
    ce_headers_from_http,
    check_media_type,
    cloudevent_key,
    cloudevent_to_request,
    media_type,
    parse_json,
    parse_schema_id,
    parse_sequence,
    passthrough_headers,
    record_to_request,
    validate_subject,
)
from broker.errors import (
    BadRequest,
    BrokerError,
    PayloadTooLarge,
    RequestTimeout,
    StreamFull,
    UnsupportedMediaType,
)
from broker.exactjson import loads_exact
from broker.http._json_array import array_records
from broker.http._rsgi import (
    NDJSON,
    Headers,
    HTTPProtocol,
    Scope,
    StreamTransport,
    Vanished,
    read_body,
    respond_json,
)
from broker.http.state import IngressState
from broker.publisher import PublishAck, Publisher
from broker.settings import Settings
from broker.telemetry import tracing

log = structlog.get_logger(__name__)

_BATCH_TYPES = frozenset({"application/json", CLOUDEVENTS_BATCH, *NDJSON_TYPES})
#: How many streamed records may wait for their ack before reading pauses (backpressure).
_STREAM_WINDOW = 1024
#: A stream carries at most this many batches' worth of records (``max_batch_records``):
#: granian queues every ack line written, without bound, until the client reads it, and
#: tells the ingress nothing of how far the client has read, so a client that never reads
#: costs the server every line; this caps it near what one largest batch costs.
_STREAM_BATCHES = 10
_NOT_BLANK = re.compile(rb"\S")


async def publish_one(state: IngressState, scope: Scope, proto: HTTPProtocol, subject: str) -> int:
    """``POST /v1/publish/{subject}``: append the body as sent; answer after the PubAck (the
    status answered with is returned, for the request's metrics and span)."""
    headers = scope.headers
    validate_subject(subject)
    content_type = headers.get(H_CONTENT_TYPE)
    body = await read_body(proto, headers, state.settings.max_message_bytes)
    key = headers.get(H_IDEMPOTENCY_KEY)
    structured = media_type(content_type) == CLOUDEVENTS_JSON
    if structured:
        event = parse_json(body, what="the structured CloudEvent")
        request = cloudevent_to_request(event, subject=subject, idempotency_key=key)
        trace = passthrough_headers(headers)
        request = replace(
            request,
            schema_id=parse_schema_id(headers.get(H_SCHEMA_ID)),
            expected_last_subject_sequence=_expected_sequence(headers),
            extra_headers={**(request.extra_headers or {}), **trace}
            if trace
            else request.extra_headers,
        )
    else:
        request = body_request(headers, subject, body, check_media_type(content_type))
    outbound = request.to_outbound(state.tenant)
    stored = outbound.headers
    if (
        structured
        and tracing.enabled()
        and "ce-traceparent" in stored
        and tracing.extract(headers) is None
    ):
        # A structured CloudEvent carries its own trace context, and the request none that
        # the server span continued (one that is not valid counts as absent, as the stored
        # message leaves it out): the event's append continues the event's context.
        with tracing.span("cloudevent", parent_headers=stored, kind=tracing.SpanKind.CONSUMER):
            ack = await state.publisher.publish(outbound)
    else:
        ack = await state.publisher.publish(outbound)
    respond_json(proto, 200, ack.to_dict())
    return 200


def body_request(headers: Headers, subject: str, body: bytes, content_type: str) -> PublishRequest:
    """The request for a body stored as sent (not a structured CloudEvent), from the HTTP
    headers publish and route share: ``Idempotency-Key`` (else a binary-mode CloudEvent's
    ``ce-source`` and ``ce-id``), ``Schema-Id``, ``Expected-Last-Subject-Sequence``, ``ce-*``
    and the trace context."""
    ce = ce_headers_from_http(dict(headers.items())) if "ce-specversion" in headers else None
    trace = passthrough_headers(headers)
    extra = {**ce, **trace} if ce and trace else (ce or trace)
    key = headers.get(H_IDEMPOTENCY_KEY)
    return PublishRequest(
        subject=subject,
        payload=body,
        content_type=content_type,
        idempotency_key=key
        if key is not None
        else (cloudevent_key(ce["ce-source"], ce["ce-id"]) if ce else None),
        schema_id=parse_schema_id(headers.get(H_SCHEMA_ID)),
        expected_last_subject_sequence=_expected_sequence(headers),
        extra_headers=extra,
    )


def _expected_sequence(headers: Headers) -> int | None:
    return parse_sequence(
        headers.get(H_EXPECTED_LAST_SUBJECT_SEQUENCE), field="Expected-Last-Subject-Sequence"
    )


def _batch_kind(content_type: str | None) -> str:
    bare = media_type(content_type)
    if bare not in _BATCH_TYPES:
        raise UnsupportedMediaType(
            "a batch is application/json (array of records), application/x-ndjson "
            f"or {CLOUDEVENTS_BATCH}; got {bare or 'no Content-Type'!r}"
        )
    return "ndjson" if bare in NDJSON_TYPES else bare


def _query_subject(scope: Scope) -> str | None:
    for part in scope.query_string.split("&"):
        name, _, value = part.partition("=")
        if name == "subject" and value:
            return validate_subject(unquote(value))
    return None


def _to_request(kind: str, record: Any, default_subject: str | None) -> PublishRequest:
    if kind == CLOUDEVENTS_BATCH:
        return cloudevent_to_request(record, default_subject=default_subject)
    return record_to_request(record, default_subject=default_subject)


#: A submitted record (what was sent, and its ack to come) or why it was not submitted.
_Pending = tuple[Outbound, Awaitable[PublishAck]] | BrokerError


#: At most this many duplicates of one batch or stream are compared with their stored copies at
#: once.
_CHECKS_AT_ONCE = 32


async def _settle_all(publisher: Publisher, pending: list[_Pending]) -> list[dict[str, Any]]:
    """One result per record, in order. The acks come in order; the duplicates among them (a
    batch sent again) are then compared with what their keys stored side by side, not one
    JetStream round trip after another."""
    results: list[dict[str, Any]] = []
    duplicates: list[tuple[int, Outbound, PublishAck]] = []
    for p in pending:
        if isinstance(p, BrokerError):
            results.append(p.to_dict())
            continue
        try:
            ack = await publisher.settle(*p, verify=False)
        except BrokerError as e:
            results.append(e.to_dict())
            continue
        if ack.duplicate:
            duplicates.append((len(results), p[0], ack))
        results.append(ack.to_dict())
    if duplicates:
        gate = asyncio.Semaphore(_CHECKS_AT_ONCE)

        async def check(i: int, out: Outbound, ack: PublishAck) -> None:
            async with gate:
                results[i] = await _duplicate_result(publisher, out, ack)

        await asyncio.gather(*(check(*d) for d in duplicates))
    return results


async def _duplicate_result(publisher: Publisher, out: Outbound, ack: PublishAck) -> dict[str, Any]:
    """A duplicate record's result: its ack once the copy stored under its key is this same
    request, else the error (``422 idempotency_key_reused``, or ``503`` when the copy cannot
    be read). The buffered batch and the stream both answer a duplicate with this."""
    try:
        return (await publisher.same_request(out, ack)).to_dict()
    except BrokerError as e:
        return e.to_dict()


async def publish_batch(state: IngressState, scope: Scope, proto: HTTPProtocol) -> None:
    """``POST /v1/publish``: many records, one result each, in order; acks pipelined.

    With ``Accept: application/x-ndjson`` and an NDJSON body the exchange streams: records
    are appended as their lines arrive and one ack line goes back per record as it is acked.
    """
    headers = scope.headers
    kind = _batch_kind(headers.get(H_CONTENT_TYPE))
    default_subject = _query_subject(scope)
    if kind == "ndjson" and media_type(headers.get("accept")) in NDJSON_TYPES:
        await _DuplexPublish(state, default_subject, passthrough_headers(headers)).run(proto)
        return
    body = await read_body(proto, headers, state.settings.max_batch_bytes)
    records = _parse_batch(
        kind, body, state.settings.max_batch_records, record_limit(state.settings)
    )
    # A client's trace context goes with each record, as with a single publish (sampled, the
    # append's own replaces it); a CloudEvent carries its own.
    trace = passthrough_headers(headers) if kind != CLOUDEVENTS_BATCH else None
    pending: list[_Pending] = []
    for record in records:
        try:
            if isinstance(record, BrokerError):
                raise record
            outbound = _to_request(kind, record, default_subject).to_outbound(state.tenant)
            if trace:
                outbound.headers.update(trace)
            pending.append((outbound, await state.publisher.submit(outbound)))
        except BrokerError as e:
            pending.append(e)
    results = await _settle_all(state.publisher, pending)
    failed = sum(1 for r in results if "error_code" in r)
    log.debug("batch_published", records=len(results), failed=failed)
    respond_json(proto, 207 if failed else 200, {"results": results})


def record_limit(settings: Settings) -> int:
    """The longest record a batch or stream may hold: its payload at the message limit, as
    JSON or base64, with room for its other fields."""
    return settings.max_message_bytes * 2 + 4096


def _parse_batch(kind: str, body: bytes, max_records: int, longest: int) -> Iterator[Any]:
    """Records of a buffered batch, counted first and handed out one at a time, so each can be
    dropped once it is an outbound message: parsed all at once, a body of tiny records costs
    thirty times its size. A malformed or too long NDJSON line is that record's error only."""
    if kind == "ndjson":
        # More lines than records allowed (a line feed each, the last one's optional) may
        # still be few records: count those that are not blank then.
        if body.count(b"\n") >= max_records and (
            sum(1 for _ in islice(_records_at(body), max_records + 1)) > max_records
        ):
            raise PayloadTooLarge(f"batch has more than {max_records} records, the limit")
        return (_ndjson_record(body, a, b, longest) for a, b in _records_at(body))
    return array_records(body, max_records, longest)


def _records_at(body: bytes) -> Iterator[tuple[int, int]]:
    """Where each record of an NDJSON body is: from the first character of a line that is
    not blank (spaces, tabs, CR, VT and FF before it are skipped, blank lines with them, in
    one search) to its line feed or the end. What the regular expression ``\\S[^\\n]*``
    found, which went through a large record a byte at a time (180 MB/s here)."""
    position, end = 0, len(body)
    search, find = _NOT_BLANK.search, body.find
    while (first := search(body, position)) is not None:
        start = first.start()
        stop = find(b"\n", start)
        if stop < 0:
            stop = end
        yield start, stop
        position = stop + 1


def _ndjson_record(body: bytes, start: int, stop: int, longest: int) -> Any:
    if stop - start > longest:  # refused before parsing: its values could cost 30x its size
        return PayloadTooLarge(f"record exceeds {longest} bytes")
    try:
        return loads_exact(body[start:stop])
    except ValueError as e:
        return BadRequest(f"record is not valid JSON: {e}")


class _DuplexPublish:
    """Full-duplex NDJSON: records are appended as their lines arrive and ack lines are
    written back, in order, while the request body still flows."""

    def __init__(
        self,
        state: IngressState,
        default_subject: str | None,
        trace: dict[str, str] | None = None,
    ) -> None:
        self.state = state
        self.default_subject = default_subject
        self.trace = trace  # the request's trace context, stored with each record
        self.line_limit = record_limit(state.settings)
        self.max_records = state.settings.max_batch_records * _STREAM_BATCHES
        self.window: asyncio.Queue[tuple[int, _Pending] | None] = asyncio.Queue(_STREAM_WINDOW)
        self.index = 0
        self.broken = False  # the client stopped reading; keep draining, stop writing

    async def run(self, proto: HTTPProtocol) -> None:
        transport = proto.response_stream(200, [("content-type", NDJSON)])
        writer = asyncio.create_task(self._write_acks(transport))
        try:
            await self._read_records(proto)
        finally:
            await self.window.put(None)
            await writer

    async def _read_records(self, proto: HTTPProtocol) -> None:
        # A body whose client vanished is empty chunks for ever, each of which reset the idle
        # timeout below: the stream stayed, its task reading in a loop (Vanished).
        vanished = Vanished(proto)
        try:
            await self._read_chunks(aiter(proto), vanished)
        finally:
            vanished.close()

    async def _read_chunks(self, chunks: AsyncIterator[bytes], vanished: Vanished) -> None:
        idle = self.state.settings.stream_idle_timeout
        buffer = b""
        skipping = False  # inside an oversized line: drop bytes up to its newline
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                # granian has no body read timeout: a stalled client would hold its stream,
                # its window and this task for ever. The last line says why it ends.
                await self._submit(
                    RequestTimeout(f"no request data for {idle:g} s; the stream is closed")
                )
                log.info("publish_stream_idle", records=self.index - 1, idle_s=idle)
                return
            if self.broken:
                return
            if not chunk and vanished():
                log.info("publish_stream_client_gone", records=self.index)
                return
            buffer += chunk
            start = 0  # cut lines by offset: slicing the rest off after each was quadratic
            while (cut := buffer.find(b"\n", start)) >= 0:
                line, start = buffer[start:cut], cut + 1
                if skipping:
                    skipping = False
                elif len(line) > self.line_limit:  # its newline came in the chunk over it
                    if not await self._submit(self._too_long()):
                        return
                elif line.strip() and not await self._submit(line):
                    return
            buffer = buffer[start:]
            if skipping:
                buffer = b""
            elif len(buffer) > self.line_limit:
                if not await self._submit(self._too_long()):
                    return
                buffer, skipping = b"", True
        if buffer.strip() and not skipping:
            await self._submit(buffer)

    def _too_long(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"record exceeds {self.line_limit} bytes")

    async def _submit(self, line: bytes | BrokerError) -> bool:
        """Append one record (or queue its error); ``False`` once the stream is full: then
        its last line, in the record's place, says so, and reading stops."""
        pending: _Pending
        full = self.index >= self.max_records
        try:
            if full:
                raise StreamFull(
                    f"a stream carries at most {self.max_records} records; this one is ended: "
                    "send the records from this index on in a new stream"
                )
            if isinstance(line, BrokerError):
                raise line
            try:
                record = loads_exact(line)
            except ValueError as e:
                raise BadRequest(f"record is not valid JSON: {e}") from None
            request = record_to_request(record, default_subject=self.default_subject)
            outbound = request.to_outbound(self.state.tenant)
            if self.trace:
                outbound.headers.update(self.trace)
            pending = (outbound, await self.state.publisher.submit(outbound))
        except BrokerError as e:
            pending = e
        await self.window.put((self.index, pending))
        self.index += 1
        if full:
            log.info("publish_stream_full", records=self.max_records)
        return not full

    async def _write_acks(self, transport: StreamTransport) -> None:
        """Settle the records' acks in order and hand each result line to :meth:`_send`. A
        duplicate (a stream sent again) is compared with what its key stored (a JetStream
        read) beside the acks after it, up to :data:`_CHECKS_AT_ONCE` at once, its line still
        in its place: one read after another, a resent stream went at one record per round
        trip. Keeps draining the window after the client went away, so the reader never
        blocks."""
        publisher = self.state.publisher
        lines: asyncio.Queue[bytes | asyncio.Task[bytes] | None] = asyncio.Queue(_CHECKS_AT_ONCE)
        checks = asyncio.Semaphore(_CHECKS_AT_ONCE)
        sender = asyncio.create_task(self._send(transport, lines))
        try:
            while (item := await self.window.get()) is not None:
                index, pending = item
                if isinstance(pending, BrokerError):
                    await lines.put(_line(index, pending.to_dict()))
                    continue
                try:
                    ack = await publisher.settle(*pending, verify=False)
                except BrokerError as e:
                    # Its traceback holds this frame (and so the response's transport) while
                    # the failed future holds the error: a reference cycle. granian ends the
                    # answer only when the transport is freed, so the stream stayed open
                    # until the next cyclic collection (rare: see broker._process.tune_gc).
                    e.__traceback__ = None
                    await lines.put(_line(index, e.to_dict()))
                    continue
                if not ack.duplicate:
                    await lines.put(_line(index, ack.to_dict()))
                    continue
                await checks.acquire()  # released when the check is done
                check = asyncio.create_task(self._checked(index, pending[0], ack, checks))
                await lines.put(check)
        finally:
            await _put_last(lines, sender)

    async def _checked(
        self, index: int, out: Outbound, ack: PublishAck, checks: asyncio.Semaphore
    ) -> bytes:
        """A duplicate's result line, once compared with its stored copy. Never raises: the
        sender waits on it, and a stream whose sender stopped would stop reading too."""
        try:
            return _line(index, await _duplicate_result(self.state.publisher, out, ack))
        except Exception:
            log.exception("publish_stream_check_failed", index=index, seq=ack.seq)
            return _line(index, BrokerError("the duplicate could not be checked").to_dict())
        finally:
            checks.release()

    async def _send(
        self, transport: StreamTransport, lines: asyncio.Queue[bytes | asyncio.Task[bytes] | None]
    ) -> None:
        """Write the result lines in record order (a duplicate's when its check is done)."""
        while (item := await lines.get()) is not None:
            line = item if isinstance(item, bytes) else await item
            if self.broken:
                continue
            try:
                await transport.send_bytes(line)
            except Exception:  # the client is gone; nothing more to tell it
                self.broken = True


def _line(index: int, result: dict[str, Any]) -> bytes:
    return orjson.dumps({"index": index, **result}) + b"\n"


async def _put_last(
    lines: asyncio.Queue[bytes | asyncio.Task[bytes] | None], sender: asyncio.Task[None]
) -> None:
    """End the line queue and wait for the sender to write what is in it; if this task is
    cancelled meanwhile (the request is), the sender and the checks it waits on go too."""
    try:
        await lines.put(None)
        await sender
    except asyncio.CancelledError:
        sender.cancel()
        while not lines.empty():
            item = lines.get_nowait()
            if isinstance(item, asyncio.Task):
                item.cancel()
        raise
