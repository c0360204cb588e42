"""MessagePack bodies (``application/msgpack``), decoded with msgpack's C unpacker.

``unpackb`` is given ``max_array_len`` / ``max_map_len`` of ``max_collection_len``, so a
hostile length header (``0xdd ffffffff``) is refused before anything is allocated; string,
binary and extension lengths are capped by the body length (msgpack's own default).
Strings must be UTF-8 and map keys strings or bytes (``strict_map_key``), so a decoded
value is always hashable where it must be.

Depth: msgpack's own stack stops at 1024 levels. Our lower ``max_depth`` holds by
construction for bodies of ``max_depth`` bytes or fewer (every container takes a byte);
for longer bodies the bytes that could start a container (``0x80-0x9f``, ``0xdc-0xdf``)
are counted in C, and only if there are more than ``max_depth`` of them is the decoded
value walked.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from broker.codecs.base import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    check_tree,
    describe,
    too_large,
)

__all__ = ["MsgpackCodec"]

_CONTAINER_BYTES: Final = frozenset(range(0x80, 0xA0)) | frozenset(range(0xDC, 0xE0))
#: ``bytes.translate`` deletes these, leaving only the bytes that may open a container.
_NOT_CONTAINER: Final = bytes(b for b in range(256) if b not in _CONTAINER_BYTES)
_ERRORS = (
    msgpack.ExtraData,
    msgpack.FormatError,
    msgpack.StackError,
    msgpack.OutOfData,
    msgpack.UnpackValueError,
    ValueError,
    TypeError,
    KeyError,
    OverflowError,
    RecursionError,
    MemoryError,
)


class MsgpackCodec:
    """Decodes one MessagePack object; trailing bytes are an error."""

    name = "msgpack"
    __slots__ = ("_limits", "_max_bytes", "_max_depth", "_max_len", "_walk_above")

    def __init__(self, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._max_bytes = limits.max_payload_bytes
        self._max_depth = limits.max_depth
        self._max_len = limits.max_collection_len
        #: Every item takes at least one byte: shorter bodies cannot break the total.
        self._walk_above = limits.max_total_items

    @property
    def limits(self) -> DecodeLimits:
        """The bounds this codec enforces."""
        return self._limits

    def decode(self, payload: bytes) -> Any:
        """Unpack ``payload``; raise :class:`DecodeError` if it is invalid or over a limit."""
        size = len(payload)
        if size > self._max_bytes:
            raise too_large("msgpack", size, self._max_bytes)
        try:
            value = msgpack.unpackb(
                payload,
                raw=False,
                max_array_len=self._max_len,
                max_map_len=self._max_len,
            )
        except _ERRORS as exc:
            raise DecodeError("msgpack", describe(exc)) from exc
        if size > self._max_depth and (
            size > self._walk_above
            or len(payload.translate(None, _NOT_CONTAINER)) > self._max_depth
        ):
            check_tree("msgpack", value, self._limits)
        return value
