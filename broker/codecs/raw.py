"""Opaque bodies (any media type without a codec): the bytes, as stored.

Nothing is parsed, so the only bound that applies is ``max_payload_bytes``; it is still
enforced so that every codec refuses the same oversized bodies.
"""

from __future__ import annotations

from broker.codecs.base import DEFAULT_LIMITS, DecodeLimits, check_size

__all__ = ["RawCodec"]


class RawCodec:
    """Returns the body unchanged."""

    name = "raw"
    __slots__ = ("_limits",)

    def __init__(self, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits

    @property
    def limits(self) -> DecodeLimits:
        """The bounds this codec enforces."""
        return self._limits

    def decode(self, payload: bytes) -> bytes:
        """``payload`` itself; :class:`~broker.codecs.base.DecodeError` if it is too large."""
        check_size("raw", payload, self._limits)
        return bytes(payload)
