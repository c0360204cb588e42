"""HTTP/2 client tuning for large answers, for every h2 client of this process.

Reading a replay of 200 kB records, the client spent most of its time per HTTP/2 frame, not
per byte: h2 and httpcore do a few dozen Python calls for each frame, and frames were the
protocol's default 16 kB. Two changes, both installed by :func:`install` (which
``broker.client`` calls on import), each left out where the library is not as expected:

- **Larger frames.** A client-side connection that still has the protocol's default
  ``SETTINGS_MAX_FRAME_SIZE`` when it sends its first SETTINGS advertises :data:`FRAME_SIZE`
  instead, and takes frames that large: the server then sends a 200 kB record in one frame
  rather than thirteen. A connection given its own value keeps it; server-side connections
  are untouched. The protocol lets either side ask for this (RFC 9113, section 6.5.2).
- **A cheaper frame text.** h2 writes each frame it receives into its trace log as
  ``repr(frame)``, and builds that text whether or not anything logs it
  (``H2Connection._receive_frame``). hyperframe's text shows the first 10 bytes of a
  frame's body in hex, but hexlified the whole body first. The function put in its place
  hexlifies the bytes it shows and no more; its text is the same for every body.
"""

from __future__ import annotations

import binascii
import functools
from collections.abc import Callable
from typing import Any

import h2.connection
import h2.settings
import hyperframe.frame

#: The largest frame a client connection asks for (the protocol allows up to 16 MiB - 1).
FRAME_SIZE = 1024 * 1024
#: What a connection advertises unless told otherwise (RFC 9113).
_DEFAULT_FRAME_SIZE = 16 * 1024
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


def _install_frame_text() -> bool:
    original = getattr(hyperframe.frame, "_raw_data_repr", None)
    if original is _raw_data_repr:
        return True
    if original is None or any(original(p) != _raw_data_repr(p) for p in _PROBES):
        return False
    hyperframe.frame._raw_data_repr = _raw_data_repr
    return True


def _with_larger_frames(settings: h2.settings.Settings) -> h2.settings.Settings:
    """``settings`` with :data:`FRAME_SIZE` as the frame size, and no setting it lacked
    (httpcore leaves ``ENABLE_CONNECT_PROTOCOL`` out: some servers refuse it)."""
    values: dict[Any, int] = dict(settings.items())
    values[h2.settings.SettingCodes.MAX_FRAME_SIZE] = FRAME_SIZE
    larger = h2.settings.Settings(client=True, initial_values=values)
    for code in [code for code in larger if code not in values]:
        del larger[code]
    return larger


def _install_larger_frames() -> bool:
    connection = h2.connection.H2Connection
    original: Callable[[Any], None] = connection.initiate_connection
    if getattr(original, "_broker_larger_frames", False):
        return True
    probe = h2.settings.Settings(client=True)
    if probe.max_frame_size != _DEFAULT_FRAME_SIZE:
        return False

    @functools.wraps(original)
    def initiate_connection(self: h2.connection.H2Connection) -> None:
        if (
            self.config.client_side
            and self.local_settings.max_frame_size == _DEFAULT_FRAME_SIZE
            and self.max_inbound_frame_size == _DEFAULT_FRAME_SIZE
        ):
            # Both at once: what the SETTINGS frame below says, and what is taken.
            self.local_settings = _with_larger_frames(self.local_settings)
            self.max_inbound_frame_size = FRAME_SIZE
        original(self)

    initiate_connection._broker_larger_frames = True  # type: ignore[attr-defined]
    connection.initiate_connection = initiate_connection  # type: ignore[method-assign]
    return True


def install() -> bool:
    """Put both changes in place (once); whether both are."""
    frame_text = _install_frame_text()
    return _install_larger_frames() and frame_text
