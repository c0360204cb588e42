"""From what a client sent to what is appended: subjects, media types, schema ids, headers.

This module is the one mapper between an inbound publish (HTTP headers + body, a batch
record, a CloudEvent) and the JetStream message that stores it (:class:`Outbound`: subject,
payload bytes, NATS headers). It is framework-free; the HTTP layer only calls it.

Stored NATS headers:

``Content-Type``                          the media type the client declared
``Broker-Schema-Id``                      schema id, from the ``Schema-Id`` header or the
                                          Confluent wire prefix (``0x00`` + 4-byte id)
``Broker-Schema-Id-Source``               ``header`` or ``wire``
``Nats-Msg-Id``                           the idempotency key (``Idempotency-Key``, or a
                                          CloudEvent's source and id: :func:`cloudevent_key`)
``Broker-Request-Digest``                 with a key: a digest of the subject, media type,
                                          schema id and body, so that the key used again
                                          for another request is told from a retry
``Nats-Expected-Last-Subject-Sequence``   optimistic concurrency, checked by JetStream
``ce-*``                                  CloudEvents attributes (binary content mode)
``traceparent``, ``tracestate``           W3C trace context, passed through (bounded, and
                                          left out when it does not parse)
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NewType

import orjson

from broker import b64
from broker.errors import BadRequest, InvalidSubject, Unprocessable, UnsupportedMediaType
from broker.exactjson import loads_exact
from broker.telemetry.w3c import RequestHeaders, request_trace_headers

Tenant = NewType("Tenant", str)

MAX_SUBJECT_LENGTH = 255
MAX_SUBJECT_TOKENS = 16
MAX_HEADER_VALUE_LENGTH = 1024
#: The pass-through headers of one message together (CloudEvent attributes, ``ce-*``): NATS
#: stores at most 64 KiB of headers, which the broker's own and the routing headers share.
MAX_HEADERS_LENGTH = 16 * 1024
#: One subject token; also what a name that becomes one must be (a worker id, say).
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A whole valid subject at once (one match per publish instead of one per token).
_SUBJECT = re.compile(rf"{TOKEN.pattern}(?:\.{TOKEN.pattern}){{0,{MAX_SUBJECT_TOKENS - 1}}}")
#: Control characters other than tab: never allowed in a stored header value.
CONTROL_CHARACTERS = r"[\x00-\x08\x0a-\x1f\x7f]"
_CONTROL = re.compile(CONTROL_CHARACTERS)
#: What NATS trims from both ends of a header value it stores.
_HEADER_WHITESPACE = " \t"

# Inbound HTTP header names (lower case, as ASGI gives them).
H_CONTENT_TYPE = "content-type"
H_IDEMPOTENCY_KEY = "idempotency-key"
H_SCHEMA_ID = "schema-id"
H_EXPECTED_LAST_SUBJECT_SEQUENCE = "expected-last-subject-sequence"
#: Replay response header: the stream's last sequence when the read began.
H_STREAM_LAST_SEQ = "Broker-Stream-Last-Seq"
#: Replay response header: the stream's first sequence when the read began. A start below
#: it asked for records that aged out (max age, max messages) or were purged.
H_STREAM_FIRST_SEQ = "Broker-Stream-First-Seq"
#: Replay response header: the time of the stream's first record when the read began (of
#: its last one when it holds none), to the microsecond as records give ``time``: every
#: record before the first sequence was stored at or before it, so a ``start_time`` after
#: it asked for none of them.
H_STREAM_FIRST_TIME = "Broker-Stream-First-Time"

# Stored NATS header names.
NATS_MSG_ID = "Nats-Msg-Id"
NATS_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
NATS_EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
CONTENT_TYPE = "Content-Type"
SCHEMA_ID = "Broker-Schema-Id"
#: On a message stored with an idempotency key: :func:`request_digest` of what was sent. A
#: publish that JetStream finds a duplicate of it is a retry when the digests agree, and the
#: key used again for another request when they differ.
REQUEST_DIGEST = "Broker-Request-Digest"
SCHEMA_ID_SOURCE = "Broker-Schema-Id-Source"
#: ``none`` on a message whose body starts with a zero byte but carries no Confluent prefix:
#: a raw Avro or Protobuf body sent with a ``Schema-Id`` header (an Avro null or zero, a
#: Protobuf message index 0). Readers then decode the whole body.
WIRE_PREFIX = "Broker-Wire-Prefix"
NO_WIRE_PREFIX = "none"
#: The stored headers (lower case) a copy of a message cannot lose: how to read its payload,
#: and its trace. A dead letter whose own headers do not fit keeps these.
PAYLOAD_HEADERS = frozenset(
    name.lower()
    for name in (
        CONTENT_TYPE,
        SCHEMA_ID,
        SCHEMA_ID_SOURCE,
        WIRE_PREFIX,
        "traceparent",
        "tracestate",
    )
)

DEFAULT_CONTENT_TYPE = "application/octet-stream"
CLOUDEVENTS_JSON = "application/cloudevents+json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})

#: Media types accepted for a single publish. ``*`` matches any subtype.
ACCEPTED_MEDIA_TYPES = frozenset(
    {
        "application/json",
        "application/octet-stream",
        "application/avro",
        "avro/binary",
        "application/vnd.apache.avro+binary",
        "application/protobuf",
        "application/x-protobuf",
        "application/vnd.google.protobuf",
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack",
        "application/cbor",
        "application/pdf",
        "application/xml",
        "application/yaml",
        CLOUDEVENTS_JSON,
        "text/*",
        "image/*",
        "audio/*",
        "video/*",
    }
)
#: Media types whose payloads may carry the Confluent wire prefix (magic byte + schema id).
_SCHEMA_FRAMED_SUFFIXES = ("avro", "protobuf", "json")


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message ready to append: full subject, payload as stored, NATS headers."""

    subject: str
    payload: bytes
    headers: dict[str, str]


