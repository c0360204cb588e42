"""MessagePack bodies (``application/msgpack``), decoded with msgpack's C unpacker.

With ``unpackb``'s defaults (msgpack 1.0 on: ``raw=False``, ``strict_map_key=True``)
strings must be UTF-8 and map keys strings or bytes, so a decoded value is always hashable
where it must be; one object per body, trailing bytes are an error. The bounds are enforced
by the unpacker itself wherever it can:

* **depth**: its fixed stack stops at :data:`MSGPACK_MAX_DEPTH` (1024) levels with a
  ``StackError``, the default ``max_depth``. Only a stricter ``max_depth`` costs a scan:
  a body of ``max_depth`` bytes or fewer cannot break it (every container takes a byte);
  for longer ones the bytes that could start a container (``0x80-0x9f``, ``0xdc-0xdf``)
  are counted in C (``bytes.translate``), and only if there are more than ``max_depth`` of
  them is the decoded value walked;
* **collection length**: ``unpackb`` refuses an array longer than the body and a map
  with more than half as many entries (its defaults), and string, binary and extension
  lengths over the body length, before allocating anything. Only a body longer than
  ``max_collection_len`` gets ``max_array_len`` / ``max_map_len`` passed explicitly (the
  keyword arguments cost 2-5 % of a small decode);
* **total items**: every item takes at least one byte, so only bodies longer than
  ``max_total_items`` are walked.
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

__all__ = ["MSGPACK_MAX_DEPTH", "MsgpackCodec"]

#: The C unpacker's fixed stack: deeper nesting raises ``msgpack.StackError``.
MSGPACK_MAX_DEPTH: Final = 1024

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
    __slots__ = ("_limits", "_max_bytes", "_max_depth", "_max_len", "_plain_up_to")

    def __init__(self, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._max_bytes = limits.max_payload_bytes
        self._max_depth = min(limits.max_depth, MSGPACK_MAX_DEPTH)
        self._max_len = limits.max_collection_len
        plain_up_to = min(limits.max_total_items, self._max_len, self._max_bytes)
        if self._max_depth < MSGPACK_MAX_DEPTH:
            plain_up_to = min(plain_up_to, self._max_depth)
        #: Bodies no longer than this break no bound that ``unpackb(body)`` does not enforce.
        self._plain_up_to = plain_up_to

    @property
    def limits(self) -> DecodeLimits:
        """The bounds this codec enforces."""
        return self._limits

    def decode(self, payload: bytes) -> Any:
        """Unpack ``payload``; raise :class:`DecodeError` if it is invalid or over a limit."""
        if len(payload) <= self._plain_up_to:  # the common case: the unpacker's checks suffice
            try:
                return msgpack.unpackb(payload)
            except _ERRORS as exc:
                raise DecodeError("msgpack", _reason(exc)) from exc
        return self._decode_checked(payload)

    def _decode_checked(self, payload: bytes) -> Any:
        """Decode a body long enough to break a bound that ``unpackb(body)`` does not enforce."""
        size = len(payload)
        if size > self._max_bytes:
            raise too_large("msgpack", size, self._max_bytes)
        try:
            value = msgpack.unpackb(
                payload,
                max_array_len=min(self._max_len, size),
                max_map_len=min(self._max_len, size // 2),
            )
        except _ERRORS as exc:
            raise DecodeError("msgpack", _reason(exc)) from exc
        depth = self._max_depth
        if size > self._limits.max_total_items or (
            depth < MSGPACK_MAX_DEPTH
            and size > depth
            and len(payload.translate(None, _NOT_CONTAINER)) > depth
        ):
            check_tree("msgpack", value, self._limits)
        return value


def _reason(exc: BaseException) -> str:
    if isinstance(exc, msgpack.StackError):
        return f"nested deeper than {MSGPACK_MAX_DEPTH} levels"
    return describe(exc)
