"""Avro ``decimal`` values are bounded by their declared precision before they are converted.

fastavro builds a ``Decimal`` from every byte of a decimal, ignoring ``precision``, in time
quadratic in their number (200 kB took 3.5 s of CPU on the event loop). The codec refuses a
value with more significant bytes than its precision needs, and caps the precision at
:data:`AVRO_MAX_DECIMAL_DIGITS` so a schema cannot declare the bound away.
"""

from __future__ import annotations

import time
from decimal import Decimal
from io import BytesIO
from typing import Any

import fastavro
import pytest

from broker.codecs import AvroCodec, DecodeError
from broker.codecs.avro import AVRO_MAX_DECIMAL_DIGITS
from tests.unit.test_codecs import zigzag_varint

pytestmark = pytest.mark.unit

#: Far above what the bounded path takes (milliseconds), far below the unbounded (seconds).
QUICK_S = 0.5
HUGE_VALUE = b"\x7f" * 200_000


def bytes_decimal(precision: int, scale: int = 2) -> dict[str, Any]:
    return {"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}


def fixed_decimal(size: int, precision: int, scale: int = 2) -> dict[str, Any]:
    return {
        "type": "fixed",
        "name": "Amount",
        "size": size,
        "logicalType": "decimal",
        "precision": precision,
        "scale": scale,
    }


def in_record(field_type: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": "Payment", "fields": [{"name": "amount", "type": field_type}]}


def encode(schema: dict[str, Any], value: Any) -> bytes:
    out = BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), value)
    return out.getvalue()


def assert_refused_quickly(codec: AvroCodec, body: bytes) -> DecodeError:
    started = time.process_time()
    with pytest.raises(DecodeError) as caught:
        codec.decode(body)
    assert time.process_time() - started < QUICK_S
    return caught.value


def test_huge_bytes_decimal_with_small_precision_is_refused_quickly() -> None:
    """A 200 kB decimal declared as 4 digits fails at once, not after seconds of CPU."""
    codec = AvroCodec(bytes_decimal(4))
    error = assert_refused_quickly(codec, zigzag_varint(len(HUGE_VALUE)) + HUGE_VALUE)
    assert error.codec == "avro"
    assert "decimal" in error.reason


def test_huge_fixed_decimal_with_small_precision_is_refused_quickly() -> None:
    """A ``fixed`` of 200 kB declared as 4 digits cannot smuggle in a huge value either."""
    codec = AvroCodec(in_record(fixed_decimal(len(HUGE_VALUE), 4)))
    assert_refused_quickly(codec, HUGE_VALUE)


def test_absurd_precision_is_capped() -> None:
    """A schema declaring a million digits still refuses a 200 kB value."""
    codec = AvroCodec(bytes_decimal(10**6))
    error = assert_refused_quickly(codec, zigzag_varint(len(HUGE_VALUE)) + HUGE_VALUE)
    assert f"{AVRO_MAX_DECIMAL_DIGITS} digits" in error.reason


def test_decimal_of_the_largest_allowed_precision_decodes() -> None:
    """A value with exactly the capped number of digits is still read, in full."""
    schema = bytes_decimal(10**6, scale=0)
    value = Decimal(10**AVRO_MAX_DECIMAL_DIGITS - 1)
    assert AvroCodec(schema).decode(encode(schema, value)) == value


@pytest.mark.parametrize(
    "value", [Decimal("12345678.90"), Decimal("-12345678.90"), Decimal("0.00"), Decimal("-0.01")]
)
def test_normal_bytes_decimal_decodes(value: Decimal) -> None:
    """Values within their precision decode to the Decimal that was written."""
    schema = in_record(bytes_decimal(10))
    assert AvroCodec(schema).decode(encode(schema, {"amount": value})) == {"amount": value}


@pytest.mark.parametrize("value", [Decimal("99999999.99"), Decimal("-99999999.99"), Decimal("1")])
def test_fixed_decimal_wider_than_its_precision_decodes(value: Decimal) -> None:
    """A ``fixed`` padded with sign extension beyond what the precision needs is allowed."""
    schema = in_record(fixed_decimal(16, 10))
    assert AvroCodec(schema).decode(encode(schema, {"amount": value})) == {"amount": value}


def test_significant_bytes_over_precision_in_a_padded_fixed_are_refused() -> None:
    """Padding is only sign extension: 2 digits in a 16-byte fixed holding 2**100 fail."""
    body = (2**100).to_bytes(16, "big", signed=True)
    assert_refused_quickly(AvroCodec(in_record(fixed_decimal(16, 2))), body)


def test_precision_that_is_not_a_positive_int_falls_back_to_the_cap() -> None:
    """``precision: true`` (which fastavro's schema check lets through) bounds like 1000 digits."""
    codec = AvroCodec(bytes_decimal(True, scale=0))
    error = assert_refused_quickly(codec, zigzag_varint(len(HUGE_VALUE)) + HUGE_VALUE)
    assert f"{AVRO_MAX_DECIMAL_DIGITS} digits" in error.reason
