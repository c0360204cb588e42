"""Hostile bodies end in a quick DecodeError with bounded memory: never a hang, crash or OOM.

Each case is a small body that makes a naive reader loop, allocate without bound, or
overflow the C stack: Avro block counts of ``2**60`` for zero-width items, recursive Avro
and Protobuf data nested thousands deep, deeply nested JSON and MessagePack, and
MessagePack length headers of four billion.

The default depth bound is each library's own (orjson and msgpack 1024 levels, upb 101
messages, Avro 100 through the pre-scan): tests pin those limits, so a library upgrade that
moves one fails here, and check that an operator's stricter bound (64) is enforced exactly.
"""

from __future__ import annotations

import contextlib
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codecs import (
    AVRO_MAX_DEPTH,
    DEFAULT_LIMITS,
    MSGPACK_MAX_DEPTH,
    ORJSON_MAX_DEPTH,
    UPB_MAX_DEPTH,
    AvroCodec,
    DecodeError,
    DecodeLimits,
    JsonCodec,
    MsgpackCodec,
    ProtobufCodec,
)
from broker.envelope import CONTENT_TYPE
from projections.base import Event
from projections.replica import MessagesReplica
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
    with pytest.raises(DecodeError, match=f"nested deeper than {AVRO_MAX_DEPTH} levels"):
        codec.decode(b"\x02" * 100_000 + b"\x00")
    assert codec.decode(b"\x02" * 3 + b"\x00") == {"next": {"next": {"next": {"next": None}}}}


def test_avro_stops_at_its_own_depth_limit_whatever_max_depth_says() -> None:
    """fastavro has no limit of its own (5 000 levels crash it), so a max_depth above
    AVRO_MAX_DEPTH still stops there; records nested exactly that deep decode."""
    codec = AvroCodec(NODE_AVRO, limits=DecodeLimits(max_depth=10_000))
    with pytest.raises(DecodeError, match=f"nested deeper than {AVRO_MAX_DEPTH} levels"):
        codec.decode(b"\x02" * 5_000 + b"\x00")
    # Every 0x02 picks the Node branch of the union: n of them nest n + 1 records.
    assert codec.decode(b"\x02" * (AVRO_MAX_DEPTH - 1) + b"\x00") is not None
    with pytest.raises(DecodeError, match="nested deeper"):
        codec.decode(b"\x02" * AVRO_MAX_DEPTH + b"\x00")


def test_avro_stricter_max_depth_is_enforced() -> None:
    """An operator's max_depth below AVRO_MAX_DEPTH is the bound."""
    codec = AvroCodec(NODE_AVRO, limits=DecodeLimits(max_depth=64))
    with pytest.raises(DecodeError, match="nested deeper than 64 levels"):
        codec.decode(b"\x02" * 64 + b"\x00")
    assert codec.decode(b"\x02" * 63 + b"\x00") is not None


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

STRICT = DecodeLimits(max_depth=64)


def json_nested(depth: int, padding: int = 0) -> bytes:
    """Arrays nested ``depth`` deep, the innermost holding a string of ``padding`` bytes."""
    return b"[" * depth + b'"' + b"x" * padding + b'"' + b"]" * depth


def test_default_depth_is_the_libraries_own() -> None:
    """The default max_depth is orjson's and msgpack's C-level limit: enforcing it is free."""
    assert DEFAULT_LIMITS.max_depth == ORJSON_MAX_DEPTH == MSGPACK_MAX_DEPTH == 1024


@pytest.mark.parametrize("depth", [ORJSON_MAX_DEPTH + 1, 100_000])
def test_json_nested_deeper_than_orjson_allows_is_refused(
    depth: int, bounded: Callable[[], None]
) -> None:
    """With the default limits orjson itself refuses nesting over 1024 levels, in C."""
    with pytest.raises(DecodeError, match=f"nested deeper than {ORJSON_MAX_DEPTH} levels"):
        JsonCodec().decode(b"[" * depth + b"]" * depth)
    bounded()


