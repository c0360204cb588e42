"""Hostile bodies end in a quick DecodeError with bounded memory: never a hang, crash or OOM.

Each case is a small body that makes a naive reader loop, allocate without bound, or
overflow the C stack: Avro block counts of ``2**60`` for zero-width items, recursive Avro
and Protobuf data nested thousands deep, deeply nested JSON and MessagePack, and
MessagePack length headers of four billion.
"""

from __future__ import annotations

import contextlib
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codecs import (
    AvroCodec,
    DecodeError,
    DecodeLimits,
    JsonCodec,
    MsgpackCodec,
    ProtobufCodec,
)
from tests.unit.test_codecs import PROTO_FILE, Node, varint, zigzag_varint

pytestmark = pytest.mark.unit

HUGE = 2**60
NODE_AVRO: dict[str, Any] = {
    "type": "record",
    "name": "Node",
    "fields": [{"name": "next", "type": ["null", "Node"]}],
}
EMPTY_RECORD = {"type": "record", "name": "Empty", "fields": []}
ZERO_WIDTH_SCHEMAS = {
    "array<null>": {"type": "array", "items": "null"},
    "array<empty record>": {"type": "array", "items": EMPTY_RECORD},
    "array<fixed(0)>": {"type": "array", "items": {"type": "fixed", "name": "Z", "size": 0}},
    "record{array<null>}": {
        "type": "record",
        "name": "Holder",
        "fields": [{"name": "xs", "type": {"type": "array", "items": "null"}}],
    },
}


@pytest.fixture
def bounded() -> Iterator[Callable[[], None]]:
    """Assert the body finished within a second and peaked under 64 MiB of Python memory."""
    tracemalloc.start()
    started = time.perf_counter()

    def check() -> None:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        assert elapsed < 1.0, f"took {elapsed:.2f}s"
        assert peak < 64 * 1024 * 1024, f"peaked at {peak} bytes"

    yield check
    tracemalloc.stop()


# --- Avro ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", ZERO_WIDTH_SCHEMAS.values(), ids=ZERO_WIDTH_SCHEMAS.keys())
@pytest.mark.parametrize("count", [HUGE, -HUGE], ids=["count", "negative-count"])
def test_avro_zero_width_items_with_a_huge_block_count_fail_fast(
    schema: Any, count: int, bounded: Callable[[], None]
) -> None:
    """A block count of 2**60 items that take no bytes is refused, not iterated."""
    codec = AvroCodec(schema)
    assert codec.prescans
    body = zigzag_varint(count) + (zigzag_varint(0) if count < 0 else b"") + zigzag_varint(0)
    with pytest.raises(DecodeError, match="over 100000 items"):
        codec.decode(body)
    bounded()


def test_avro_zero_width_items_many_blocks_hit_the_total_limit(
    bounded: Callable[[], None],
) -> None:
    """Many blocks just under the collection limit add up to the total-items limit."""
    codec = AvroCodec({"type": "array", "items": {"type": "array", "items": "null"}})
    inner = zigzag_varint(1) + zigzag_varint(90_000) + zigzag_varint(0)
    body = zigzag_varint(50) + inner * 50 + zigzag_varint(0)
    with pytest.raises(DecodeError, match="items in all"):
        codec.decode(body)
    bounded()


def test_avro_zero_width_items_within_limits_decode() -> None:
    """The pre-scan lets honest zero-width arrays through."""
    codec = AvroCodec(ZERO_WIDTH_SCHEMAS["array<null>"])
    assert codec.decode(zigzag_varint(3) + zigzag_varint(0)) == [None, None, None]


@pytest.mark.parametrize("count", [HUGE, 2**31])
def test_avro_huge_count_of_real_items_ends_at_the_end_of_the_body(
    count: int, bounded: Callable[[], None]
) -> None:
    """Items that take bytes cannot outnumber the body: a huge count fails at its end."""
    codec = AvroCodec({"type": "array", "items": "long"})
    assert not codec.prescans
    with pytest.raises(DecodeError):
        codec.decode(zigzag_varint(count) + b"\x02" * 1000)
    bounded()


def test_avro_recursive_data_nested_deeply_is_refused_without_crashing() -> None:
    """A linked list 100 000 deep would overflow fastavro's C stack; the pre-scan stops it."""
    codec = AvroCodec(NODE_AVRO)
    assert codec.prescans
    with pytest.raises(DecodeError, match="nested deeper than 64"):
        codec.decode(b"\x02" * 100_000 + b"\x00")
    assert codec.decode(b"\x02" * 3 + b"\x00") == {"next": {"next": {"next": {"next": None}}}}


