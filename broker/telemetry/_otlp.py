"""OTLP/protobuf encoding of the broker's recorded spans, written straight to bytes.

The OTLP exporter's own encoder builds a protobuf message object for the span, for each
attribute and for each of their values: about 80 µs per span of the ingress on a slow
2-core machine, more than the SDK took to record the span. This writes the wire format of
``ExportTraceServiceRequest`` directly (field numbers from
``opentelemetry/proto/trace/v1/trace.proto``), about five times faster: one
``ResourceSpans`` with the process's resource and one ``ScopeSpans`` (the ``broker``
scope), the same message the SDK's encoder produces for these spans (a unit test decodes
both and compares them).

Pure functions; the export thread (:mod:`broker.telemetry._export`) calls :func:`encode`
with the :func:`envelope` it made once. Where the codecs' C accelerator is built, its
``encode_otlp_spans`` writes the same bytes for the spans of the broker's hot paths (no
events, plain attribute values: about a fifth of the time) and hands any other span back to
:func:`_span` here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from broker.codecs._accelerator import accelerator
from broker.telemetry._spans import FinishedSpan, attributes, head

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["Envelope", "encode", "envelope"]

_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack

# Span.flags: the parent's is-remote bit is known (0x100), and set (0x200).
_FLAGS_LOCAL_PARENT = b"\x85\x01" + _fixed32(0x100)
_FLAGS_REMOTE_PARENT = b"\x85\x01" + _fixed32(0x300)
#: The API's SpanKind (INTERNAL=0 ... CONSUMER=4) is one less than OTLP's.
_KIND = [bytes((0x30, kind + 1)) for kind in range(5)]

# Field tags: (number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
_T_RESOURCE_SPANS = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1
_T_RESOURCE = b"\x0a"  # ResourceSpans.resource = 1
_T_SCOPE_SPANS = b"\x12"  # ResourceSpans.scope_spans = 2
_T_SCOPE = b"\x0a"  # ScopeSpans.scope = 1
_T_SPAN = b"\x12"  # ScopeSpans.spans = 2
_T_TRACE_ID = b"\x0a\x10"  # Span.trace_id = 1, 16 bytes
_T_SPAN_ID = b"\x12\x08"  # Span.span_id = 2, 8 bytes
_T_TRACE_STATE = b"\x1a"  # Span.trace_state = 3
_T_PARENT_ID = b"\x22\x08"  # Span.parent_span_id = 4, 8 bytes
_T_NAME = b"\x2a"  # Span.name = 5
_T_START = b"\x39"  # Span.start_time_unix_nano = 7 (fixed64)
_T_END = b"\x41"  # Span.end_time_unix_nano = 8 (fixed64)
_T_ATTRIBUTE = b"\x4a"  # Span.attributes = 9
_T_DROPPED_ATTRIBUTES = b"\x50"  # Span.dropped_attributes_count = 10
_T_EVENT = b"\x5a"  # Span.events = 11
_T_STATUS = b"\x7a"  # Span.status = 15
_T_EVENT_TIME = b"\x09"  # Event.time_unix_nano = 1 (fixed64)
_T_EVENT_NAME = b"\x12"  # Event.name = 2
_T_EVENT_ATTRIBUTE = b"\x1a"  # Event.attributes = 3
_T_EVENT_DROPPED = b"\x20"  # Event.dropped_attributes_count = 4
_T_STATUS_MESSAGE = b"\x12"  # Status.message = 2
_T_STATUS_CODE = b"\x18"  # Status.code = 3
_T_KV_KEY = b"\x0a"  # KeyValue.key = 1
_T_KV_VALUE = b"\x12"  # KeyValue.value = 2
_T_STRING = b"\x0a"  # AnyValue.string_value = 1
_T_BOOL = b"\x10"  # AnyValue.bool_value = 2
_T_INT = b"\x18"  # AnyValue.int_value = 3
_T_DOUBLE = b"\x21"  # AnyValue.double_value = 4 (fixed64)
_T_ARRAY = b"\x2a"  # AnyValue.array_value = 5
_T_KVLIST = b"\x32"  # AnyValue.kvlist_value = 6
_T_BYTES = b"\x3a"  # AnyValue.bytes_value = 7
_T_VALUES = b"\x0a"  # ArrayValue.values = 1, KeyValueList.values = 1
_T_SCOPE_NAME = b"\x0a"  # InstrumentationScope.name = 1
_T_SCOPE_VERSION = b"\x12"  # InstrumentationScope.version = 2
_T_SCOPE_ATTRIBUTE = b"\x1a"  # InstrumentationScope.attributes = 3
_T_RESOURCE_ATTRIBUTE = b"\x0a"  # Resource.attributes = 1
_T_SCHEMA_URL = b"\x1a"  # ResourceSpans.schema_url = 3, ScopeSpans.schema_url = 3

_SMALL = [bytes((n,)) for n in range(128)]
#: A KeyValue's encoded key, by key: the same few keys come back on every span.
_keys: dict[str, bytes] = {}
_MAX_KEYS = 4096
#: A whole encoded KeyValue field with a string value, by ``(tag, key, value)``: most
#: attributes repeat from span to span (the method, the route, the stream, the system).
_string_fields: dict[tuple[bytes, str, str], bytes] = {}
_MAX_STRING_FIELDS = 8192
_MAX_CACHED_STRING = 200


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 127:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field."""
    size = len(data)
    return tag + (_SMALL[size] if size < 128 else _varint(size)) + data


