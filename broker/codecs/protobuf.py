"""Protobuf bodies, decoded with upb (``google.protobuf``) into proto3-JSON-shaped dicts.

The codec is built from the writer's :class:`~google.protobuf.descriptor.FileDescriptor`
(the caller builds it from the registry's FileDescriptorSet in a ``DescriptorPool``). A
Confluent body starts with the *message indexes* that say which message of the file it
holds: a zigzag varint count, then that many zigzag varints, each an index into the
top-level messages and then their nested types; a single ``0`` byte is ``[0]``, the first
message. The rest is parsed with ``ParseFromString`` and converted with
``json_format.MessageToDict(preserving_proto_field_name=True)``: int64 as strings, bytes
as base64, enums by name, well-known types in their JSON form -- the same values a JSON
reader of the stream would see.

A ``google.protobuf.Any`` is shown as the message it holds, with its ``@type``: the
``type_url`` is looked up in the schema's own pool (its file and the files it imports), and
one it names no message of is a :class:`DecodeError`. Each Any's value is a body of its own,
parsed again, so before the conversion a walk along the fields that can hold one refuses
Any values nested more than :data:`MAX_ANY_DEPTH` deep (each level would hold another copy
of the body) and unknown types; the values come back as plain dicts, like the rest.

Bounds: upb refuses messages nested more than :data:`UPB_MAX_DEPTH` levels (so a recursive
message 10 000 deep is a :class:`DecodeError`), and the dicts and lists of a value nest at
most twice as deep (a message in a repeated field is a dict in a list); the index array is
at most ``max_depth`` long and every index must name a message. The dict is walked only
when the body is long enough to hold a collection over ``max_collection_len`` (each
repeated item takes at least one byte), or for a ``max_depth`` stricter than upb's when the
message type can nest deeper than it (recursive or deep types), or can hold an Any.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

# protobuf ships no type information; without types-protobuf these are Any.
from google.protobuf import json_format, message_factory  # type: ignore[import-untyped]
from google.protobuf.descriptor import (  # type: ignore[import-untyped]
    Descriptor,
    FileDescriptor,
)
from google.protobuf.message import (  # type: ignore[import-untyped]
    DecodeError as ProtobufDecodeError,
)
from google.protobuf.message import Message

from broker.codecs.base import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    check_tree,
    describe,
    too_large,
)

__all__ = ["MAX_ANY_DEPTH", "UPB_MAX_DEPTH", "ProtobufCodec", "read_message_indexes"]

_ERRORS = (
    ProtobufDecodeError,
    json_format.Error,
    ValueError,
    TypeError,
    KeyError,
    RecursionError,
    MemoryError,
)
_MAX_VARINT_BYTES = 10
#: Message levels upb parses (the root and 100 nested in it); deeper is a DecodeError.
UPB_MAX_DEPTH: Final = 101
#: ``google.protobuf.Any`` values nested in one another at most this deep (or ``max_depth``).
MAX_ANY_DEPTH: Final = 16
_ANY: Final = "google.protobuf.Any"


def read_message_indexes(payload: bytes, max_count: int) -> tuple[tuple[int, ...], int]:
    """The Confluent message-index path at the start of ``payload``, and where the body starts.

    Raises :class:`DecodeError` for a truncated or negative varint, or a count over
    ``max_count``. A count of zero means ``(0,)``.
    """
    pos = 0

    def zigzag() -> int:
        nonlocal pos
        result = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            if pos >= len(payload):
                raise DecodeError("protobuf", "truncated message-index array")
            byte = payload[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (result >> 1) ^ -(result & 1)
            shift += 7
        raise DecodeError("protobuf", "message-index varint longer than 10 bytes")

    count = zigzag()
    if count == 0:
        return (0,), pos
    if not 0 < count <= max_count:
        raise DecodeError("protobuf", f"message-index count {count} out of range")
    return tuple(zigzag() for _ in range(count)), pos


def _may_nest_deeper(root: Descriptor, limit: int) -> bool:
    """Whether values of ``root`` can nest dicts/lists deeper than ``limit`` (or recurse)."""
    depth_of: dict[str, int] = {}
    open_types: set[str] = set()

    def depth(descriptor: Descriptor) -> int:
        name = descriptor.full_name
        if name in depth_of:
            return depth_of[name]
        if name in open_types:
            return limit + 1  # recursive: unbounded
        open_types.add(name)
        deepest = 0
        for field in descriptor.fields:
            inner = 0
            if field.message_type is not None:
                inner = depth(field.message_type)
            if field.is_repeated:
                inner += 1
            deepest = max(deepest, inner)
        open_types.discard(name)
        depth_of[name] = 1 + deepest
        return depth_of[name]

    return depth(root) > limit


def _can_hold_any(root: Descriptor) -> bool:
    """Whether a ``root`` value can hold a ``google.protobuf.Any`` (or is one)."""
    seen = {root.full_name}
    todo = [root]
    while todo:
        descriptor = todo.pop()
        if descriptor.full_name == _ANY:
            return True
        for field in descriptor.fields:
            inner = field.message_type
            if inner is not None and inner.full_name not in seen:
                seen.add(inner.full_name)
                todo.append(inner)
    return False


def _plain_dicts(value: Any) -> Any:
    """``value`` with json_format's OrderedDicts (the Any values) turned into dicts."""
    if type(value) is OrderedDict:
        value = dict(value)
    stack = [value]
    while stack:
        node = stack.pop()
        slots = node.items() if type(node) is dict else enumerate(node)
        for key, item in slots:
            kind = type(item)
            if kind is OrderedDict:
                node[key] = plain = dict(item)  # replaces a value: the size stays the same
                stack.append(plain)
            elif kind is dict or kind is list:
                stack.append(item)
    return value


