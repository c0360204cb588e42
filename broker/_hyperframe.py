"""A cheaper debug text for HTTP/2 frames, for every client of this process.

h2 writes each frame it receives into its trace log as ``repr(frame)``, and builds that
text whether or not anything logs it (``H2Connection._receive_frame``). hyperframe's text
shows the first 10 bytes of a frame's body in hex, but hexlifies the whole body first: 32 kB
of text for every 16 kB data frame, thrown away. Reading a replay of large payloads spent a
quarter of the client's time there.

:func:`install` puts a function in its place that hexlifies the bytes it shows and no more;
its text is the same for every body. It does nothing when hyperframe's function is not the
one it replaces (a later release, or already replaced) and gives the same text on a probe.
"""

from __future__ import annotations

import binascii

import hyperframe.frame

#: The hex digits hyperframe shows of a body before ``...``.
_SHOWN = 20


def _raw_data_repr(data: bytes | None) -> str:
    if not data:
        return "None"
    # One byte past the shown ones: hyperframe adds "..." when the hex is longer than shown.
    text = binascii.hexlify(data[: _SHOWN // 2 + 1]).decode("ascii")
    if len(text) > _SHOWN:
        text = text[:_SHOWN] + "..."
    return "<hex:" + text + ">"


_PROBES = (None, b"", b"\x00", b"0123456789", b"0123456789a", bytes(range(256)) * 3)


def install() -> bool:
    """Replace hyperframe's body text with :func:`_raw_data_repr`; whether it is in place."""
    original = getattr(hyperframe.frame, "_raw_data_repr", None)
    if original is _raw_data_repr:
        return True
    if original is None or any(original(p) != _raw_data_repr(p) for p in _PROBES):
        return False
    hyperframe.frame._raw_data_repr = _raw_data_repr
    return True
