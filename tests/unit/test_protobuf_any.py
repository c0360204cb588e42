"""``google.protobuf.Any`` fields in Protobuf bodies: resolved in the schema's own pool,
unknown types and deep nesting refused with a one-line :class:`DecodeError`, and the values
they hold checked against the decode limits like any other."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest

from broker.codecs import DecodeError, DecodeLimits, ProtobufCodec
from broker.codecs.protobuf import MAX_ANY_DEPTH
from broker.registry.schemas.decoders import writer_schema
from broker.registry.schemas.types import SchemaType, parse_schema
from tests.unit.test_codecs import varint

pytestmark = pytest.mark.unit

SCHEMA = """
syntax = "proto3";
package p;
import "google/protobuf/any.proto";
message A { google.protobuf.Any a = 1; repeated google.protobuf.Any many = 2;
            map<string, google.protobuf.Any> named = 3; }
message B { int32 x = 1; repeated int32 xs = 2; }
message N { N next = 1; int32 v = 2; }
"""
ANY_URL = b"type.googleapis.com/google.protobuf.Any"


def codec(limits: DecodeLimits | None = None) -> ProtobufCodec:
    file = writer_schema(parse_schema(SchemaType.PROTOBUF, SCHEMA))
    return ProtobufCodec(file) if limits is None else ProtobufCodec(file, limits=limits)


def field(tag: int, body: bytes) -> bytes:
    """A length-delimited field: its key (field number ``tag``, wire type 2) and ``body``."""
    return varint(tag << 3 | 2) + varint(len(body)) + body


def packed(type_name: str, body: bytes) -> bytes:
    """An Any holding ``body`` as a ``type_name``."""
    return field(1, b"type.googleapis.com/" + type_name.encode()) + field(2, body)


def any_chain(depth: int) -> bytes:
    """An Any holding an Any … ``depth`` of them, the innermost holding ``B{x: 5}``."""
    body = packed("p.B", b"\x08\x05")
    for _ in range(depth - 1):
        body = field(1, ANY_URL) + field(2, body)
    return body


def a_with(any_body: bytes) -> bytes:
    """A Confluent body of the first message, ``A``, with ``a`` set to ``any_body``."""
    return b"\x00" + field(1, any_body)


def plain(value: Any) -> bool:
    """Whether every mapping in ``value`` is a plain ``dict``."""
    if isinstance(value, dict):
        return type(value) is dict and all(plain(v) for v in value.values())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return True


def test_an_any_holding_a_message_of_the_schema_decodes_as_that_message() -> None:
    """``type_url`` names a message of the schema's own file, not of the process's pool."""
    value = codec().decode(a_with(packed("p.B", b"\x08\x05")))
    assert value == {"a": {"@type": "type.googleapis.com/p.B", "x": 5}}
    assert plain(value)


def test_anys_in_repeated_and_map_fields_and_well_known_types_decode() -> None:
    body = (
        field(2, packed("p.B", b"\x08\x01"))
        + field(2, packed("google.protobuf.Any", b""))
        + field(3, field(1, b"k") + field(2, packed("p.B", b"\x08\x02")))
    )
    value = codec().decode(b"\x00" + body)
    assert value == {
        "many": [
            {"@type": "type.googleapis.com/p.B", "x": 1},
            {"@type": "type.googleapis.com/google.protobuf.Any", "value": {}},
        ],
        "named": {"k": {"@type": "type.googleapis.com/p.B", "x": 2}},
    }
    assert plain(value)


@pytest.mark.parametrize(
    "body",
    [
        a_with(packed("nope.X", b"")),
        a_with(field(1, ANY_URL) + field(2, packed("nope.X", b""))),
        b"\x00" + field(2, packed("p.B", b"")) + field(2, packed("nope.X", b"")),
        b"\x00" + field(3, field(1, b"k") + field(2, packed("nope.X", b""))),
    ],
    ids=["field", "inside-an-any", "repeated", "map"],
)
def test_an_any_naming_a_type_outside_the_schema_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError, match=r"'type\.googleapis\.com/nope\.X' names no message"):
        codec().decode(body)


def test_an_any_with_a_broken_value_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="protobuf payload could not be decoded"):
        codec().decode(a_with(packed("p.B", b"\x08")))


@pytest.mark.parametrize("depth", [MAX_ANY_DEPTH + 1, 3_000, 15_000])
def test_anys_nested_too_deeply_are_refused_quickly_in_bounded_memory(depth: int) -> None:
    """Each level's value is parsed again: the depth is refused before the conversion
    recurses (a RecursionError) or holds a copy of the body per level."""
    payload = a_with(any_chain(depth))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DecodeError, match="nested too deeply"):
            codec().decode(payload)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert peak < 16 * len(payload) + (4 << 20), f"peaked at {peak} bytes"


def test_anys_nested_to_the_limit_decode() -> None:
    value = codec().decode(a_with(any_chain(MAX_ANY_DEPTH)))["a"]
    for _ in range(MAX_ANY_DEPTH - 1):
        assert value["@type"] == "type.googleapis.com/google.protobuf.Any"
        value = value["value"]
    assert value == {"@type": "type.googleapis.com/p.B", "x": 5}


def test_a_stricter_max_depth_bounds_any_nesting_too() -> None:
    strict = codec(DecodeLimits(max_depth=4))
    assert strict.decode(a_with(any_chain(3)))
    with pytest.raises(DecodeError, match="nested too deeply"):
        strict.decode(a_with(any_chain(5)))


def test_values_inside_an_any_count_against_max_depth() -> None:
    """A recursive message 70 deep inside an Any, under a max_depth of 64."""
    node = b"\x10\x01"
    for _ in range(70):
        node = field(1, node)
    with pytest.raises(DecodeError, match="nested deeper than 64 levels"):
        codec(DecodeLimits(max_depth=64)).decode(a_with(packed("p.N", node)))


def test_collections_inside_an_any_count_against_the_collection_limits() -> None:
    xs = field(2, b"\x01" * 101)  # B.xs, packed: 101 items
    with pytest.raises(DecodeError, match="101 items"):
        codec(DecodeLimits(max_collection_len=100)).decode(a_with(packed("p.B", xs)))
