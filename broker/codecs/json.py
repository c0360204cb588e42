"""JSON bodies (``application/json``, ``*+json``), decoded with orjson under hard bounds.

orjson parses in C and stops at 1024 levels of nesting by itself; our lower limits are
enforced without slowing the common case:

* a body of ``2 * max_depth`` bytes or fewer cannot nest deeper than ``max_depth`` (each
  level needs an opening and a closing byte), so nothing is checked;
* otherwise the ``[`` and ``{`` bytes are counted (``bytes.count`` for small bodies; for
  larger ones ``bytes.find``, which is memchr-fast and stops after ``max_depth`` of them):
  if there are no more than ``max_depth``, nesting cannot exceed it either;
* only when there are more, or the body is large enough to hold a collection over
  ``max_collection_len`` (every item takes at least two bytes), is the decoded value
  walked (:func:`~broker.codecs.base.check_tree`).
"""

from __future__ import annotations

from typing import Any

import orjson

from broker.codecs.base import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    check_tree,
    describe,
    too_large,
)

__all__ = ["JsonCodec"]

#: What orjson (and the walk) may raise on hostile input: all mapped to DecodeError.
_ERRORS = (orjson.JSONDecodeError, ValueError, TypeError, RecursionError, MemoryError)


class JsonCodec:
    """Decodes UTF-8 JSON text into dicts, lists and scalars."""

    name = "json"
    __slots__ = ("_limits", "_max_bytes", "_max_depth", "_shallow_below", "_walk_above")

    def __init__(self, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._max_bytes = limits.max_payload_bytes
        self._max_depth = limits.max_depth
        #: Bodies no longer than this cannot break the depth limit.
        self._shallow_below = 2 * limits.max_depth
        #: Bodies longer than this may hold a collection (or a total) over the limits.
        self._walk_above = min(2 * limits.max_collection_len, limits.max_total_items)

    @property
    def limits(self) -> DecodeLimits:
        """The bounds this codec enforces."""
        return self._limits

    def decode(self, payload: bytes) -> Any:
        """Parse ``payload``; raise :class:`DecodeError` if it is invalid or over a limit."""
        size = len(payload)
        if size > self._max_bytes:
            raise too_large("json", size, self._max_bytes)
        try:
            value = orjson.loads(payload)
        except _ERRORS as exc:
            raise DecodeError("json", describe(exc)) from exc
        if size > self._shallow_below and (
            size > self._walk_above or _openers_over(payload, self._max_depth)
        ):
            check_tree("json", value, self._limits)
        return value


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