def test_json_nested_to_orjsons_limit_decodes() -> None:
    """Exactly 1024 levels decode with the default limits (orjson's limit has not moved)."""
    assert JsonCodec().decode(json_nested(ORJSON_MAX_DEPTH)) is not None


def test_json_max_depth_above_orjsons_limit_still_stops_there() -> None:
    """No setting makes the codec accept what orjson cannot parse."""
    codec = JsonCodec(limits=DecodeLimits(max_depth=5_000))
    with pytest.raises(DecodeError, match="nested deeper than 1024"):
        codec.decode(json_nested(ORJSON_MAX_DEPTH + 1))


@pytest.mark.parametrize(
    ("depth", "padding"),
    [(65, 0), (65, 2_000), (1_000, 0), (100_000, 0)],
    ids=["just-over", "over-in-a-large-body", "1000", "100000"],
)
def test_json_nested_deeper_than_a_stricter_limit_is_refused(
    depth: int, padding: int, bounded: Callable[[], None]
) -> None:
    """An operator's max_depth of 64 is enforced, in small bodies and in large ones."""
    with pytest.raises(DecodeError, match=r"nested deeper than (64|1024) levels"):
        JsonCodec(limits=STRICT).decode(json_nested(depth, padding))
    bounded()


@pytest.mark.parametrize("padding", [0, 2_000], ids=["small", "large"])
def test_json_nested_to_a_stricter_limit_decodes(padding: int) -> None:
    """Exactly max_depth levels are fine."""
    assert JsonCodec(limits=STRICT).decode(json_nested(64, padding)) is not None


@pytest.mark.parametrize("repeat", [100, 2_000], ids=["small", "large"])
def test_json_brackets_inside_strings_do_not_count_as_nesting(repeat: int) -> None:
    """Brackets in strings only trigger the exact check, which passes."""
    body = orjson.dumps({"text": "[{" * repeat})
    assert JsonCodec(limits=STRICT).decode(body) == {"text": "[{" * repeat}


def test_json_many_shallow_collections_pass_a_stricter_depth_limit() -> None:
    """More openers than max_depth, side by side rather than nested, are within the bound."""
    value = [{"a": [1]} for _ in range(500)]
    assert JsonCodec(limits=STRICT).decode(orjson.dumps(value)) == value


def test_json_collection_over_the_limit_is_refused() -> None:
    """One array longer than max_collection_len is refused."""
    codec = JsonCodec(limits=DecodeLimits(max_collection_len=1_000))
    with pytest.raises(DecodeError, match="1001 items"):
        codec.decode(orjson.dumps([0] * 1_001))
    assert len(codec.decode(orjson.dumps([0] * 1_000))) == 1_000


def test_json_total_items_over_the_limit_are_refused() -> None:
    """Collections each within max_collection_len add up past max_total_items."""
    codec = JsonCodec(limits=DecodeLimits(max_collection_len=100, max_total_items=150))
    with pytest.raises(DecodeError, match="more than 150 items in all"):
        codec.decode(orjson.dumps([[0] * 80, [0] * 80]))
    assert codec.decode(orjson.dumps([[0] * 70, [0] * 70])) == [[0] * 70, [0] * 70]


def test_json_huge_flat_array_is_refused_with_bounded_memory(
    bounded: Callable[[], None],
) -> None:
    """A 1 MB array of 500 001 items breaks max_collection_len (100 000) by default."""
    body = b"[" + b"0," * 500_000 + b"0]"
    assert len(body) <= DEFAULT_LIMITS.max_payload_bytes
    with pytest.raises(DecodeError, match="500001 items, over 100000"):
        JsonCodec().decode(body)
    bounded()


@pytest.mark.parametrize("depth", [300, ORJSON_MAX_DEPTH])
def test_replicas_refuse_json_deeper_than_orjson_can_re_encode(depth: int) -> None:
    """The SQL replicas store decoded JSON through orjson (254 levels at most, two more in
    change events): they read with max_depth 64, so a deep payload is a decode_error row,
    not a batch that fails to insert."""
    event = Event(
        "MESSAGES", 1, "msg.t.orders", None, {CONTENT_TYPE: "application/json"}, json_nested(depth)
    )
    row = MessagesReplica().row(event)
    assert row["payload_json"] is None
    assert "nested deeper than 64 levels" in row["decode_error"]
    stored = MessagesReplica().row(replace(event, data=json_nested(64)))["payload_json"]
    assert orjson.dumps({"after": {"payload_json": stored}})