def _any_value(value: Any) -> bytes:
    if isinstance(value, str):
        return _field(_T_STRING, value.encode())
    if isinstance(value, bool):
        return _T_BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _T_INT + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    if isinstance(value, float):
        return _T_DOUBLE + _double(value)
    if isinstance(value, bytes):
        return _field(_T_BYTES, value)
    if isinstance(value, Mapping):
        return _field(_T_KVLIST, b"".join(_key_values(_T_VALUES, value.items())))
    if isinstance(value, Sequence):
        return _field(_T_ARRAY, b"".join(_field(_T_VALUES, _any_value(v)) for v in value))
    return b""  # None: an empty AnyValue


def _key(key: str) -> bytes:
    encoded = _keys.get(key)
    if encoded is None:
        encoded = _field(_T_KV_KEY, key.encode())
        if len(_keys) < _MAX_KEYS:
            _keys[key] = encoded
    return encoded


def _key_values(tag: bytes, pairs: Iterable[tuple[str, Any]]) -> Iterable[bytes]:
    for key, value in pairs:
        if type(value) is str and len(value) <= _MAX_CACHED_STRING:
            cache_key = (tag, key, value)
            encoded = _string_fields.get(cache_key)
            if encoded is None:
                encoded = _key_value(tag, key, value)
                if len(_string_fields) < _MAX_STRING_FIELDS:
                    _string_fields[cache_key] = encoded
            yield encoded
        else:
            yield _key_value(tag, key, value)


def _key_value(tag: bytes, key: str, value: Any) -> bytes:
    return _field(tag, _key(key) + _field(_T_KV_VALUE, _any_value(value)))


def _span(span: FinishedSpan) -> bytes:
    (name, trace_id, span_id, parent_id, remote, tracestate, kind, start, end) = head(span)[:9]
    dropped, events, status, description = head(span)[9:]
    parts = [_T_TRACE_ID, trace_id.to_bytes(16, "big"), _T_SPAN_ID, span_id.to_bytes(8, "big")]
    if tracestate:
        parts.append(_field(_T_TRACE_STATE, tracestate.encode()))
    if parent_id:
        parts += (_T_PARENT_ID, parent_id.to_bytes(8, "big"))
    parts += (
        _field(_T_NAME, name.encode()),
        _KIND[kind],
        _T_START,
        _fixed64(start),
        _T_END,
        _fixed64(end),
    )
    parts += _key_values(_T_ATTRIBUTE, attributes(span))
    if dropped:
        parts += (_T_DROPPED_ATTRIBUTES, _varint(dropped))
    for event_name, timestamp, event_attributes, event_dropped in events or ():
        body = [_T_EVENT_TIME, _fixed64(timestamp), _field(_T_EVENT_NAME, event_name.encode())]
        body += _key_values(_T_EVENT_ATTRIBUTE, event_attributes.items())
        if event_dropped:
            body += (_T_EVENT_DROPPED, _varint(event_dropped))
        parts.append(_field(_T_EVENT, b"".join(body)))
    if status:
        body = [_T_STATUS_CODE, _SMALL[status]]
        if description:
            body.insert(0, _field(_T_STATUS_MESSAGE, description.encode()))
        parts.append(_field(_T_STATUS, b"".join(body)))
    else:  # the SDK's encoder always writes a Status, empty when unset
        parts.append(_T_STATUS + b"\x00")
    parts.append(_FLAGS_REMOTE_PARENT if remote else _FLAGS_LOCAL_PARENT)
    return _field(_T_SPAN, b"".join(parts))