#: Subjects found valid lately. A publish checks its subject twice (before reading the body,
#: and where the stored message is made), most go to a few subjects, and a set lookup costs
#: a tenth of the match (about 2 400 instructions, in a loaded ingress). The first ones kept,
#: as :data:`_ACCEPTED` keeps content types.
_VALID_SUBJECTS: set[str] = set()
_VALID_SUBJECTS_KEPT = 4096


def validate_subject(subject: str) -> str:
    """Check a client subject (``orders.created``): dot-separated tokens of ``[A-Za-z0-9_-]``.

    Wildcards (``*``, ``>``), empty tokens and whitespace are refused with
    :class:`InvalidSubject`, so a client can never publish outside its own namespace.
    """
    if subject in _VALID_SUBJECTS:
        return subject
    if len(subject) <= MAX_SUBJECT_LENGTH and _SUBJECT.fullmatch(subject):
        if len(_VALID_SUBJECTS) < _VALID_SUBJECTS_KEPT:
            _VALID_SUBJECTS.add(subject)
        return subject
    if not subject:
        raise InvalidSubject("subject is empty")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidSubject(f"subject is longer than {MAX_SUBJECT_LENGTH} characters")
    tokens = subject.split(".")
    if len(tokens) > MAX_SUBJECT_TOKENS:
        raise InvalidSubject(f"subject has more than {MAX_SUBJECT_TOKENS} tokens")
    for token in tokens:
        if not TOKEN.fullmatch(token):
            raise InvalidSubject(
                f"invalid subject token {token[:64]!r}: tokens are 1-64 characters of "
                "A-Z a-z 0-9 _ - separated by single dots (no wildcards or spaces)"
            )
    return subject


def message_subject(tenant: Tenant, subject: str) -> str:
    """The stored subject of a message: ``msg.<tenant>.<subject>``."""
    return f"msg.{tenant}.{validate_subject(subject)}"


def stored_msg_id(tenant: Tenant, key: str) -> str:
    """The ``Nats-Msg-Id`` of a message published with idempotency key ``key``."""
    return f"{tenant}:{key}"


