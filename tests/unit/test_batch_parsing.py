"""A buffered batch is counted before anything is parsed into objects, and its records are
handed out one at a time (parsed at once, a body of tiny records costs many times its size)."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import BadRequest, BrokerError, PayloadTooLarge
from broker.http import _json_array
from broker.http._json_array import array_records
from broker.http.publish import _parse_batch, _records_at

pytestmark = pytest.mark.unit
LONGEST = 2 * 1024 * 1024 + 4096  # the limit at the default 1 MiB message size


def test_ndjson_counts_only_lines_with_a_record() -> None:
    body = b'\n  \n{"data":1}\r\n\t\n   {"data":2}\n\n{oops\n'
    records = list(_parse_batch("ndjson", body, longest=LONGEST, max_records=3))
    assert records[:2] == [{"data": 1}, {"data": 2}]
    assert isinstance(records[2], BadRequest)  # that record's error only
    with pytest.raises(PayloadTooLarge, match="more than 2 records"):
        _parse_batch("ndjson", body, longest=LONGEST, max_records=2)


def test_counting_a_body_of_lines_costs_no_object_per_line() -> None:
    blank = b"\n" * 1_000_000
    body = blank + b'{"data":1}\n' * 500_000  # 6.5 MB
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            _parse_batch("ndjson", body, longest=LONGEST, max_records=10_000)
        assert list(_parse_batch("ndjson", blank, longest=LONGEST, max_records=10)) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # a list of the lines alone: 60 MB


def test_the_limit_is_refused_before_any_record_is_handed_out() -> None:
    body = b'{"data":1}\n' * 11
    with pytest.raises(PayloadTooLarge):
        _parse_batch("ndjson", body, longest=LONGEST, max_records=10)
    with pytest.raises(PayloadTooLarge, match="11 records"):
        _parse_batch("json", b"[" + b",".join([b"{}"] * 11) + b"]", longest=LONGEST, max_records=10)
    assert len(list(_parse_batch("ndjson", body, longest=LONGEST, max_records=11))) == 11


#: What found the records of an NDJSON body before ``_records_at`` (a byte at a time).
_RECORD_LINE = re.compile(rb"\S[^\n]*")


@settings(max_examples=2000)
@given(st.lists(st.sampled_from(b" \t\n\r\x0b\x0c\x1c\xa0x{"), max_size=80).map(bytes))
def test_ndjson_records_are_where_the_regular_expression_found_them(body: bytes) -> None:
    assert [body[a:b] for a, b in _records_at(body)] == [m[0] for m in _RECORD_LINE.finditer(body)]


def test_a_large_ndjson_record_is_read_whole() -> None:
    record = orjson.dumps({"data": "x" * 300_000})
    body = b"  " + record + b"\r\n\n" + record
    assert (
        list(_parse_batch("ndjson", body, longest=LONGEST, max_records=2))
        == [{"data": "x" * 300_000}] * 2
    )


@given(
    st.lists(
        st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
        max_size=20,
    )
)
def test_records_come_out_in_order_whatever_the_framing(records: list[dict[str, int]]) -> None:
    ndjson = b"\n".join(orjson.dumps(r) for r in records)
    assert list(_parse_batch("ndjson", ndjson, longest=LONGEST, max_records=20)) == records
    assert (
        list(_parse_batch("json", orjson.dumps(records), longest=LONGEST, max_records=20))
        == records
    )


# --- JSON arrays: dense bodies are scanned for their records, not parsed whole ---------------


def test_ndjson_refuses_a_too_long_line_before_parsing_it() -> None:
    nested = b"[" + b",".join([b"[]"] * 100_000) + b"]"  # 300 kB, 100,001 lists
    body = b'{"data":1}\n' + nested + b'\n{"data":2}\n'
    tracemalloc.start()
    try:
        records = list(_parse_batch("ndjson", body, longest=100_000, max_records=10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert records[0] == {"data": 1}
    assert isinstance(records[1], PayloadTooLarge)
    assert records[2] == {"data": 2}
    assert peak < 1_000_000  # parsed, the long line alone: ~6 MB


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        (b"[" + b",".join([b"{}"] * 2_000_000) + b"]", "more than 10000 records"),
        (b"[[" + b",".join([b"[]"] * 2_000_000) + b"]]", "record 0 exceeds"),
        (b'[{"a":1},' + b"[" + b",".join([b"0"] * 2_000_000) + b"]]", "record 1 exceeds"),
    ],
    ids=["a flood of records", "one record of many values", "a second record too long"],
)
def test_a_dense_array_is_refused_without_building_its_values(body: bytes, refusal: str) -> None:
    """Parsed whole, each of these 6 MB bodies costs 100 to 200 MB before it is refused."""
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match=refusal):
            list(_parse_batch("json", body, longest=LONGEST, max_records=10_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_a_dense_array_within_the_limits_is_handed_out_one_record_at_a_time() -> None:
    records = [{"values": list(range(200))} for _ in range(500)]  # 100,000 commas: dense
    body = orjson.dumps(records)
    assert body.count(b",") >= _json_array.DENSE_VALUES_PER_RECORD * 1000
    tracemalloc.start()
    try:
        handed = array_records(body, 1000, LONGEST)
        first = next(handed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [first, *handed] == records
    assert peak < 100_000  # one record's values, not 500


def test_a_string_never_closed_is_refused_after_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unclosed quote was once skipped and the next one tried, each time to the end of
    the body: 1 500 escaped quotes before 640 000 commas blocked the event loop for 12 s.
    Now the first unclosed quote refuses the batch: the scan reads the body about once."""
    searched: list[int] = []
    pattern = _json_array._TOKEN

    class Counted:
        def finditer(self, body: bytes, position: int) -> Iterator[re.Match[bytes]]:
            for token in pattern.finditer(body, position):
                searched.append(token.end())
                yield token

    monkeypatch.setattr(_json_array, "_TOKEN", Counted())
    body = b'["' + b'\\"' * 1500 + b"," * 640_000 + b"]"
    with pytest.raises(BadRequest, match="a string is not closed"):
        list(_parse_batch("json", body, longest=LONGEST, max_records=10_000))
    assert searched == [2]  # the first quote, found unclosed, and nothing after it


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


@given(st.lists(JSON, max_size=8), st.sampled_from([b"", b" ", b"\n\t ", b"\r\n"]))
def test_scanning_finds_the_records_that_parsing_whole_finds(
    records: list[object], space: bytes
) -> None:
    body = space + orjson.dumps(records, option=orjson.OPT_INDENT_2) + space
    scanned = _json_array._spans(body, max_records=8, record_limit=LONGEST)
    assert [orjson.loads(body[a:b]) for a, b in scanned] == records


BYTES = st.lists(
    st.sampled_from(
        [
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b":",
            b'"',
            b"\\",
            b" ",
            b"\x0c",
            b"1",
            b"a",
            b"null",
            b'"x"',
            b"\xff",
        ]
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=1000)
@given(BYTES)
def test_a_dense_body_is_accepted_exactly_when_parsing_it_whole_is(body: bytes) -> None:
    """On any body, the scan and the whole parse agree: the same records, or both refuse
    (with a 4xx, never another exception)."""
    try:
        whole: object = orjson.loads(body)
    except orjson.JSONDecodeError:
        whole = None
    scanned: list[object] | BrokerError
    try:
        scanned = list(_json_array._checked(body, max_records=100, record_limit=LONGEST))
    except (BadRequest, PayloadTooLarge) as e:
        scanned = e
    if isinstance(whole, list):
        assert scanned == whole
    else:
        assert isinstance(scanned, BadRequest), (whole, scanned)
