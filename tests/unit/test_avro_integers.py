"""Avro integers are held to the spec: an ``int`` in 5 bytes and 32 bits, a ``long`` in 10
and 64. fastavro alone reads any length of varint and keeps 64 bits of it, so these bodies
decoded to numbers their writer never wrote.

The check runs in C (``broker.codecs._lazy.check_avro``) where the accelerator is built and
in Python otherwise; both are tested here, and held to each other on arbitrary bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.codecs import AVRO_MAX_DEPTH, AvroCodec, DecodeError, _avrocheck
from tests.unit.test_codecs import zigzag_varint

pytestmark = pytest.mark.unit

try:
    from broker.codecs._lazy import check_avro as c_check
except ImportError:  # pragma: no cover - the accelerator is built wherever CI runs
    c_check = None

requires_c = pytest.mark.skipif(c_check is None, reason="broker.codecs._lazy is not built")
Checker = Callable[[bytes, bytes, int], "tuple[int, str] | None"]
CHECKERS: list[Any] = [
    pytest.param(_avrocheck.check, id="python"),
    pytest.param(c_check, id="c", marks=requires_c),
]

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def program(schema: Any) -> bytes:
    """The compiled program of ``schema``, as the codec builds it."""
    codec = AvroCodec(schema)
    return codec._program  # type: ignore[attr-defined,no-any-return]


def written(schema: Any, datum: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), datum)
    return out.getvalue()


def overlong(value: int, length: int) -> bytes:
    """``value`` as a zigzag varint padded with continuation bytes to ``length`` bytes
    (valid Avro up to 5 bytes for an int and 10 for a long)."""
    raw = zigzag_varint(value)
    if len(raw) >= length:
        return raw
    body = bytearray(raw)
    body[-1] |= 0x80
    body += b"\x80" * (length - len(raw) - 1) + b"\x00"
    return bytes(body)


# --- the spec's edges, through the codec -----------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1, *INT32])
def test_every_int_in_32_bits_decodes(value: int) -> None:
    assert AvroCodec('"int"').decode(written("int", value)) == value
    assert AvroCodec('"int"').decode(overlong(value, 5)) == value  # padded: still valid


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**32, 2**40, *INT64])
def test_an_int_outside_32_bits_is_refused(value: int) -> None:
    body = zigzag_varint(value)
    with pytest.raises(DecodeError) as caught:
        AvroCodec('"int"').decode(body)
    reason = "more than 5 bytes" if len(body) > 5 else "outside the 32-bit range"
    assert reason in str(caught.value)
    assert AvroCodec('"long"').decode(body) == value  # the same bytes are a fine long


def test_an_int_of_six_bytes_is_refused_even_when_its_value_is_small() -> None:
    with pytest.raises(DecodeError, match="an int takes more than 5 bytes"):
        AvroCodec('"int"').decode(overlong(3, 6))


@pytest.mark.parametrize("value", [0, -1, *INT64])
def test_every_long_in_64_bits_decodes(value: int) -> None:
    assert AvroCodec('"long"').decode(written("long", value)) == value
    assert AvroCodec('"long"').decode(overlong(value, 10)) == value


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff" * 9 + b"\x03", "outside the 64-bit range"),  # 2 more bits than 64
        (b"\xff" * 9 + b"\x7f", "outside the 64-bit range"),
        (b"\xff" * 10 + b"\x01", "more than 10 bytes"),
        (b"\x80" * 20 + b"\x00", "more than 10 bytes"),  # zero, padded far past the bound
    ],
)
def test_a_long_past_64_bits_or_10_bytes_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        AvroCodec('"long"').decode(body)


RECORD = {
    "type": "record",
    "name": "Reading",
    "namespace": "iot",
    "fields": [
        {"name": "device", "type": "string"},
        {"name": "count", "type": "int"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "level", "type": {"type": "enum", "name": "Level", "symbols": ["LOW", "HIGH"]}},
        {"name": "tags", "type": {"type": "map", "values": "int"}},
        {"name": "values", "type": {"type": "array", "items": ["null", "int", "double"]}},
    ],
}


def reading_body(*, count: bytes, tag: bytes, item: bytes, device: bytes = b"\x02a") -> bytes:
    """A ``Reading`` written by hand, so each integer's bytes can be chosen."""
    return (
        device  # "a"
        + count
        + zigzag_varint(1_700_000_000_000_000)  # at: a 9-byte long
        + zigzag_varint(1)  # level: HIGH
        + zigzag_varint(1)
        + b"\x02k"
        + tag
        + zigzag_varint(0)  # tags: {"k": tag}
        + zigzag_varint(1)
        + zigzag_varint(1)
        + item
        + zigzag_varint(0)  # values: [item]
    )