# --- a stricter depth bound, JSON and MessagePack alike --------------------------------------

#: Strings that look like containers to a byte scan: brackets, and msgpack container bytes.
DECOYS = st.sampled_from(["", "[{", "]}" * 40, bytes(range(0x80, 0xA0)).decode("latin-1")])


def depth_of(value: Any) -> int:
    """How deep lists and dicts nest in ``value`` (a scalar is 0)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


@st.composite
def nested_values(draw: st.DrawFn) -> tuple[Any, int]:
    """A value nested about 1-130 levels deep (lists and dicts, decoy strings and shallow
    siblings at every level), and its depth."""
    levels = draw(st.integers(min_value=1, max_value=130))
    value: Any = draw(DECOYS)
    for _ in range(levels):
        siblings = draw(st.lists(DECOYS | st.just([[], {}]), max_size=2))
        if draw(st.booleans()):
            value = [*siblings, value]
        else:
            value = {**{str(i): sibling for i, sibling in enumerate(siblings)}, "v": value}
    return value, depth_of(value)


@settings(max_examples=60, deadline=None)
@given(case=nested_values())
def test_a_stricter_depth_bound_refuses_exactly_the_deeper_values(case: tuple[Any, int]) -> None:
    """With max_depth 64 a value decodes if and only if it nests at most 64 levels, however
    many bracket or container bytes its strings hold, in JSON and in MessagePack."""
    value, depth = case
    for codec, body in [
        (JsonCodec(limits=STRICT), orjson.dumps(value)),
        (MsgpackCodec(limits=STRICT), msgpack.packb(value)),
    ]:
        if depth <= 64:
            assert codec.decode(body) == value
        else:
            with pytest.raises(DecodeError, match="nested deeper than 64 levels"):
                codec.decode(body)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300))
def test_arbitrary_bytes_under_stricter_limits_raise_only_decode_error(payload: bytes) -> None:
    """The scans behind a stricter bound raise nothing but DecodeError on garbage."""
    tight = DecodeLimits(max_depth=3, max_collection_len=4, max_total_items=6)
    for codec in [JsonCodec(limits=tight), MsgpackCodec(limits=tight)]:
        with contextlib.suppress(DecodeError):
            codec.decode(payload)


# --- MessagePack --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MSGPACK_MAX_DEPTH + 1, 100_000])
@pytest.mark.parametrize("header", [b"\x91", b"\x81\xa1k"], ids=["array", "map"])
def test_msgpack_nested_deeper_than_its_stack_is_refused(
    depth: int, header: bytes, bounded: Callable[[], None]
) -> None:
    """With the default limits the unpacker's own stack (1024) refuses deeper nesting."""
    with pytest.raises(DecodeError, match=f"nested deeper than {MSGPACK_MAX_DEPTH} levels"):
        MsgpackCodec().decode(header * depth + b"\xc0")
    bounded()


def test_msgpack_nested_to_its_stack_limit_decodes() -> None:
    """Exactly 1024 levels decode with the default limits (the stack has not shrunk)."""
    assert MsgpackCodec().decode(b"\x91" * MSGPACK_MAX_DEPTH + b"\xc0") is not None


@pytest.mark.parametrize(
    ("depth", "padding"),
    [(65, 0), (65, 2_000), (1_000, 0), (100_000, 0)],
    ids=["just-over", "over-in-a-large-body", "1000", "100000"],
)
def test_msgpack_nested_deeper_than_a_stricter_limit_is_refused(
    depth: int, padding: int, bounded: Callable[[], None]
) -> None:
    """An operator's max_depth of 64 is enforced, in small bodies and in large ones."""
    body = b"\x91" * depth + msgpack.packb("x" * padding)
    with pytest.raises(DecodeError, match=r"nested deeper than (64|1024) levels"):
        MsgpackCodec(limits=STRICT).decode(body)
    bounded()


