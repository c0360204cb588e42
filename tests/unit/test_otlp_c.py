"""The C encoder of finished spans (``broker.codecs._lazy.encode_otlp_spans``) writes the
bytes the Python encoder writes, for every span: the ones it takes itself (no events,
plain attribute values) and the ones it hands back (anything else)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.telemetry import _otlp
from broker.telemetry._spans import FinishedSpan

pytestmark = pytest.mark.unit

try:
    from broker.codecs._lazy import encode_otlp_spans
except ImportError:  # pragma: no cover - the accelerator is built wherever CI runs
    encode_otlp_spans = None

requires_c = pytest.mark.skipif(encode_otlp_spans is None, reason="broker.codecs._lazy not built")

U64 = st.integers(0, 2**64 - 1)
plain = (
    st.text(max_size=20)
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.integers(-(2**80), 2**80)  # past int64: masked to 64 bits, as the Python encoder does
    | st.floats(allow_nan=True)
    | st.binary(max_size=300)  # past 127 bytes: a two-byte length
)
other = st.lists(plain, max_size=3) | st.dictionaries(st.text(min_size=1), plain, max_size=2)


@st.composite
def finished(draw: st.DrawFn, values: st.SearchStrategy[Any] = plain) -> FinishedSpan:
    pairs = draw(st.lists(st.tuples(st.text(max_size=200), values), max_size=6))
    events = draw(st.none() | st.just((("retry", 1_700_000_000_000_000_000, {"attempt": 2}, 0),)))
    status = draw(st.sampled_from([0, 1, 2]))
    return (
        draw(st.text(max_size=150)),  # name
        draw(st.integers(0, 2**128 - 1)),  # trace id
        draw(U64),  # span id
        draw(st.sampled_from([0, 1, 2**64 - 1]) | U64),  # parent id, 0 for a root
        draw(st.booleans()),  # parent remote
        draw(st.none() | st.text(max_size=40)),  # tracestate
        draw(st.integers(0, 4)),  # kind
        draw(U64),  # start
        draw(U64),  # end
        draw(st.sampled_from([0, 0, 3, 300])),  # dropped attributes
        events,
        status,
        draw(st.none() | st.text(max_size=30)) if status == 2 else None,
        *(item for pair in pairs for item in pair),
    )


def python(spans: list[FinishedSpan]) -> bytes:
    return b"".join(map(_otlp._span, spans))


def c(spans: list[FinishedSpan]) -> bytes:
    assert encode_otlp_spans is not None
    result: bytes = encode_otlp_spans(spans, _otlp._span)
    return result


@requires_c
@settings(max_examples=400, deadline=None)
@given(st.lists(finished(), max_size=4))
def test_plain_spans_encode_to_the_same_bytes(spans: list[FinishedSpan]) -> None:
    assert c(spans) == python(spans)


@requires_c
@settings(max_examples=150, deadline=None)
@given(st.lists(finished(plain | other), max_size=4))
def test_spans_left_to_python_encode_to_the_same_bytes(spans: list[FinishedSpan]) -> None:
    assert c(spans) == python(spans)


@requires_c
@pytest.mark.parametrize(
    "bad",
    [
        -1,  # a negative trace id
        2**128,  # a trace id past 128 bits
        "abc",  # not an int
    ],
)
def test_a_span_the_python_encoder_refuses_raises_the_same(bad: Any) -> None:
    span = ("s", bad, 1, 0, False, None, 1, 0, 0, 0, None, 0, None)
    with pytest.raises(Exception) as by_python:  # noqa: PT011 - whichever it raises
        python([span])
    with pytest.raises(type(by_python.value)):
        c([span])


@requires_c
@pytest.mark.parametrize(
    "field", [2, 3, 7, 8, 9], ids=["span", "parent", "start", "end", "dropped"]
)
@pytest.mark.parametrize(
    "value", [0, 1, 2**30, 2**62, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]
)
def test_unsigned_fields_at_the_64_bit_bounds_encode_to_the_same_bytes(
    field: int, value: int
) -> None:
    span = list(span_of(3))
    span[field] = value
    assert c([tuple(span)]) == python([tuple(span)])


@requires_c
@pytest.mark.parametrize(
    "field", [2, 3, 7, 8, 9], ids=["span", "parent", "start", "end", "dropped"]
)
@pytest.mark.parametrize("value", [-1, -(2**63), -(2**63) - 1, -(2**64), 2**64, 2**64 + 1, 2**90])
def test_unsigned_fields_out_of_range_do_what_python_does(field: int, value: int) -> None:
    """Raise what the Python encoder raises, or (a dropped count, which it writes as a
    varint of any size) write the same bytes."""
    plain = span_of(3)
    spans = [(*plain[:field], value, *plain[field + 1 :])]
    try:
        expected = python(spans)
    except Exception as e:  # whichever it raises
        with pytest.raises(type(e)):
            c(spans)
    else:
        assert c(spans) == expected


@requires_c
def test_the_exporter_uses_the_c_encoder_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Set here both ways, not read from the environment the suite runs in (CI may run it
    # all with BROKER_PURE_PYTHON=1).
    monkeypatch.setenv("BROKER_PURE_PYTHON", "1")
    assert _otlp._encoder() is _otlp._spans_in_python
    monkeypatch.delenv("BROKER_PURE_PYTHON")
    encoder = _otlp._encoder()
    assert encoder is not _otlp._spans_in_python
    span = ("s", 5, 1, 0, False, None, 1, 0, 0, 0, None, 0, None, "k", "v")
    assert encoder([span]) == python([span])


def span_of(size: int, name: str = "s") -> FinishedSpan:
    """A plain span with one attribute of ``size`` bytes."""
    return (name, 5, 1, 0, False, None, 1, 0, 0, 0, None, 0, None, "k", "v" * size)


@requires_c
@pytest.mark.parametrize(
    "sizes",
    [
        [0],  # a span under 128 bytes: a one-byte length, the span moved back
        [20_000],  # past 16 383 bytes: a three-byte length, the span moved on
        [0, 200, 20_000, 0, 300_000, 5],  # mixed, and past the room the batch started with
        [100] * 3000,  # many: the batch grows past its first room
    ],
    ids=["small", "large", "mixed", "many"],
)
def test_spans_of_every_length_size_encode_to_the_same_bytes(sizes: list[int]) -> None:
    c([span_of(0)] * 50)  # the next batch starts with room for spans of this size
    spans = [span_of(size, name=f"s{i}") for i, size in enumerate(sizes)]
    assert c(spans) == python(spans)
    mixed = [*spans, ("s", 5, 1, 0, False, None, 1, 0, 0, 0, None, 0, None, "k", [1, 2])]
    assert c(mixed) == python(mixed)  # the last one by the Python encoder, after the C ones


@requires_c
def test_a_batch_after_one_of_huge_spans_starts_with_bounded_room() -> None:
    c([span_of(2_000_000)])  # two megabytes a span, last time
    spans = [span_of(0)] * 2000
    tracemalloc.start()
    try:
        encoded = c(spans)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert encoded == python(spans)
    assert peak < 32 * 1024 * 1024  # not 2000 times two megabytes


def test_an_empty_batch_is_no_bytes() -> None:
    assert _otlp._encode_spans([]) == b""


class Reordered(tuple[Any, ...]):
    def __getitem__(self, key: Any) -> Any:
        return tuple(reversed(self))[key]


class ShiftedInt(int):
    def __rshift__(self, other: object) -> int:
        return 0


class LoudStr(str):
    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return b"loud"


@requires_c
@pytest.mark.parametrize(
    "odd",
    [
        ("trace", ShiftedInt(2**100 + 7)),
        ("value", LoudStr("quiet")),
        ("value", ShiftedInt(5)),
        ("name", LoudStr("POST /x")),
    ],
    ids=["int-subclass-id", "str-subclass-value", "int-subclass-value", "str-subclass-name"],
)
def test_subclasses_are_left_to_the_python_encoder(odd: tuple[str, Any]) -> None:
    """A subclass may override what the Python encoder calls (``>>``, ``encode``): its span
    is encoded by Python, so the bytes are what Python makes of it."""
    field, value = odd
    span: list[Any] = ["POST /x", 5, 1, 0, False, None, 1, 0, 0, 0, None, 0, None, "k", "v"]
    if field == "trace":
        span[1] = value
    elif field == "name":
        span[0] = value
    else:
        span[-1] = value
    assert c([tuple(span)]) == python([tuple(span)])


@requires_c
def test_python_code_run_on_the_way_cannot_free_the_spans_being_encoded() -> None:
    def batch(into: list[Any]) -> list[Any]:
        class Clears:
            def __bool__(self) -> bool:  # the Python encoder asks whether it is remote
                into.clear()
                return False

        into[:] = [
            ("a", 1, 2, 0, Clears(), None, 1, 0, 0, 0, None, 0, None, "k", "v" * 1000),
            ("b", 1, 3, 0, False, None, 1, 0, 0, 0, None, 0, None, "k", "w" * 1000),
        ]
        return into

    expected = python(list(batch([])))
    spans = batch([])
    assert c(spans) == expected
    assert spans == []  # the fallback's Python code did clear the caller's list


@requires_c
def test_a_tuple_subclass_is_left_to_the_python_encoder() -> None:
    span = ("s", 5, 1, 0, False, None, 1, 0, 0, 0, None, 0, None)
    odd = Reordered(span)
    with pytest.raises(Exception) as by_python:  # noqa: PT011 - whatever Python makes of it
        python([odd])
    with pytest.raises(type(by_python.value)):
        c([odd])