def cloudevent_key(source: str, event_id: str) -> str:
    """The idempotency key of a CloudEvent sent without ``Idempotency-Key``.

    An event's ``id`` is unique only within its ``source`` (CloudEvents 1.0): two sources
    that number their events alike (``"1"``, ``"2"``, ...) send different events with the
    same id, and keyed by the id alone the second source's would be dropped as duplicates.
    So the key is ``ce:<BLAKE2b-64 of the source, hex>:<id>`` (a hash of both when that
    would be over the header limit)."""
    key = f"ce:{hashlib.blake2b(source.encode(), digest_size=8).hexdigest()}:{event_id}"
    if len(key) <= MAX_HEADER_VALUE_LENGTH:
        return key
    both = hashlib.blake2b(f"{source}\0{event_id}".encode(), digest_size=16).hexdigest()
    return f"ce:{both}"


def request_digest(subject: str, headers: Mapping[str, str], payload: bytes) -> str:
    """What identifies one request under its idempotency key: BLAKE2b (128 bits, hex) of the
    stored subject, ``Content-Type``, schema id and body. Trace context and CloudEvent
    attributes are left out: a retry may carry a new ``traceparent``."""
    fields = f"{subject}\0{headers.get(CONTENT_TYPE, '')}\0{headers.get(SCHEMA_ID, '')}\0"
    h = hashlib.blake2b(fields.encode(), digest_size=16)  # no field holds a NUL
    h.update(payload)
    return h.hexdigest()


def idempotency_key(tenant: str, msg_id: str) -> str:
    """The client's key of a stored ``Nats-Msg-Id`` (stored before keys were scoped: as is)."""
    return msg_id.removeprefix(f"{tenant}:")


def media_type(content_type: str | None) -> str:
    """The bare, lower-case media type of a ``Content-Type`` value (parameters dropped)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


#: Content-Type values already accepted, with what is stored for each: a fleet sends the
#: same few, and checking one is a dozen calls.
_ACCEPTED: dict[str, str] = {}
_ACCEPTED_KEPT = 256


def check_media_type(content_type: str | None) -> str:
    """The stored ``Content-Type`` for a single publish; 415 when it is not accepted.

    A missing ``Content-Type`` is stored as ``application/octet-stream``. Form encodings
    (what ``curl -d`` sends by default) are refused: they are almost always a client mistake.
    """
    if not content_type:
        return DEFAULT_CONTENT_TYPE
    stored = _ACCEPTED.get(content_type)
    if stored is None:
        stored = _check_media_type(content_type)
        if len(_ACCEPTED) < _ACCEPTED_KEPT:
            _ACCEPTED[content_type] = stored
    return stored


def _check_media_type(content_type: str) -> str:
    bare = media_type(content_type)
    kind, sep, sub = bare.partition("/")
    if not sep or not kind or not sub or any(c.isspace() for c in bare):
        raise UnsupportedMediaType(f"malformed Content-Type {content_type[:100]!r}")
    if (
        bare in ACCEPTED_MEDIA_TYPES
        or f"{kind}/*" in ACCEPTED_MEDIA_TYPES
        or sub.endswith(("+json", "+avro", "+protobuf", "+xml"))
    ):
        return content_type.strip()
    raise UnsupportedMediaType(
        f"Content-Type {bare!r} is not accepted; send application/json, "
        "application/octet-stream, text/*, image/*, audio/*, video/*, avro, protobuf, msgpack, "
        "cbor, pdf or CloudEvents"
    )


def _check_header_value(name: str, value: str) -> str:
    if len(value) > MAX_HEADER_VALUE_LENGTH:
        raise Unprocessable(f"{name} is longer than {MAX_HEADER_VALUE_LENGTH} characters")
    if _CONTROL.search(value):
        raise Unprocessable(f"{name} contains a control character")
    if value != value.strip(_HEADER_WHITESPACE):
        # NATS trims a header value: stored, "k " would become (and collide with) "k"
        raise Unprocessable(f"{name} starts or ends with whitespace")
    return value


def _bounded_int(value: str | int | None, maximum: int, error: str) -> int | None:
    """A non-negative integer from a header (decimal digits) or a JSON field; ``None`` if absent."""
    if value is None or value == "":
        return None
    digits = isinstance(value, str) and value.isascii() and value.isdigit()
    if not (digits or (isinstance(value, int) and not isinstance(value, bool))):
        raise Unprocessable(error)
    number = int(value)
    if not 0 <= number <= maximum:
        raise Unprocessable(error)
    return number


def parse_schema_id(value: str | int | None, *, field: str = "Schema-Id") -> int | None:
    """A schema id from a header or record field: a non-negative 32-bit integer."""
    return _bounded_int(value, 0x7FFFFFFF, f"{field} must be an integer from 0 to 2147483647")


#: The most digits a stream number is read from: JetStream's are 64-bit (20 digits), and
#: ``int()`` raises on a string of more than 4,300.
MAX_NUMBER_DIGITS = 20


def read_number(value: object) -> int | None:
    """A non-negative number as a header or a JSON field someone else wrote may hold it (a
    stream sequence, a count): an int, or at most 20 ASCII digits (``"\u00b2".isdigit()``
    holds and ``int`` refuses it); ``None`` for anything else. For reading, never refusing."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if (
        isinstance(value, str)
        and len(value) <= MAX_NUMBER_DIGITS
        and value.isascii()
        and value.isdigit()
    ):
        return int(value)
    return None