@dataclass(frozen=True, slots=True)
class _Target:
    """A message class a body may hold, and what decoding one of its values takes."""

    cls: type[Message]
    #: Its values may nest past ``max_depth``: walk them (when the body is long enough).
    deep: bool
    #: Its values may hold a ``google.protobuf.Any``: check those before converting.
    holds_any: bool


class ProtobufCodec:
    """Decodes Confluent-framed protobuf bodies of any message in one file."""

    name = "protobuf"
    __slots__ = (
        "_any_depth",
        "_classes",
        "_first",
        "_holds_any",
        "_limits",
        "_max_bytes",
        "_pool",
        "_top",
        "_walk_above",
    )

    def __init__(self, file: FileDescriptor, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self._top: Sequence[Descriptor] = list(file.message_types_by_name.values())
        if not self._top:
            raise DecodeError("protobuf", f"schema {file.name!r} defines no message")
        self._limits = limits
        self._max_bytes = limits.max_payload_bytes
        self._pool = file.pool
        self._any_depth = min(MAX_ANY_DEPTH, limits.max_depth)
        self._holds_any: dict[str, bool] = {}
        self._classes: dict[tuple[int, ...], _Target] = {}
        self._walk_above = min(limits.max_collection_len, limits.max_total_items)
        self._first = self._message_class((0,))

    @property
    def limits(self) -> DecodeLimits:
        """The bounds this codec enforces."""
        return self._limits

    def _message_class(self, path: tuple[int, ...]) -> _Target:
        """The class at an index path, and what decoding its values takes."""
        found = self._classes.get(path)
        if found is not None:
            return found
        level: Sequence[Descriptor] = self._top
        descriptor: Descriptor | None = None
        for index in path:
            if not 0 <= index < len(level):
                raise DecodeError("protobuf", f"message index {list(path)} names no message")
            descriptor = level[index]
            level = descriptor.nested_types
        assert descriptor is not None  # path is never empty
        max_depth = self._limits.max_depth
        holds_any = self._can_hold_any(descriptor)
        found = _Target(
            message_factory.GetMessageClass(descriptor),
            holds_any
            or (max_depth < 2 * UPB_MAX_DEPTH and _may_nest_deeper(descriptor, max_depth)),
            holds_any,
        )
        if len(self._classes) < 1024:
            self._classes[path] = found
        return found

    def decode(self, payload: bytes) -> Any:
        """Parse one message; raise :class:`DecodeError` if it is invalid or over a limit."""
        size = len(payload)
        if size > self._max_bytes:
            raise too_large("protobuf", size, self._max_bytes)
        if not size:
            raise DecodeError("protobuf", "empty payload: the message-index array is missing")
        if payload[0] == 0:
            target = self._first
            body = payload[1:]
        else:
            path, start = read_message_indexes(payload, self._limits.max_depth)
            target = self._message_class(path)
            body = payload[start:]
        message = target.cls()
        try:
            message.ParseFromString(body)
            has_any = target.holds_any and self._check_anys(message)
            value = json_format.MessageToDict(
                message, preserving_proto_field_name=True, descriptor_pool=self._pool
            )
        except _ERRORS as exc:
            raise DecodeError("protobuf", describe(exc)) from exc
        if has_any:
            value = _plain_dicts(value)
        if (target.deep and size > self._limits.max_depth) or size > self._walk_above:
            check_tree("protobuf", value, self._limits)
        return value

    def _can_hold_any(self, descriptor: Descriptor) -> bool:
        name = descriptor.full_name
        found = self._holds_any.get(name)
        if found is None:
            found = self._holds_any[name] = _can_hold_any(descriptor)
        return found

    def _check_anys(self, message: Message) -> bool:
        """Whether ``message`` holds an Any with a value; :class:`DecodeError` for one that
        names a type outside the schema's pool, or Any values nested too deeply.

        Walks only the fields whose types can hold an Any, unpacking each Any's value the
        way ``MessageToDict`` will (so its parse errors surface here too)."""
        found = False
        stack: list[tuple[Message, int]] = [(message, 0)]
        while stack:
            node, level = stack.pop()
            if node.DESCRIPTOR.full_name == _ANY:
                if not node.ListFields():
                    continue  # shown as {}
                if level >= self._any_depth:
                    raise DecodeError(
                        "protobuf",
                        f"google.protobuf.Any values nested too deeply (over {self._any_depth})",
                    )
                inner = self._unpack(node)
                found = True
                if self._can_hold_any(inner.DESCRIPTOR):
                    stack.append((inner, level + 1))
                continue
            for field, value in node.ListFields():
                kind = field.message_type
                if kind is None or not self._can_hold_any(kind):
                    continue
                if not field.is_repeated:
                    stack.append((value, level))
                elif kind.GetOptions().map_entry:
                    stack.extend((item, level) for item in value.values())
                else:
                    stack.extend((item, level) for item in value)
        return found

    def _unpack(self, any_value: Message) -> Message:
        """The message an Any holds, its type looked up in the schema's pool."""
        type_url: str = any_value.type_url
        try:
            descriptor = self._pool.FindMessageTypeByName(type_url.rpartition("/")[2])
        except KeyError:
            raise DecodeError(
                "protobuf",
                f"google.protobuf.Any type_url {type_url[:100]!r} names no message of the schema",
            ) from None
        inner: Message = message_factory.GetMessageClass(descriptor)()
        inner.ParseFromString(any_value.value)
        return inner