def test_avro_huge_string_length_is_refused() -> None:
    """A string claiming 2**60 bytes fails at the end of the body, allocating nothing."""
    with pytest.raises(DecodeError):
        AvroCodec("string").decode(zigzag_varint(HUGE) + b"abc")


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=64))
def test_avro_prescanned_schemas_raise_only_decode_error(payload: bytes) -> None:
    """Arbitrary bytes against the recursive and zero-width schemas raise only DecodeError."""
    for schema in [NODE_AVRO, *ZERO_WIDTH_SCHEMAS.values()]:
        with contextlib.suppress(DecodeError):
            AvroCodec(schema).decode(payload)


# --- JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 1_000, 100_000])
def test_json_nested_deeper_than_the_limit_is_refused(depth: int) -> None:
    """Nesting over max_depth (64) is refused, including past orjson's own 1024 limit."""
    with pytest.raises(DecodeError, match=r"nested|recursion|depth"):
        JsonCodec().decode(b"[" * depth + b"]" * depth)


def test_json_nested_to_the_limit_decodes() -> None:
    """Exactly max_depth levels are fine."""
    assert JsonCodec().decode(b"[" * 64 + b"]" * 64) is not None


def test_json_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Brackets in strings only trigger the exact check, which passes."""
    body = orjson.dumps({"text": "[{" * 500})
    assert JsonCodec().decode(body) == {"text": "[{" * 500}


def test_json_collection_over_the_limit_is_refused() -> None:
    """One array longer than max_collection_len is refused."""
    codec = JsonCodec(limits=DecodeLimits(max_collection_len=1_000))
    with pytest.raises(DecodeError, match="1001 items"):
        codec.decode(orjson.dumps([0] * 1_001))
    assert len(codec.decode(orjson.dumps([0] * 1_000))) == 1_000


# --- MessagePack --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 1_000, 100_000])
def test_msgpack_nested_deeper_than_the_limit_is_refused(depth: int) -> None:
    """fixarray headers nested past max_depth, or past msgpack's own stack, are refused."""
    with pytest.raises(DecodeError):
        MsgpackCodec().decode(b"\x91" * depth + b"\xc0")


def test_msgpack_nested_to_the_limit_decodes() -> None:
    """Exactly max_depth levels are fine."""
    assert MsgpackCodec().decode(b"\x91" * 64 + b"\xc0") is not None


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
    ],
    ids=["array32", "map32", "str32", "bin32"],
)
def test_msgpack_huge_length_headers_are_refused(body: bytes, bounded: Callable[[], None]) -> None:
    """Length headers of four billion are refused before anything is allocated."""
    with pytest.raises(DecodeError):
        MsgpackCodec().decode(body + b"\x00" * 16)
    bounded()


def test_msgpack_trailing_bytes_are_refused() -> None:
    """A second object after the first is not silently dropped."""
    with pytest.raises(DecodeError):
        MsgpackCodec().decode(b"\xc0\xc0")


# --- Protobuf --------------------------------------------------------------------------------


def nested_node(depth: int) -> bytes:
    """A Node whose ``child`` chain is ``depth`` messages deep."""
    body = Node(v=1).SerializeToString()
    for _ in range(depth):
        body = b"\x0a" + varint(len(body)) + body
    return body


@pytest.mark.parametrize("depth", [70, 10_000])
def test_protobuf_recursive_message_nested_deeply_is_refused(
    depth: int, bounded: Callable[[], None]
) -> None:
    """Past upb's 100 levels it refuses; between 64 and 100 our walk does."""
    codec = ProtobufCodec(PROTO_FILE)
    with pytest.raises(DecodeError):
        codec.decode(zigzag_varint(1) + zigzag_varint(1) + nested_node(depth))
    bounded()


def test_protobuf_recursive_message_within_the_limit_decodes() -> None:
    """A shallow chain decodes to nested dicts."""
    value = ProtobufCodec(PROTO_FILE).decode(zigzag_varint(1) + zigzag_varint(1) + nested_node(2))
    assert value == {"child": {"child": {"v": 1}}}


def test_protobuf_repeated_field_over_the_limit_is_refused() -> None:
    """A packed repeated field longer than max_collection_len is refused."""
    codec = ProtobufCodec(PROTO_FILE, limits=DecodeLimits(max_collection_len=100))
    packed = b"\x01" * 101
    inner = b"\x12" + varint(len(packed)) + packed
    body = b"\x3a" + varint(len(inner)) + inner  # Event.inner = Inner(values=[1] * 101)
    with pytest.raises(DecodeError, match="101 items"):
        codec.decode(b"\x00" + body)