def test_integers_anywhere_in_a_record_are_checked_by_their_own_type() -> None:
    codec = AvroCodec(RECORD)
    good = reading_body(count=zigzag_varint(19_000), tag=zigzag_varint(-5), item=zigzag_varint(7))
    value = codec.decode(good)
    assert value["tags"] == {"k": -5}
    assert value["values"] == [7]
    assert value["level"] == "HIGH"
    for bad in (
        reading_body(count=zigzag_varint(2**31), tag=zigzag_varint(0), item=zigzag_varint(0)),
        reading_body(count=zigzag_varint(0), tag=zigzag_varint(2**33), item=zigzag_varint(0)),
        reading_body(count=zigzag_varint(0), tag=zigzag_varint(0), item=zigzag_varint(-(2**32))),
    ):
        assert fastavro.schemaless_reader(io.BytesIO(bad), fastavro.parse_schema(RECORD), None)
        with pytest.raises(DecodeError, match="an int is outside the 32-bit range"):
            codec.decode(bad)


def test_the_error_names_the_offending_integers_byte() -> None:
    body = reading_body(count=zigzag_varint(0), tag=zigzag_varint(2**33), item=zigzag_varint(0))
    offset = len(b"\x02a" + zigzag_varint(0) + zigzag_varint(1_700_000_000_000_000))
    offset += len(zigzag_varint(1) + zigzag_varint(1) + b"\x02k")
    with pytest.raises(DecodeError, match=rf"\(at byte {offset}\)"):
        AvroCodec(RECORD).decode(body)


def test_an_overlong_string_length_is_refused() -> None:
    body = overlong(1, 11) + b"x"
    with pytest.raises(DecodeError, match="a long takes more than 10 bytes"):
        AvroCodec('"string"').decode(body)


# --- the two walks: the same answers ----------------------------------------------------

TREE = {
    "type": "record",
    "name": "Tree",
    "fields": [
        {"name": "label", "type": ["null", "string", "int"]},
        {"name": "weight", "type": "long"},
        {"name": "shape", "type": {"type": "fixed", "name": "Shape", "size": 2}},
        {"name": "kids", "type": {"type": "array", "items": "Tree"}},
        {"name": "marks", "type": {"type": "array", "items": "null"}},
        {"name": "extra", "type": {"type": "map", "values": ["boolean", "float", "bytes"]}},
    ],
}
SCHEMAS = ['"int"', '"long"', RECORD, TREE]


@pytest.mark.parametrize("check", CHECKERS)
def test_a_tree_written_by_fastavro_passes(check: Checker) -> None:
    leaf = {"label": None, "weight": -1, "shape": b"ab", "kids": [], "marks": [], "extra": {}}
    tree = {
        "label": 2**31 - 1,
        "weight": 2**63 - 1,
        "shape": b"\x00\xff",
        "kids": [leaf, {**leaf, "label": "x", "kids": [leaf]}],
        "marks": [None] * 3,
        "extra": {"a": True, "b": 1.5, "c": b"\x80\x81"},
    }
    assert check(program(TREE), written(TREE, tree), AVRO_MAX_DEPTH) is None


