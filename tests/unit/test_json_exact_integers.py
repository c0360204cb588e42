"""Integers past 64 bits in JSON the broker parses and stores again (batch records,
structured CloudEvents): orjson reads one as a float, its last digits lost (or refuses it
past a double's range), so the broker stored ``12345678901234567890123`` as
``1.2345678901234568e+22``. They are stored with every digit now."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import cloudevent_to_request, parse_json, record_to_request
from broker.errors import BadRequest, Unprocessable
from broker.exactjson import loads_exact
from broker.http._json_array import array_records

pytestmark = pytest.mark.unit

BIG = 12345678901234567890123


def stored(data_json: str) -> bytes:
    record = loads_exact(b'{"subject": "a", "data": %s}' % data_json.encode())
    return record_to_request(record, default_subject=None).payload


def test_a_record_with_an_integer_past_64_bits_is_stored_with_every_digit() -> None:
    assert stored(f'{{"id": {BIG}, "n": 1}}') == b'{"id":%d,"n":1}' % BIG
    assert stored(f"[{BIG}, -{BIG}]") == b"[%d,-%d]" % (BIG, BIG)
    assert stored(str(10**400)) == str(10**400).encode()  # past a double: orjson refused it


def test_other_values_in_such_a_record_are_written_as_orjson_writes_them() -> None:
    data = f'{{"id": {BIG}, "name": "Zoë ✓", "f": 1.5, "t": true, "z": null, "e": "a\\nb"}}'
    assert json.loads(stored(data)) == json.loads(data)
    assert "Zoë ✓".encode() in stored(data)  # UTF-8, not \\u escapes


@given(st.integers(min_value=-(10**300), max_value=10**300))
def test_any_integer_in_data_is_stored_exactly(n: int) -> None:
    assert json.loads(stored(f'{{"n": {n}}}'))["n"] == n


@given(st.text(alphabet="0123456789", min_size=20, max_size=40))
def test_long_digit_runs_in_strings_change_nothing(digits: str) -> None:
    assert stored(json.dumps({"s": digits, "n": 7})) == orjson.dumps({"s": digits, "n": 7})


@pytest.mark.parametrize(
    "text",
    [
        b'{"n": 12345678901234567890123, "x": NaN}',
        b'{"n": 12345678901234567890123, "x": Infinity}',
        b'{"n": 12345678901234567890123, "x": 1e400}',
        b'{"n": 12345678901234567890123,}',
        '{"n": 12345678901234567890123}'.encode("utf-16"),
        b'\xef\xbb\xbf{"n": 12345678901234567890123}',
        b'{"n": %s}' % (b"9" * 5000),
    ],
)
def test_what_orjson_refuses_is_refused_on_the_long_digit_path_too(text: bytes) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        loads_exact(text)


def test_a_long_digit_text_nested_too_deep_is_refused_not_a_crash() -> None:
    text = b"[" * 5000 + b"12345678901234567890123" + b"]" * 5000
    with pytest.raises(ValueError, match="deep"):
        loads_exact(text)


def test_a_lone_surrogate_in_data_is_still_a_422() -> None:
    with pytest.raises(Unprocessable):
        stored(f'{{"n": {BIG}, "s": "\\ud800"}}')


def test_json_array_batches_keep_the_digits_in_both_parsers() -> None:
    record = b'{"subject": "a", "data": {"id": %d}}' % BIG
    few = b"[" + record + b"]"
    dense = b"[" + b",".join([b'{"subject": "a", "data": [' + b"1," * 70 + b"1]}", record]) + b"]"
    for body, max_records in ((few, 10), (dense, 2)):
        records = list(array_records(body, max_records, 1 << 20))
        payload = record_to_request(records[-1], default_subject=None).payload
        assert payload == b'{"id":%d}' % BIG
    with pytest.raises(BadRequest):
        list(array_records(b'[{"n": %d},]' % BIG, 10, 1 << 20))


def test_a_structured_cloudevent_keeps_the_digits() -> None:
    event = b'{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {"n": %d}}'
    parsed = parse_json(event % BIG, what="the structured CloudEvent")
    request = cloudevent_to_request(parsed, subject="a", idempotency_key=None)
    assert request.payload == b'{"n":%d}' % BIG


@given(st.binary(max_size=80) | st.text(alphabet="0123456789ab ", max_size=80).map(str.encode))
def test_the_c_digit_run_finds_what_the_python_one_finds(data: bytes) -> None:
    from broker.codecs._accelerator import accelerator
    from broker.exactjson import python_digit_run

    module = accelerator()
    if module is None:
        pytest.skip("the C accelerator is not built")
    for length in (1, 5, 20):
        assert module.digit_run(data, length) is python_digit_run(data, length)
