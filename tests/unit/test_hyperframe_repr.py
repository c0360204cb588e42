"""``broker._hyperframe``: a frame's debug text as hyperframe writes it, without
hexlifying the whole body."""

from __future__ import annotations

import binascii

import hyperframe.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import _hyperframe


def _hyperframes_own(data: bytes | None) -> str:
    """hyperframe 6.1's function, as it reads (the one :func:`install` replaces)."""
    if not data:
        return "None"
    text = binascii.hexlify(data).decode("ascii")
    if len(text) > 20:
        text = text[:20] + "..."
    return "<hex:" + text + ">"


@given(data=st.one_of(st.none(), st.binary(max_size=64)))
def test_the_text_is_hyperframes(data: bytes | None) -> None:
    assert _hyperframe._raw_data_repr(data) == _hyperframes_own(data)


def test_installed_by_the_client_and_frames_read_as_before() -> None:
    import broker.client  # noqa: F401  (installs it)

    assert hyperframe.frame._raw_data_repr is _hyperframe._raw_data_repr
    frame = hyperframe.frame.DataFrame(1, data=b"\x01" * 16384)
    assert repr(frame) == "DataFrame(stream_id=1, flags=[]): <hex:01010101010101010101...>"


def test_left_alone_when_hyperframe_writes_another_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", lambda data: f"<{len(data or b'')}>")
    assert _hyperframe.install() is False
    assert hyperframe.frame._raw_data_repr(b"abc") == "<3>"