@pytest.mark.parametrize("check", CHECKERS)
def test_nesting_is_bounded(check: Checker) -> None:
    leaf = {"label": None, "weight": 0, "shape": b"ab", "kids": [], "marks": [], "extra": {}}
    tree = leaf
    for _ in range(5):
        tree = {**leaf, "kids": [tree]}
    body = written(TREE, tree)
    assert check(program(TREE), body, AVRO_MAX_DEPTH) is None
    # Six records, each with arrays: the counting is the pre-scan's (a level per record,
    # array or map), so the first level over the bound is found at the same place.
    deepest = next(d for d in range(1, 30) if check(program(TREE), body, d) is None)
    assert deepest == 12
    found = check(program(TREE), body, deepest - 1)
    assert found is not None
    assert found[1] == f"nested deeper than {deepest - 1} levels"
    assert 0 < found[0] < len(body)


@requires_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=st.sampled_from(SCHEMAS), body=st.binary(max_size=64))
def test_c_and_python_agree_on_any_bytes(schema: Any, body: bytes) -> None:
    code = program(schema)
    assert c_check is not None
    assert c_check(code, body, AVRO_MAX_DEPTH) == _avrocheck.check(code, body, AVRO_MAX_DEPTH)


integers = st.one_of(
    st.integers(*INT64),
    st.sampled_from([*INT32, *INT64, 2**31, -(2**31) - 1, 2**32, 0]),
)


@requires_c
@settings(max_examples=400, deadline=None)
@given(value=integers, length=st.integers(1, 12), is_int=st.booleans())
def test_c_and_python_agree_on_every_varint(value: int, length: int, is_int: bool) -> None:
    body = overlong(value, length)
    code = program('"int"' if is_int else '"long"')
    assert c_check is not None
    found = _avrocheck.check(code, body, AVRO_MAX_DEPTH)
    assert c_check(code, body, AVRO_MAX_DEPTH) == found
    fits = INT32[0] <= value <= INT32[1] if is_int else True
    short_enough = len(body) <= (5 if is_int else 10)
    assert (found is None) == (fits and short_enough)