def stored_schema_id(headers: Mapping[str, str]) -> int | None:
    """The schema id a stored message carries (``Broker-Schema-Id``), if any. Reading
    tolerates a header it did not write (``None``); publishing validates what it writes."""
    raw = headers.get(SCHEMA_ID)
    return int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None


def parse_sequence(value: str | int | None, *, field: str) -> int | None:
    """A stream sequence from a header or record field: a non-negative 64-bit integer."""
    return _bounded_int(value, 2**64 - 1, f"{field} must be a non-negative 64-bit integer")


def wire_schema_id(content_type: str, payload: bytes) -> int | None:
    """The schema id in a Confluent-framed payload (``0x00`` + big-endian 4-byte id), if any.

    Only looked for in Avro, Protobuf and JSON media types: JSON text can never start with
    a zero byte, so there the frame is unambiguous; arbitrary binary media types are not
    inspected, since their first byte may be zero by chance.
    """
    if len(payload) < 5 or payload[0] != 0:
        return None
    bare = media_type(content_type)
    if not bare.endswith(_SCHEMA_FRAMED_SUFFIXES) and bare != "avro/binary":
        return None
    return int.from_bytes(payload[1:5], "big")


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """One logical publish, whichever way it arrived (path + headers, batch record, CE)."""

    subject: str
    payload: bytes
    content_type: str
    idempotency_key: str | None = None
    schema_id: int | None = None
    expected_last_subject_sequence: int | None = None
    extra_headers: Mapping[str, str] | None = None

    def to_outbound(self, tenant: Tenant) -> Outbound:
        """Validate and map to the stored message; raises a 4xx :class:`BrokerError`."""
        subject = message_subject(tenant, self.subject)
        headers: dict[str, str] = {
            CONTENT_TYPE: _check_header_value("Content-Type", self.content_type)
        }
        wire_id = wire_schema_id(self.content_type, self.payload)
        if self.schema_id is not None and wire_id is not None and wire_id != self.schema_id:
            if media_type(self.content_type).endswith("json"):  # JSON text never starts with 0
                raise Unprocessable(
                    f"Schema-Id {self.schema_id} disagrees with the payload's wire prefix {wire_id}"
                )
            # A raw binary body that starts with a zero byte and not with this id's prefix.
            wire_id = None
            headers[WIRE_PREFIX] = NO_WIRE_PREFIX
        if self.schema_id is not None:
            headers[SCHEMA_ID] = str(self.schema_id)
            headers[SCHEMA_ID_SOURCE] = "header"
        elif wire_id is not None:
            headers[SCHEMA_ID] = str(wire_id)
            headers[SCHEMA_ID_SOURCE] = "wire"
        if self.idempotency_key is not None:
            if not self.idempotency_key:
                raise Unprocessable("Idempotency-Key is empty")
            key = _check_header_value("Idempotency-Key", self.idempotency_key)
            # JetStream deduplicates across the whole stream: scoped to the tenant (a tenant
            # name has no ':'), one tenant's key neither swallows nor reveals another's
            headers[NATS_MSG_ID] = stored_msg_id(tenant, key)
            headers[REQUEST_DIGEST] = request_digest(subject, headers, self.payload)
        if self.expected_last_subject_sequence is not None:
            headers[NATS_EXPECTED_LAST_SUBJECT_SEQ] = str(self.expected_last_subject_sequence)
        if self.extra_headers:
            size = 0
            for name, value in self.extra_headers.items():
                headers[name] = _check_header_value(name, value)
                size += len(name) + len(value)
            if size > MAX_HEADERS_LENGTH:  # e.g. a CloudEvent's extension attributes
                raise Unprocessable(
                    f"the message's headers (CloudEvent attributes included) add up to {size} "
                    f"characters; at most {MAX_HEADERS_LENGTH} are stored"
                )
        return Outbound(subject, self.payload, headers)


