"""JSON bodies (``application/json``, ``*+json``), decoded with orjson under hard bounds
(an integer past 64 bits kept with its digits: :func:`broker.exactjson.loads_exact`).

orjson parses in C and refuses nesting deeper than :data:`ORJSON_MAX_DEPTH` (1024) by
itself, which is the default ``max_depth``: with the default limits a decode is the size
comparison and ``orjson.loads``, nothing else. The other bounds are checked only when they
are reachable:

* **depth**, only when ``max_depth`` is below orjson's limit (an operator's stricter
  bound). A body of ``2 * max_depth`` bytes or fewer cannot nest deeper (each level needs
  an opening and a closing byte); otherwise the ``[`` and ``{`` bytes are counted
  (``bytes.count`` for small bodies; for larger ones ``bytes.find``, which is memchr-fast
  and stops after ``max_depth`` of them): if there are no more than ``max_depth``, nesting
  cannot exceed it either, and only if there are more is the decoded value walked;
* **collection length and total items**: an item takes at least one byte and an item of
  a collection two (itself and a comma or the closing bracket), so a body of at most
  ``min(2 * max_collection_len, max_total_items)`` bytes cannot break either; only longer
  bodies (200 000 bytes with the defaults) are walked (:func:`~broker.codecs.base.check_tree`).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from broker.codecs.base import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    check_tree,
    describe,
    too_large,
)
from broker.exactjson import loads_exact

__all__ = ["ORJSON_MAX_DEPTH", "JsonCodec"]

#: orjson refuses deeper nesting itself ("depth limit exceeded"), in C.
ORJSON_MAX_DEPTH: Final = 1024

#: What orjson (and the walk) may raise on hostile input: all mapped to DecodeError.
_ERRORS = (orjson.JSONDecodeError, ValueError, TypeError, RecursionError, MemoryError)


class JsonCodec:
    """Decodes UTF-8 JSON text into dicts, lists and scalars."""

    name = "json"
    __slots__ = ("_limits", "_max_bytes", "_max_depth", "_plain_up_to", "_walk_above")

    def __init__(self, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._max_bytes = limits.max_payload_bytes
        self._max_depth = min(limits.max_depth, ORJSON_MAX_DEPTH)
        #: Bodies longer than this may hold a collection (or a total) over the limits.
        self._walk_above = min(2 * limits.max_collection_len, limits.max_total_items)
        check_above = self._walk_above
        if self._max_depth < ORJSON_MAX_DEPTH:
            check_above = min(check_above, 2 * self._max_depth)
        #: Bodies no longer than this break no bound that orjson does not enforce itself.
        self._plain_up_to = min(check_above, self._max_bytes)

    @property
    def limits(self) -> DecodeLimits:
        """The bounds this codec enforces."""
        return self._limits

    def decode(self, payload: bytes) -> Any:
        """Parse ``payload``; raise :class:`DecodeError` if it is invalid or over a limit."""
        if len(payload) <= self._plain_up_to:  # the common case: orjson's checks suffice
            try:
                return loads_exact(payload)
            except _ERRORS as exc:
                raise DecodeError("json", _reason(exc)) from exc
        return self._decode_checked(payload)

    def _decode_checked(self, payload: bytes) -> Any:
        """Decode a body long enough to break a bound that orjson does not enforce."""
        size = len(payload)
        if size > self._max_bytes:
            raise too_large("json", size, self._max_bytes)
        try:
            value = loads_exact(payload)
        except _ERRORS as exc:
            raise DecodeError("json", _reason(exc)) from exc
        depth = self._max_depth
        if size > self._walk_above or (
            depth < ORJSON_MAX_DEPTH and size > 2 * depth and _openers_over(payload, depth)
        ):
            check_tree("json", value, self._limits)
        return value


def _reason(exc: BaseException) -> str:
    if isinstance(exc, orjson.JSONDecodeError) and str(exc).startswith("depth limit"):
        return f"nested deeper than {ORJSON_MAX_DEPTH} levels"
    return describe(exc)


_OPEN_ARRAY, _OPEN_OBJECT = ord("["), ord("{")
#: Below this size counting is cheapest; above it, a few memchr scans that stop early are.
_COUNT_BELOW = 1024


def _openers_over(payload: bytes, limit: int) -> bool:
    """Whether ``payload`` holds more than ``limit`` ``[`` and ``{`` bytes in all."""
    if len(payload) < _COUNT_BELOW:
        return payload.count(_OPEN_ARRAY) + payload.count(_OPEN_OBJECT) > limit
    seen = 0
    for opener in (_OPEN_ARRAY, _OPEN_OBJECT):
        at = payload.find(opener)
        while at >= 0:
            seen += 1
            if seen > limit:
                return True
            at = payload.find(opener, at + 1)
    return False