class Envelope(NamedTuple):
    """The parts of a request that are the same for every batch of one process."""

    resource: bytes  # ResourceSpans.resource
    resource_schema: bytes  # ResourceSpans.schema_url, or nothing
    scope: bytes  # ScopeSpans.scope
    scope_schema: bytes  # ScopeSpans.schema_url, or nothing


def envelope(resource: Resource, scope: InstrumentationScope) -> Envelope:
    """Encode ``resource`` and ``scope`` once, for every :func:`encode` of this process."""
    scope_body = _field(_T_SCOPE_NAME, scope.name.encode())
    if scope.version:
        scope_body += _field(_T_SCOPE_VERSION, scope.version.encode())
    if scope.attributes:
        scope_body += b"".join(_key_values(_T_SCOPE_ATTRIBUTE, scope.attributes.items()))
    resource_body = b"".join(_key_values(_T_RESOURCE_ATTRIBUTE, resource.attributes.items()))
    return Envelope(
        resource=_field(_T_RESOURCE, resource_body),
        resource_schema=_field(_T_SCHEMA_URL, resource.schema_url.encode())
        if resource.schema_url
        else b"",
        scope=_field(_T_SCOPE, scope_body),
        scope_schema=_field(_T_SCHEMA_URL, scope.schema_url.encode()) if scope.schema_url else b"",
    )


def _spans_in_python(spans: Iterable[FinishedSpan]) -> bytes:
    return b"".join(map(_span, spans))


def _encoder() -> Callable[[Sequence[FinishedSpan]], bytes]:
    """The C encoder where the codecs' accelerator may be used (:func:`accelerator`), handing
    back to :func:`_span` the spans it does not take (events, values other than plain ones);
    else :func:`_spans_in_python`."""
    module = accelerator()
    if module is None:
        return _spans_in_python
    encode_otlp_spans: Callable[
        [Sequence[FinishedSpan], Callable[[FinishedSpan], bytes]], bytes
    ] = module.encode_otlp_spans

    def in_c(spans: Sequence[FinishedSpan]) -> bytes:
        return encode_otlp_spans(spans, _span)

    return in_c


_encode_spans: Callable[[Sequence[FinishedSpan]], bytes] = _encoder()


def encode(spans: Sequence[FinishedSpan], parts: Envelope) -> bytes:
    """One ``ExportTraceServiceRequest`` holding ``spans``, all of the process whose resource
    and scope ``parts`` holds."""
    encoded = _encode_spans(spans)
    # The two enclosing messages' lengths worked out first, so that a batch (about 100 kB) is
    # copied once, into the request, not once per level of nesting.
    scope_size = len(parts.scope) + len(encoded) + len(parts.scope_schema)
    scope_head = _T_SCOPE_SPANS + _varint(scope_size)
    resource_size = len(parts.resource) + len(scope_head) + scope_size + len(parts.resource_schema)
    return b"".join(
        (
            _T_RESOURCE_SPANS,
            _varint(resource_size),
            parts.resource,
            scope_head,
            parts.scope,
            encoded,
            parts.scope_schema,
            parts.resource_schema,
        )
    )