def test_msgpack_nested_to_a_stricter_limit_decodes() -> None:
    """Exactly max_depth levels are fine, and container-like bytes in strings are no nesting."""
    codec = MsgpackCodec(limits=STRICT)
    assert codec.decode(b"\x91" * 64 + b"\xc0") is not None
    text = bytes(range(0x80, 0xA0)).decode("latin-1") * 10
    assert codec.decode(msgpack.packb([text] * 10)) == [text] * 10


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xc9\xff\xff\xff\xff\x01",
    ],
    ids=["array32", "map32", "str32", "bin32", "ext32"],
)
@pytest.mark.parametrize("padding", [16, 200_000], ids=["small", "large"])
def test_msgpack_huge_length_headers_are_refused(
    body: bytes, padding: int, bounded: Callable[[], None]
) -> None:
    """Length headers of four billion are refused before anything is allocated, in bodies
    shorter than max_collection_len (unpacker defaults) and longer ones (explicit limits)."""
    with pytest.raises(DecodeError):
        MsgpackCodec().decode(body + b"\x00" * padding)
    bounded()


@pytest.mark.parametrize(
    "value", [[0] * 1_001, {str(i): 0 for i in range(1_001)}], ids=["array", "map"]
)
def test_msgpack_collection_over_the_limit_is_refused(value: Any) -> None:
    """An array or map longer than max_collection_len is refused by the unpacker."""
    codec = MsgpackCodec(limits=DecodeLimits(max_collection_len=1_000))
    with pytest.raises(DecodeError, match=r"exceeds max_(array|map)_len"):
        codec.decode(msgpack.packb(value))


def test_msgpack_collection_at_the_limit_decodes() -> None:
    codec = MsgpackCodec(limits=DecodeLimits(max_collection_len=1_000))
    assert codec.decode(msgpack.packb([0] * 1_000)) == [0] * 1_000


def test_msgpack_total_items_over_the_limit_are_refused() -> None:
    """Collections each within max_collection_len add up past max_total_items."""
    codec = MsgpackCodec(limits=DecodeLimits(max_collection_len=100, max_total_items=150))
    with pytest.raises(DecodeError, match="more than 150 items in all"):
        codec.decode(msgpack.packb([[0] * 80, [0] * 80]))
    assert codec.decode(msgpack.packb([[0] * 70, [0] * 70])) == [[0] * 70, [0] * 70]


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


@pytest.mark.parametrize("depth", [UPB_MAX_DEPTH, 10_000])
def test_protobuf_recursive_message_nested_deeper_than_upb_allows_is_refused(
    depth: int, bounded: Callable[[], None]
) -> None:
    """Past upb's limit (the root and 100 nested messages) upb itself refuses."""
    codec = ProtobufCodec(PROTO_FILE)
    with pytest.raises(DecodeError, match="MaxDepth"):
        codec.decode(zigzag_varint(1) + zigzag_varint(1) + nested_node(depth))
    bounded()


def test_protobuf_recursive_message_to_upbs_limit_decodes() -> None:
    """UPB_MAX_DEPTH messages (nested_node(n) is n + 1 of them) decode by default."""
    codec = ProtobufCodec(PROTO_FILE)
    assert codec.decode(zigzag_varint(1) + zigzag_varint(1) + nested_node(UPB_MAX_DEPTH - 1))


def test_protobuf_stricter_max_depth_is_enforced_by_the_walk(
    bounded: Callable[[], None],
) -> None:
    """Between an operator's max_depth of 64 and upb's limit, the walk refuses."""
    codec = ProtobufCodec(PROTO_FILE, limits=DecodeLimits(max_depth=64))
    with pytest.raises(DecodeError, match="nested deeper than 64 levels"):
        codec.decode(zigzag_varint(1) + zigzag_varint(1) + nested_node(70))
    assert codec.decode(zigzag_varint(1) + zigzag_varint(1) + nested_node(63))
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
