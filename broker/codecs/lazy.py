"""The reading side of schema-on-read: pick a codec for a message, decode it only when asked.

:func:`codec_for` chooses the codec from the stored ``Content-Type`` (a registry dict keyed
by :class:`~broker.codecs.base.CodecKind`); Avro and Protobuf also need the writer's schema,
which the caller looks up by the message's schema id and passes in. Codecs are cheap to
call but not to build (schemas are parsed), so callers keep one per schema id.

:class:`LazyValue` holds a body and its codec; :class:`DecodedMessage` adds the stored
headers and position, and strips the Confluent wire prefix with the same rule publishing
applied. ``.value`` decodes on first access and caches the result -- or the
:class:`~broker.codecs.base.DecodeError`, which every later access raises again. Headers,
subject, sequence, content type and schema id never decode anything.

Both classes have a C implementation, ``broker.codecs._lazy`` (built by ``hatch_build.py``
when a C compiler is at hand), with the same behaviour: building a message and reading
``.value`` then run no Python code of ours besides the codec (the Python classes add about
0.4 us per message, a third of decoding a small JSON event; the C ones under 0.1 us).
Where the extension is not built, or ``BROKER_PURE_PYTHON=1`` is set, the Python classes
below are used; :data:`IMPLEMENTATION` says which (``"c"`` or ``"python"``), and
:data:`PyLazyValue` / :data:`PyDecodedMessage` are always the Python ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from google.protobuf.descriptor import FileDescriptor  # type: ignore[import-untyped]

from broker.codecs._accelerator import accelerator
from broker.codecs.avro import AvroCodec, AvroSchema
from broker.codecs.base import (
    DEFAULT_LIMITS,
    Codec,
    CodecKind,
    DecodeError,
    DecodeLimits,
    kind_for,
    split_wire_prefix,
)
from broker.codecs.json import JsonCodec
from broker.codecs.msgpack import MsgpackCodec
from broker.codecs.protobuf import ProtobufCodec
from broker.codecs.raw import RawCodec
from broker.envelope import CONTENT_TYPE, NO_WIRE_PREFIX, WIRE_PREFIX, stored_schema_id

__all__ = [
    "CODECS",
    "IMPLEMENTATION",
    "DecodedMessage",
    "LazyValue",
    "PyDecodedMessage",
    "PyLazyValue",
    "Schema",
    "codec_for",
]

#: A writer schema: Avro JSON (text or parsed) or a protobuf file.
Schema: TypeAlias = AvroSchema | FileDescriptor


def _json(schema: Schema | None, limits: DecodeLimits) -> Codec:
    return JsonCodec(limits=limits)


def _msgpack(schema: Schema | None, limits: DecodeLimits) -> Codec:
    return MsgpackCodec(limits=limits)


def _raw(schema: Schema | None, limits: DecodeLimits) -> Codec:
    return RawCodec(limits=limits)


def _avro(schema: Schema | None, limits: DecodeLimits) -> Codec:
    if schema is None or isinstance(schema, FileDescriptor):
        raise DecodeError("avro", "reading Avro needs the writer's Avro schema")
    return AvroCodec(schema, limits=limits)


def _protobuf(schema: Schema | None, limits: DecodeLimits) -> Codec:
    if not isinstance(schema, FileDescriptor):
        raise DecodeError("protobuf", "reading Protobuf needs the writer's FileDescriptor")
    return ProtobufCodec(schema, limits=limits)


#: How each kind of codec is built from an (optional) schema and the limits.
CODECS: Final[Mapping[CodecKind, Callable[[Schema | None, DecodeLimits], Codec]]] = {
    CodecKind.JSON: _json,
    CodecKind.AVRO: _avro,
    CodecKind.PROTOBUF: _protobuf,
    CodecKind.MSGPACK: _msgpack,
    CodecKind.RAW: _raw,
}


def codec_for(
    content_type: str | None,
    *,
    schema: Schema | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Codec:
    """The codec for a stored ``Content-Type``; Avro and Protobuf need the writer's schema.

    Raises :class:`DecodeError` when a schema is needed but missing, or does not parse.
    """
    return CODECS[kind_for(content_type)](schema, limits)


_UNSET: Final[Any] = object()
_WIRE_PREFIX_LEN = 5
#: Sorts above every body that could carry the wire prefix (those start with 0x00).
_ZERO_LED: Final = b"\x01"
#: Content-Type value -> whether its payloads may carry the wire prefix (bounded cache).
_FRAMED: dict[str, bool] = {}
_FRAMED_CACHE_SIZE = 256


def _framed(content_type: str | None) -> bool:
    """Whether publishing treated a zero-led payload of this media type as framed."""
    if content_type is None:
        return False
    framed = _FRAMED.get(content_type)
    if framed is None:
        framed = split_wire_prefix(b"\x00\x00\x00\x00\x00", content_type)[0] is not None
        if len(_FRAMED) < _FRAMED_CACHE_SIZE:
            _FRAMED[content_type] = framed
    return framed


def _strips_prefix(headers: Mapping[str, str]) -> bool:
    """Whether a stored message's zero-led body carries the Confluent prefix: its media type
    may be framed, and publishing did not mark it as a raw body (``Broker-Wire-Prefix``)."""
    return headers.get(WIRE_PREFIX) != NO_WIRE_PREFIX and _framed(headers.get(CONTENT_TYPE))


class _Failed:
    """A cached decode failure; private, so no decoded value can be mistaken for one."""

    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


# ``.value`` is the hot path of every reader: one slot holds "not yet", the value or the
# failure, ``__init__`` only stores its arguments, and the property calls the codec
# directly (no helper method in between). DecodedMessage repeats it with the prefix rule.


class LazyValue:
    """A body and the codec that reads it; ``.value`` decodes once, on first access."""

    __slots__ = ("_value", "codec", "payload")

    def __init__(self, payload: bytes, codec: Codec) -> None:
        self.payload = payload
        self.codec = codec
        self._value: Any = _UNSET

    @property
    def value(self) -> Any:
        """The decoded body; raises the (cached) :class:`DecodeError` if it does not decode."""
        value = self._value
        if value is _UNSET:
            try:
                value = self._value = self.codec.decode(self.payload)
            except DecodeError as exc:
                self._value = _Failed(exc)
                raise
        elif type(value) is _Failed:
            raise value.error.with_traceback(None)
        return value

    @property
    def decoded(self) -> bool:
        """Whether ``.value`` has been computed (or failed) already."""
        return self._value is not _UNSET

    @property
    def error(self) -> DecodeError | None:
        """The decode error, once ``.value`` has failed; ``None`` otherwise."""
        value = self._value
        return value.error if type(value) is _Failed else None


class DecodedMessage(LazyValue):
    """A stored message as a reader sees it: position and headers now, value when asked."""

    __slots__ = ("headers", "sequence", "subject")

    def __init__(
        self,
        payload: bytes,
        headers: Mapping[str, str],
        codec: Codec,
        *,
        subject: str | None = None,
        sequence: int | None = None,
    ) -> None:
        # Set directly rather than through super().__init__: this runs once per message.
        self.payload = payload
        self.codec = codec
        self._value = _UNSET
        self.headers = headers
        self.subject = subject
        self.sequence = sequence

    @property
    def value(self) -> Any:
        """The decoded body (without a Confluent prefix, by the rule publishing applied)."""
        value = self._value
        if value is _UNSET:
            body = self.payload
            # One bytes comparison: only an empty body or one led by 0x00 sorts below it.
            if body < _ZERO_LED and len(body) >= _WIRE_PREFIX_LEN and _strips_prefix(self.headers):
                body = body[_WIRE_PREFIX_LEN:]
            try:
                value = self._value = self.codec.decode(body)
            except DecodeError as exc:
                self._value = _Failed(exc)
                raise
        elif type(value) is _Failed:
            raise value.error.with_traceback(None)
        return value

    @property
    def content_type(self) -> str | None:
        """The stored ``Content-Type``."""
        return self.headers.get(CONTENT_TYPE)

    @property
    def schema_id(self) -> int | None:
        """The stored ``Broker-Schema-Id`` (from a header or the wire prefix at publish)."""
        return stored_schema_id(self.headers)


#: The pure-Python classes, whichever implementation :data:`LazyValue` and
#: :data:`DecodedMessage` name (tests run both).
PyLazyValue = LazyValue
PyDecodedMessage = DecodedMessage

#: Which implementation ``LazyValue`` and ``DecodedMessage`` are: the C extension or Python.
IMPLEMENTATION: Literal["c", "python"] = "python"

# Chosen once, when this module is imported. The type checker sees the Python classes (the
# stub of ``_lazy`` declares the same interface).
if not TYPE_CHECKING and (_c := accelerator()) is not None:
    DecodedMessage, LazyValue = _c.DecodedMessage, _c.LazyValue
    IMPLEMENTATION = "c"
