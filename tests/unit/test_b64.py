"""``broker.b64`` answers as the standard library's base64 does, on any text."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import b64

#: Base64's alphabet, its padding, and what a hand-written text may also hold.
_TEXT = st.text(
    alphabet=st.sampled_from(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" + " \n\r\t-_.é"
    ),
    max_size=40,
)


def _outcome(decode: object, text: str | bytes, validate: bool) -> bytes | type[Exception]:
    try:
        return decode(text, validate=validate)  # type: ignore[operator, no-any-return]
    except ValueError as e:  # binascii.Error is a ValueError
        return type(e)


@settings(max_examples=3000)
@given(text=_TEXT, validate=st.booleans(), as_bytes=st.booleans())
def test_decode_accepts_and_refuses_what_the_standard_library_does(
    text: str, validate: bool, as_bytes: bool
) -> None:
    given_text: str | bytes = text.encode() if as_bytes else text
    assert _outcome(b64.decode, given_text, validate) == _outcome(
        base64.b64decode, given_text, validate
    )


@settings(max_examples=500)
@given(data=st.binary(max_size=300))
def test_encode_is_the_standard_form(data: bytes) -> None:
    assert b64.encode(data) == base64.b64encode(data).decode()
    assert b64.decode(b64.encode(data), validate=True) == data


@pytest.mark.parametrize(
    ("text", "validate"),
    [
        ("QUJD=", True),  # past the padding: pybase64 refuses, the standard library not
        ("QUJD====", True),
        ("QUI=QUI=", False),  # padding inside an unvalidated text
    ],
)
def test_texts_pybase64_refuses_are_read_as_before(text: str, validate: bool) -> None:
    assert b64.decode(text, validate=validate) == base64.b64decode(text, validate=validate)


def test_a_large_payload_round_trips() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    text = b64.encode(data)
    assert text == base64.b64encode(data).decode()
    assert b64.decode(text) == data