# --- CloudEvents 1.0 -------------------------------------------------------------------

_CE_REQUIRED = ("id", "source", "specversion", "type")
_CE_ATTRIBUTE = re.compile(r"[a-z0-9]{1,20}")
#: Extension attribute naming the broker subject of a CloudEvent in a batch.
CE_SUBJECT_EXTENSION = "brokersubject"


def ce_headers_from_http(headers: Mapping[str, str]) -> dict[str, str] | None:
    """CloudEvents binary mode: the ``ce-*`` HTTP headers to store, or ``None`` if absent."""
    if "ce-specversion" not in headers:
        return None
    ce = {name: value for name, value in headers.items() if name.startswith("ce-")}
    _check_ce(ce.get("ce-" + attr) for attr in _CE_REQUIRED)
    if ce["ce-specversion"] != "1.0":
        raise Unprocessable(f"unsupported CloudEvents specversion {ce['ce-specversion'][:20]!r}")
    return {name: _check_header_value(name, value) for name, value in ce.items()}


def _check_ce(values: Any) -> None:
    missing = [attr for attr, value in zip(_CE_REQUIRED, values, strict=True) if not value]
    if missing:
        raise Unprocessable(f"CloudEvent lacks required attribute(s): {', '.join(missing)}")


def _ce_attr_value(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():  # JSON Schema: 126.0 is an integer
        value = int(value)
    if isinstance(value, int) and -(2**31) <= value < 2**31:
        return str(value)
    raise Unprocessable(
        f"CloudEvent attribute {name!r} must be a string, a 32-bit integer or a boolean"
    )


def cloudevent_to_request(
    event: Any,
    *,
    subject: str | None = None,
    default_subject: str | None = None,
    idempotency_key: str | None = None,
) -> PublishRequest:
    """A structured-mode CloudEvent (parsed JSON object) as a binary-mode publish.

    The event's ``data`` (JSON value, or bytes from ``data_base64``) becomes the payload,
    ``datacontenttype`` the ``Content-Type``, every other attribute a ``ce-*`` header.
    The subject is ``subject`` (a single publish's path), else the event's own
    ``brokersubject`` extension, else ``default_subject`` (a batch's ``?subject=``).
    """
    if not isinstance(event, dict):
        raise Unprocessable("a structured CloudEvent must be a JSON object")
    _check_ce(event.get(attr) for attr in _CE_REQUIRED)
    if event["specversion"] != "1.0":
        raise Unprocessable(
            f"unsupported CloudEvents specversion {str(event['specversion'])[:20]!r}"
        )
    if "data" in event and "data_base64" in event:
        raise Unprocessable("a CloudEvent has either data or data_base64, not both")
    content_type = event.get("datacontenttype")
    if content_type is not None and not isinstance(content_type, str):
        raise Unprocessable("datacontenttype must be a string")
    payload = _ce_data(event, content_type)
    if content_type is None:
        content_type = DEFAULT_CONTENT_TYPE if "data_base64" in event else "application/json"
    headers: dict[str, str] = {}
    for name, value in event.items():
        if name in {"data", "data_base64", "datacontenttype"}:
            continue
        if not _CE_ATTRIBUTE.fullmatch(name):
            raise Unprocessable(f"invalid CloudEvent attribute name {name[:30]!r}")
        headers["ce-" + name] = _ce_attr_value(name, value)
    target = subject or event.get(CE_SUBJECT_EXTENSION) or default_subject
    if not isinstance(target, str) or not target:
        raise Unprocessable(
            f"no subject: give ?subject= or the CloudEvent extension {CE_SUBJECT_EXTENSION!r}"
        )
    return PublishRequest(
        subject=target,
        payload=payload,
        content_type=check_media_type(content_type),
        idempotency_key=idempotency_key or cloudevent_key(headers["ce-source"], headers["ce-id"]),
        extra_headers=headers,
    )


def _ce_data(event: dict[str, Any], content_type: str | None) -> bytes:
    if "data_base64" in event:
        encoded = event["data_base64"]
        if not isinstance(encoded, str):
            raise Unprocessable("data_base64 must be a string")
        try:
            return b64.decode(encoded, validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
            raise Unprocessable("data_base64 is not valid base64") from None
    if "data" not in event:
        return b""
    data = event["data"]
    bare = media_type(content_type)
    if (
        isinstance(data, str)
        and bare
        and not (bare == "application/json" or bare.endswith("+json"))
    ):
        return data.encode()
    return _json_bytes(data)


# --- batch records ---------------------------------------------------------------------

_RECORD_FIELDS = frozenset(
    {
        "subject",
        "data",
        "data_base64",
        "content_type",
        "idempotency_key",
        "schema_id",
        "expected_last_subject_sequence",
    }
)


def record_to_request(record: Any, *, default_subject: str | None) -> PublishRequest:
    """One record of a JSON-array or NDJSON batch.

    ``{"subject", "data" | "data_base64", "content_type", "idempotency_key", "schema_id",
    "expected_last_subject_sequence"}``; ``data`` (any JSON value) is stored as its compact
    JSON encoding, ``data_base64`` as the decoded bytes.
    """
    if not isinstance(record, dict):
        raise Unprocessable("a batch record must be a JSON object")
    unknown = record.keys() - _RECORD_FIELDS
    if unknown:
        raise Unprocessable(f"unknown record field(s): {', '.join(sorted(unknown))[:200]}")
    subject = record.get("subject", default_subject)
    if not isinstance(subject, str):
        raise InvalidSubject("record has no subject (field 'subject' or ?subject=)")
    content_type = record.get("content_type")
    if content_type is not None and not isinstance(content_type, str):
        raise Unprocessable("content_type must be a string")
    if "data" in record and "data_base64" in record:
        raise Unprocessable("a record has either data or data_base64, not both")
    if "data_base64" in record:
        payload = _ce_data({"data_base64": record["data_base64"]}, None)
        content_type = content_type or DEFAULT_CONTENT_TYPE
    else:
        payload = _json_bytes(record.get("data"))
        content_type = content_type or "application/json"
    key = record.get("idempotency_key")
    if key is not None and not isinstance(key, str):
        raise Unprocessable("idempotency_key must be a string")
    return PublishRequest(
        subject=subject,
        payload=payload,
        content_type=check_media_type(content_type),
        idempotency_key=key,
        schema_id=parse_schema_id(record.get("schema_id"), field="schema_id"),
        expected_last_subject_sequence=parse_sequence(
            record.get("expected_last_subject_sequence"), field="expected_last_subject_sequence"
        ),
    )


def _json_bytes(value: Any) -> bytes:
    """Compact JSON of a parsed value (an integer past 64 bits, from :func:`loads_exact`,
    with all its digits); what JSON cannot carry (a lone surrogate) is a 422."""
    try:
        return orjson.dumps(value)
    except TypeError as e:
        raise Unprocessable(f"data cannot be stored as JSON: {e}") from None


def parse_json(body: bytes, *, what: str) -> Any:
    """Parse JSON (:func:`loads_exact`); malformed input is a 400 naming ``what``."""
    try:
        return loads_exact(body)
    except ValueError as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None


def passthrough_headers(headers: RequestHeaders) -> dict[str, str] | None:
    """The trace context (``traceparent``, ``tracestate``) carried from an HTTP request into
    the stored message, as :func:`~broker.telemetry.w3c.request_trace_headers` bounds it: a
    client's trace headers never refuse its message; one that does not parse is left out."""
    return request_trace_headers(headers)