@pytest.mark.parametrize("check", CHECKERS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_whatever_fastavro_writes_passes(check: Checker, data: st.DataObject) -> None:
    label = data.draw(st.one_of(st.none(), st.text(max_size=5), st.integers(*INT32)))
    tree = {
        "label": label,
        "weight": data.draw(st.integers(*INT64)),
        "shape": data.draw(st.binary(min_size=2, max_size=2)),
        "kids": [],
        "marks": [None] * data.draw(st.integers(0, 3)),
        "extra": data.draw(
            st.dictionaries(
                st.text(max_size=3),
                st.one_of(st.booleans(), st.floats(width=32, allow_nan=False), st.binary()),
                max_size=3,
            )
        ),
    }
    assert check(program(TREE), written(TREE, tree), AVRO_MAX_DEPTH) is None


@pytest.mark.parametrize("code", [b"", b"\x00\x00\x00"])  # no root word; not whole words
@pytest.mark.parametrize("check", CHECKERS)
def test_a_program_of_no_whole_words_is_refused(check: Checker, code: bytes) -> None:
    with pytest.raises(ValueError, match="32-bit words"):
        check(code, b"\x02", AVRO_MAX_DEPTH)


@pytest.mark.parametrize("depth", [-1, _avrocheck.MAX_DEPTH_BOUND + 1])
@pytest.mark.parametrize("check", CHECKERS)
def test_a_depth_bound_out_of_range_is_refused_by_both_walks(check: Checker, depth: int) -> None:
    with pytest.raises(ValueError, match="max_depth must be between 0 and 10000"):
        check(program(TREE), b"\x02", depth)


@pytest.mark.parametrize("check", CHECKERS)
def test_the_widest_depth_bound_is_taken_by_both_walks(check: Checker) -> None:
    leaf = {"label": None, "weight": 1, "shape": b"ab", "kids": [], "marks": [], "extra": {}}
    assert check(program(TREE), written(TREE, leaf), 10_000) is None


@pytest.mark.parametrize("check", CHECKERS)
@pytest.mark.parametrize(
    "words",
    [
        (5, 2),  # the root past the end
        (0, 99),  # no such op
        (0, 9, 3, 7),  # a record whose first field is past the end
        (0, 12, 2, 4),  # a union whose second branch is past the end (the body picks it)
    ],
)
def test_a_malformed_program_is_an_answer_not_a_crash(
    check: Checker, words: tuple[int, ...]
) -> None:
    code = b"".join(i.to_bytes(4, "little", signed=True) for i in words)
    assert check(code, b"\x02\x04\x06", AVRO_MAX_DEPTH) == (0, "the program is malformed")


@pytest.mark.parametrize("check", CHECKERS)
def test_a_program_that_contains_itself_stops_at_the_depth_bound(check: Checker) -> None:
    record_of_itself = b"".join(i.to_bytes(4, "little") for i in (0, 9, 1, 0))
    assert check(record_of_itself, b"", 50) == (0, "nested deeper than 50 levels")


def test_the_python_walk_is_what_runs_without_the_accelerator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setenv("BROKER_PURE_PYTHON", "1")
    assert _avrocheck.checker() is _avrocheck.check_if_long
    monkeypatch.delenv("BROKER_PURE_PYTHON")
    if c_check is not None:
        assert _avrocheck.checker() is c_check
    monkeypatch.setitem(sys.modules, "broker.codecs._lazy", None)  # import fails
    fallback = _avrocheck.checker()
    assert fallback is _avrocheck.check_if_long
    code = program(RECORD)
    fine = reading_body(count=zigzag_varint(2**31 - 1), tag=b"\x00", item=b"\x00")
    assert fallback(code, fine, AVRO_MAX_DEPTH) is None
    bad = reading_body(count=zigzag_varint(2**31), tag=b"\x00", item=b"\x00")
    assert fallback(code, bad, AVRO_MAX_DEPTH) == (2, "an int is outside the 32-bit range")


@settings(max_examples=300, deadline=None)
@given(value=integers, length=st.integers(1, 12), is_int=st.booleans())
def test_the_fallback_skips_only_bodies_where_every_varint_fits(
    value: int, length: int, is_int: bool
) -> None:
    code = program('"int"' if is_int else '"long"')
    body = overlong(value, length)
    assert _avrocheck.check_if_long(code, body, AVRO_MAX_DEPTH) == _avrocheck.check(
        code, body, AVRO_MAX_DEPTH
    )


@pytest.mark.parametrize("check", CHECKERS)
def test_a_union_directly_in_a_union_counts_as_a_level(check: Checker) -> None:
    """A program whose union is its own branch would recurse for as long as the body goes
    on; each union in a union is a level, so the depth bound stops it."""
    union_of_itself = b"".join(i.to_bytes(4, "little") for i in (0, 12, 1, 0))
    assert check(union_of_itself, b"\x00" * 100, 5) == (5, "nested deeper than 5 levels")


@pytest.mark.parametrize("pure", [False, True], ids=["c", "python"])
def test_a_nested_union_that_fastavro_reads_decodes(
    pure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Avro's spec has no union directly in a union, but fastavro parses and reads one."""
    if not pure and c_check is None:
        pytest.skip("broker.codecs._lazy is not built")
    codec = AvroCodec('[["null", "int"], "long"]')
    if pure:
        monkeypatch.setattr(codec, "_check", _avrocheck.check)
    assert codec.decode(b"\x00\x02\x04") == 2
    with pytest.raises(DecodeError, match="an int is outside the 32-bit range"):
        codec.decode(b"\x00\x02" + zigzag_varint(2**31))


@requires_c
def test_a_program_is_read_at_any_alignment() -> None:
    assert c_check is not None
    code = program(RECORD)
    body = reading_body(count=zigzag_varint(2**31), tag=b"\x00", item=b"\x00")
    shifted = memoryview(b"\x00" + code)[1:]
    assert c_check(shifted, body, AVRO_MAX_DEPTH) == c_check(code, body, AVRO_MAX_DEPTH)
