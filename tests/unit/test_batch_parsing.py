"""A buffered batch is counted before anything is parsed into objects, and its records are
handed out one at a time (parsed at once, a body of tiny records costs many times its size)."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import BadRequest, PayloadTooLarge
from broker.http.publish import _parse_batch

pytestmark = pytest.mark.unit


def test_ndjson_counts_only_lines_with_a_record() -> None:
    body = b'\n  \n{"data":1}\r\n\t\n   {"data":2}\n\n{oops\n'
    records = list(_parse_batch("ndjson", body, max_records=3))
    assert records[:2] == [{"data": 1}, {"data": 2}]
    assert isinstance(records[2], BadRequest)  # that record's error only
    with pytest.raises(PayloadTooLarge, match="more than 2 records"):
        _parse_batch("ndjson", body, max_records=2)


def test_counting_a_body_of_lines_costs_no_object_per_line() -> None:
    blank = b"\n" * 1_000_000
    body = blank + b'{"data":1}\n' * 500_000  # 6.5 MB
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            _parse_batch("ndjson", body, max_records=10_000)
        assert list(_parse_batch("ndjson", blank, max_records=10)) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # a list of the lines alone: 60 MB


def test_the_limit_is_refused_before_any_record_is_handed_out() -> None:
    body = b'{"data":1}\n' * 11
    with pytest.raises(PayloadTooLarge):
        _parse_batch("ndjson", body, max_records=10)
    with pytest.raises(PayloadTooLarge, match="11 records"):
        _parse_batch("json", b"[" + b",".join([b"{}"] * 11) + b"]", max_records=10)
    assert len(list(_parse_batch("ndjson", body, max_records=11))) == 11


@given(
    st.lists(
        st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
        max_size=20,
    )
)
def test_records_come_out_in_order_whatever_the_framing(records: list[dict[str, int]]) -> None:
    ndjson = b"\n".join(orjson.dumps(r) for r in records)
    assert list(_parse_batch("ndjson", ndjson, max_records=20)) == records
    assert list(_parse_batch("json", orjson.dumps(records), max_records=20)) == records
