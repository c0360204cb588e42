"""What every codec shares: the decode limits, the one error, the protocol, the media-type map.

Payloads are stored exactly as a client sent them; a reader decodes them on demand with
the writer's schema (schema-on-read). A :class:`Codec` turns the *body* of a payload (the
bytes after the Confluent wire prefix, if there was one) into Python values, and refuses
anything that would take unbounded time or memory with a one-line :class:`DecodeError`.

Bounds, the same for every codec (:class:`DecodeLimits`):

``max_payload_bytes``    bodies larger than this are refused before any parsing
``max_depth``            containers (objects, arrays, maps, records) nested deeper
``max_collection_len``   one array or map with more items
``max_total_items``      more items in all collections together

The defaults are chosen so that checking them costs nothing on the common path:

* ``max_depth`` defaults to 1024, the limit orjson and msgpack's C unpacker enforce
  themselves (and refuse in C, before Python sees a value). Every codec also stops at its
  library's own limit whatever ``max_depth`` says: about 100 message levels for upb, and
  :data:`~broker.codecs.avro.AVRO_MAX_DEPTH` for Avro, whose reader recurses in C. A
  stricter ``max_depth`` (say 64) is enforced by a scan that runs only then.
* a body of ``n`` bytes holds at most about ``n`` items (JSON and msgpack spend a byte on
  every item, Avro and Protobuf on every item that is not zero-width), so the size bound
  already bounds the item counts of small bodies; codecs walk a decoded value
  (:func:`check_tree`) only when the body is large enough, or its schema deep enough, for
  a limit to be reachable at all.

A consumer that re-encodes decoded values must handle its own limits: ``orjson.dumps``
refuses values nested more than 254 levels, so the replay API turns those into a
per-record ``decode_error`` and the SQL replicas read JSON with a ``max_depth`` of 64.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from broker.envelope import media_type, wire_schema_id

__all__ = [
    "DEFAULT_LIMITS",
    "Codec",
    "CodecKind",
    "DecodeError",
    "DecodeLimits",
    "check_size",
    "check_tree",
    "kind_for",
    "split_wire_prefix",
]

_MAX_REASON = 200
_WIRE_PREFIX_LEN = 5


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Hard bounds on what one decode may read, nest and allocate."""

    max_payload_bytes: int = 1024 * 1024
    #: orjson's and msgpack's own limit: bounds at or above it cost nothing to enforce.
    max_depth: int = 1024
    max_collection_len: int = 100_000
    max_total_items: int = 1_000_000


DEFAULT_LIMITS: Final = DecodeLimits()


class DecodeError(Exception):
    """A payload could not be decoded, or broke a :class:`DecodeLimits` bound.

    The message is one line: ``"<codec> payload could not be decoded: <reason>"``.
    """

    def __init__(self, codec: str, reason: str) -> None:
        lines = str(reason).strip().splitlines()
        self.codec = codec
        self.reason = (lines[0] if lines else "invalid payload")[:_MAX_REASON]
        self.message = f"{codec} payload could not be decoded: {self.reason}"
        super().__init__(self.message)


class Codec(Protocol):
    """Decodes a payload body (after the Confluent wire prefix) into Python values."""

    name: str

    def decode(self, payload: bytes) -> Any:
        """The decoded value; raises :class:`DecodeError` and nothing else."""
        ...


class CodecKind(StrEnum):
    """The codecs a media type can select."""

    JSON = "json"
    AVRO = "avro"
    PROTOBUF = "protobuf"
    MSGPACK = "msgpack"
    RAW = "raw"


_KIND_BY_MEDIA_TYPE: Final[dict[str, CodecKind]] = {
    "application/json": CodecKind.JSON,
    "application/avro": CodecKind.AVRO,
    "avro/binary": CodecKind.AVRO,
    "application/vnd.apache.avro+binary": CodecKind.AVRO,
    "application/x-protobuf": CodecKind.PROTOBUF,
    "application/protobuf": CodecKind.PROTOBUF,
    "application/vnd.google.protobuf": CodecKind.PROTOBUF,
    "application/msgpack": CodecKind.MSGPACK,
    "application/x-msgpack": CodecKind.MSGPACK,
    "application/vnd.msgpack": CodecKind.MSGPACK,
}


def kind_for(content_type: str | None) -> CodecKind:
    """The codec for a ``Content-Type`` value: ``*+json`` is JSON, anything unknown is raw."""
    bare = media_type(content_type)
    kind = _KIND_BY_MEDIA_TYPE.get(bare)
    if kind is not None:
        return kind
    if bare.endswith("+json"):
        return CodecKind.JSON
    return CodecKind.RAW


def split_wire_prefix(payload: bytes, content_type: str | None = None) -> tuple[int | None, bytes]:
    """Split a Confluent-framed payload (``0x00`` + big-endian uint32 id) into id and body.

    With a ``content_type`` the rule is the one publishing applied
    (:func:`broker.envelope.wire_schema_id`: only Avro, Protobuf and JSON media types are
    framed); without one, any payload of five or more bytes that starts with ``0x00`` is.
    Unframed payloads come back whole, with ``None`` as the id.
    """
    if content_type is None:
        if len(payload) < _WIRE_PREFIX_LEN or payload[0] != 0:
            return None, payload
        return int.from_bytes(payload[1:_WIRE_PREFIX_LEN], "big"), payload[_WIRE_PREFIX_LEN:]
    schema_id = wire_schema_id(content_type, payload)
    if schema_id is None:
        return None, payload
    return schema_id, payload[_WIRE_PREFIX_LEN:]


def too_large(codec: str, size: int, limit: int) -> DecodeError:
    """The error for a body over ``max_payload_bytes`` (codecs compare inline: hot path)."""
    return DecodeError(codec, f"payload is {size} bytes, over the {limit}-byte limit")


def check_size(codec: str, payload: bytes, limits: DecodeLimits) -> None:
    """Refuse a body over ``max_payload_bytes`` before anything parses it."""
    if len(payload) > limits.max_payload_bytes:
        raise too_large(codec, len(payload), limits.max_payload_bytes)


def check_tree(codec: str, value: Any, limits: DecodeLimits) -> None:
    """Walk a decoded value (dicts and lists) iteratively and enforce the collection limits.

    Raises :class:`DecodeError` when containers nest deeper than ``max_depth``, one
    collection holds more than ``max_collection_len`` items, or all of them together more
    than ``max_total_items``. Scalars are not visited beyond a type check.
    """
    if type(value) is not dict and type(value) is not list:
        return
    max_depth = limits.max_depth
    max_len = limits.max_collection_len
    budget = limits.max_total_items
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise DecodeError(codec, f"nested deeper than {max_depth} levels")
        size = len(node)
        if size > max_len:
            raise DecodeError(codec, f"a collection has {size} items, over {max_len}")
        budget -= size
        if budget < 0:
            raise DecodeError(codec, f"more than {limits.max_total_items} items in all")
        items = node.values() if type(node) is dict else node
        for item in items:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))


def describe(exc: BaseException) -> str:
    """A short reason for a library exception: its message, or its class name if empty."""
    text = str(exc).strip()
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    return text or type(exc).__name__
