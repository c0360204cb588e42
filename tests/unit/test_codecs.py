"""Codecs decode what the real libraries encode, choose by media type, and decode lazily.

One contract (:class:`CodecContract`) runs against every codec: samples encoded with the
real library round-trip, generated values round-trip (hypothesis), arbitrary bytes raise
nothing but :class:`DecodeError`, and oversized bodies are refused. Hostile inputs live in
``test_codecs_hostile.py``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, ClassVar

import fastavro
import msgpack
import orjson
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.codecs import (
    DEFAULT_LIMITS,
    AvroCodec,
    Codec,
    CodecKind,
    DecodedMessage,
    DecodeError,
    DecodeLimits,
    JsonCodec,
    LazyValue,
    MsgpackCodec,
    ProtobufCodec,
    RawCodec,
    codec_for,
    kind_for,
    split_wire_prefix,
)
from broker.envelope import CONTENT_TYPE, SCHEMA_ID

pytestmark = pytest.mark.unit

# The contract's property tests run once per codec subclass: "differing executors" by design.
FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
_F = descriptor_pb2.FieldDescriptorProto

# --- schemas and encoders shared with the hostile tests ----------------------------------

EVENT_AVRO: dict[str, Any] = {
    "type": "record",
    "name": "Event",
    "namespace": "test",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "n", "type": "long"},
        {"name": "score", "type": "double"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "blob", "type": "bytes"},
        {"name": "opt", "type": ["null", "int"]},
        {"name": "attrs", "type": {"type": "map", "values": "long"}},
    ],
}


def zigzag_varint(value: int) -> bytes:
    """Avro / Confluent zigzag varint encoding of a signed integer."""
    return varint(value << 1 if value >= 0 else ((-value) << 1) - 1)


def varint(value: int) -> bytes:
    """Protobuf (unsigned) varint."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def avro_bytes(schema: Any, value: Any) -> bytes:
    stream = io.BytesIO()
    fastavro.schemaless_writer(stream, fastavro.parse_schema(schema), value)
    return stream.getvalue()


def proto_file() -> Any:
    """``test.proto``: ``Event`` (with nested ``Note``), recursive ``Node``, ``Inner``."""
    proto = descriptor_pb2.FileDescriptorProto(name="test.proto", package="test", syntax="proto3")
    event = proto.message_type.add(name="Event")
    for name, number, kind, label, type_name in [
        ("id", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("seq", 2, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ("score", 3, _F.TYPE_DOUBLE, _F.LABEL_OPTIONAL, ""),
        ("ok", 4, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
        ("tags", 5, _F.TYPE_STRING, _F.LABEL_REPEATED, ""),
        ("blob", 6, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, ""),
        ("inner", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".test.Inner"),
    ]:
        field = event.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    note = event.nested_type.add(name="Note")
    note.field.add(name="text", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    node = proto.message_type.add(name="Node")
    node.field.add(
        name="child",
        number=1,
        type=_F.TYPE_MESSAGE,
        label=_F.LABEL_OPTIONAL,
        type_name=".test.Node",
    )
    node.field.add(name="v", number=2, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    inner = proto.message_type.add(name="Inner")
    inner.field.add(name="name", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    inner.field.add(name="values", number=2, type=_F.TYPE_INT32, label=_F.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool.FindFileByName("test.proto")


PROTO_FILE = proto_file()
Event = message_factory.GetMessageClass(PROTO_FILE.message_types_by_name["Event"])
Node = message_factory.GetMessageClass(PROTO_FILE.message_types_by_name["Node"])
Note = message_factory.GetMessageClass(PROTO_FILE.message_types_by_name["Event"].nested_types[0])


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# --- value strategies ---------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | FLOAT | TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=25,
)
MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | FLOAT | TEXT | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=25,
)
AVRO_VALUES = st.fixed_dictionaries(
    {
        "id": TEXT,
        "n": INT64,
        "score": FLOAT,
        "tags": st.lists(TEXT, max_size=5),
        "blob": st.binary(max_size=20),
        "opt": st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
        "attrs": st.dictionaries(TEXT, INT64, max_size=5),
    }
)
PROTO_VALUES = st.builds(
    lambda id_, seq, score, ok, tags, blob: Event(
        id=id_, seq=seq, score=score, ok=ok, tags=tags, blob=blob
    ),
    TEXT,
    INT64,
    FLOAT,
    st.booleans(),
    st.lists(TEXT, max_size=5),
    st.binary(max_size=20),
)


# --- the contract ---------------------------------------------------------------------------


class CodecContract:
    """What every codec promises; subclasses say how to build it and encode values."""

    kind: ClassVar[CodecKind]
    values: ClassVar[st.SearchStrategy[Any]]
    samples: ClassVar[list[Any]]

    def make(self, limits: DecodeLimits = DEFAULT_LIMITS) -> Codec:
        raise NotImplementedError

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def expected(self, value: Any) -> Any:
        return value

    def test_name_is_its_kind(self) -> None:
        """A codec's ``name`` is the value of the CodecKind that selects it."""
        assert self.make().name == self.kind.value

    def test_samples_encoded_by_the_library_round_trip(self) -> None:
        """Bytes written by the real library decode to the value that was written."""
        codec = self.make()
        for sample in self.samples:
            assert codec.decode(self.encode(sample)) == self.expected(sample)

    @FAST
    @given(data=st.data())
    def test_generated_values_round_trip(self, data: st.DataObject) -> None:
        """Any value the library can write decodes back to itself."""
        value = data.draw(self.values)
        assert self.make().decode(self.encode(value)) == self.expected(value)

    @FAST
    @given(payload=st.binary(max_size=200))
    def test_arbitrary_bytes_raise_nothing_but_decode_error(self, payload: bytes) -> None:
        """Garbage either decodes or raises DecodeError -- never a library exception."""
        try:
            self.make().decode(payload)
        except DecodeError as exc:
            message = str(exc)
        else:
            return
        assert "\n" not in message

    def test_truncated_sample_raises_decode_error_or_decodes(self) -> None:
        """Every prefix of a valid body is handled without a library exception."""
        codec = self.make()
        body = self.encode(self.samples[0])
        for end in range(len(body)):
            with contextlib.suppress(DecodeError):
                codec.decode(body[:end])

    def test_body_over_max_payload_bytes_is_refused(self) -> None:
        """A body larger than ``max_payload_bytes`` is a DecodeError before parsing."""
        body = self.encode(self.samples[0])
        codec = self.make(DecodeLimits(max_payload_bytes=len(body) - 1))
        with pytest.raises(DecodeError, match=r"over the \d+-byte limit"):
            codec.decode(body)


class TestJsonCodec(CodecContract):
    kind = CodecKind.JSON
    values = JSON_VALUES
    samples: ClassVar[list[Any]] = [
        {"id": "a1", "n": 3, "tags": ["x", "[{"], "nested": {"ok": True, "v": None}},
        [1, 2.5, "three"],
        "text",
        0,
    ]

    def make(self, limits: DecodeLimits = DEFAULT_LIMITS) -> Codec:
        return JsonCodec(limits=limits)

    def encode(self, value: Any) -> bytes:
        return orjson.dumps(value)


class TestMsgpackCodec(CodecContract):
    kind = CodecKind.MSGPACK
    values = MSGPACK_VALUES
    samples: ClassVar[list[Any]] = [
        {"id": "a1", "n": -(2**40), "blob": b"\x00\xff", "list": [1, [2, [3]]]},
        [None, True, 1.5],
        b"bytes",
    ]

    def make(self, limits: DecodeLimits = DEFAULT_LIMITS) -> Codec:
        return MsgpackCodec(limits=limits)

    def encode(self, value: Any) -> bytes:
        return msgpack.packb(value, use_bin_type=True)


class TestAvroCodec(CodecContract):
    kind = CodecKind.AVRO
    values = AVRO_VALUES
    samples: ClassVar[list[Any]] = [
        {
            "id": "evt-1",
            "n": 2**40,
            "score": 0.25,
            "tags": ["a", "b"],
            "blob": b"\x00\x01",
            "opt": None,
            "attrs": {"k": -1},
        },
        {"id": "", "n": 0, "score": -1e300, "tags": [], "blob": b"", "opt": 7, "attrs": {}},
    ]

    def make(self, limits: DecodeLimits = DEFAULT_LIMITS) -> Codec:
        return AvroCodec(EVENT_AVRO, limits=limits)

    def encode(self, value: Any) -> bytes:
        return avro_bytes(EVENT_AVRO, value)

    def test_schema_as_json_text_decodes_the_same(self) -> None:
        """The registry's schema text works as well as its parsed JSON."""
        body = self.encode(self.samples[0])
        assert AvroCodec(orjson.dumps(EVENT_AVRO).decode()).decode(body) == self.samples[0]

    def test_trailing_bytes_are_refused(self) -> None:
        """Bytes after the datum mean the schema is not the writer's: DecodeError."""
        with pytest.raises(DecodeError, match="trailing"):
            self.make().decode(self.encode(self.samples[0]) + b"\x00")

    def test_invalid_schema_is_a_decode_error(self) -> None:
        """A schema fastavro cannot parse is reported as a DecodeError."""
        with pytest.raises(DecodeError, match="invalid schema"):
            AvroCodec({"type": "record", "name": "R", "fields": [{"name": "x", "type": "nope"}]})


class TestProtobufCodec(CodecContract):
    kind = CodecKind.PROTOBUF
    values = PROTO_VALUES
    samples: ClassVar[list[Any]] = [
        Event(id="evt-1", seq=2**40, score=0.5, ok=True, tags=["a", "b"], blob=b"\x00\x01"),
        Event(),
    ]

    def make(self, limits: DecodeLimits = DEFAULT_LIMITS) -> Codec:
        return ProtobufCodec(PROTO_FILE, limits=limits)

    def encode(self, value: Any) -> bytes:
        return b"\x00" + value.SerializeToString()

    def expected(self, value: Any) -> Any:
        return as_dict(value)

    def test_samples_round_trip_through_the_python_values(self) -> None:
        """int64 comes back as a string, bytes as base64, as in proto3 JSON."""
        decoded = self.make().decode(self.encode(self.samples[0]))
        assert decoded["seq"] == str(2**40)
        assert decoded["blob"] == "AAE="
        assert decoded["tags"] == ["a", "b"]

    @pytest.mark.parametrize(
        ("indexes", "message", "expected"),
        [
            (zigzag_varint(1) + zigzag_varint(1), Node(v=5), {"v": 5}),
            (
                zigzag_varint(2) + zigzag_varint(0) + zigzag_varint(0),
                Note(text="hi"),
                {"text": "hi"},
            ),
            (zigzag_varint(1) + zigzag_varint(0), Event(id="x"), {"id": "x"}),
        ],
        ids=["second-top-level", "nested", "explicit-first"],
    )
    def test_message_indexes_pick_the_message(
        self, indexes: bytes, message: Message, expected: dict[str, Any]
    ) -> None:
        """The Confluent message-index path selects top-level and nested messages."""
        assert self.make().decode(indexes + message.SerializeToString()) == expected

    @pytest.mark.parametrize(
        "indexes",
        [
            zigzag_varint(1) + zigzag_varint(3),
            zigzag_varint(1) + zigzag_varint(-1),
            zigzag_varint(-1),
            zigzag_varint(1000),
            b"\xff" * 11,
            zigzag_varint(3),
        ],
        ids=["no-such-message", "negative-index", "negative-count", "huge-count", "long", "short"],
    )
    def test_bad_message_indexes_are_refused(self, indexes: bytes) -> None:
        """Index arrays that name no message, or are malformed, are DecodeErrors."""
        with pytest.raises(DecodeError):
            self.make().decode(indexes)

    def test_empty_body_is_refused(self) -> None:
        """Without the index array there is no message to read."""
        with pytest.raises(DecodeError, match="message-index"):
            self.make().decode(b"")


class TestRawCodec(CodecContract):
    kind = CodecKind.RAW
    values = st.binary(max_size=100)
    samples: ClassVar[list[Any]] = [b"\x00\x01 anything", b""]

    def make(self, limits: DecodeLimits = DEFAULT_LIMITS) -> Codec:
        return RawCodec(limits=limits)

    def encode(self, value: Any) -> bytes:
        return bytes(value)

    def test_body_over_max_payload_bytes_is_refused(self) -> None:
        """Even opaque bodies are bounded."""
        with pytest.raises(DecodeError, match="over the 3-byte limit"):
            RawCodec(limits=DecodeLimits(max_payload_bytes=3)).decode(b"abcd")


# --- choosing a codec ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/json", CodecKind.JSON),
        ("Application/JSON; charset=utf-8", CodecKind.JSON),
        ("application/cloudevents+json", CodecKind.JSON),
        ("application/vnd.acme.order+json", CodecKind.JSON),
        ("application/avro", CodecKind.AVRO),
        ("avro/binary", CodecKind.AVRO),
        ("application/vnd.apache.avro+binary", CodecKind.AVRO),
        ("application/x-protobuf", CodecKind.PROTOBUF),
        ("application/protobuf", CodecKind.PROTOBUF),
        ("application/vnd.google.protobuf", CodecKind.PROTOBUF),
        ("application/msgpack", CodecKind.MSGPACK),
        ("application/x-msgpack", CodecKind.MSGPACK),
        ("application/octet-stream", CodecKind.RAW),
        ("text/plain", CodecKind.RAW),
        ("", CodecKind.RAW),
        (None, CodecKind.RAW),
    ],
)
def test_media_type_selects_the_codec_kind(content_type: str | None, kind: CodecKind) -> None:
    """``kind_for`` maps media types (parameters and case ignored) to codec kinds."""
    assert kind_for(content_type) == kind


def test_codec_for_builds_each_kind_with_its_schema() -> None:
    """``codec_for`` passes the schema to Avro and Protobuf and none to the others."""
    assert codec_for("application/json").name == "json"
    assert codec_for("application/msgpack").name == "msgpack"
    assert codec_for("image/png").name == "raw"
    assert codec_for("application/avro", schema=EVENT_AVRO).name == "avro"
    assert codec_for("application/x-protobuf", schema=PROTO_FILE).name == "protobuf"


@pytest.mark.parametrize("content_type", ["application/avro", "application/x-protobuf"])
def test_codec_for_schema_kinds_without_a_schema_is_a_decode_error(content_type: str) -> None:
    """Avro and Protobuf cannot be read without the writer's schema."""
    with pytest.raises(DecodeError, match="needs the writer"):
        codec_for(content_type)


def test_split_wire_prefix_reads_the_confluent_frame() -> None:
    """``0x00`` + big-endian uint32 id is split off; anything else comes back whole."""
    assert split_wire_prefix(b"\x00\x00\x00\x01\x02body") == (258, b"body")
    assert split_wire_prefix(b"{}") == (None, b"{}")
    assert split_wire_prefix(b"\x00\x00\x00\x01\x02body", "application/avro") == (258, b"body")
    framed_binary = b"\x00\x00\x00\x00\x07raw"
    assert split_wire_prefix(framed_binary, "application/octet-stream") == (None, framed_binary)


# --- laziness ----------------------------------------------------------------------------------


class CountingCodec:
    """Wraps a codec and counts decode calls."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def decode(self, payload: bytes) -> Any:
        self.calls += 1
        return self.inner.decode(payload)


def test_headers_and_metadata_decode_nothing_and_value_decodes_once() -> None:
    """Reading headers, subject, sequence or schema id never decodes; ``.value`` decodes once."""
    codec = CountingCodec(AvroCodec(EVENT_AVRO))
    sample = TestAvroCodec.samples[0]
    payload = b"\x00" + (7).to_bytes(4, "big") + avro_bytes(EVENT_AVRO, sample)
    headers = {CONTENT_TYPE: "application/avro", SCHEMA_ID: "7"}
    message = DecodedMessage(payload, headers, codec, subject="msg.t.orders", sequence=42)
    assert (message.subject, message.sequence, message.schema_id) == ("msg.t.orders", 42, 7)
    assert message.content_type == "application/avro"
    assert message.headers is headers
    assert not message.decoded
    assert codec.calls == 0
    assert message.value == sample
    assert message.value is message.value
    assert codec.calls == 1
    assert message.decoded


def test_a_decode_error_is_cached_and_raised_again() -> None:
    """A body that fails to decode is decoded once; every access raises the same error."""
    codec = CountingCodec(JsonCodec())
    lazy = LazyValue(b"{not json", codec)
    with pytest.raises(DecodeError) as first:
        _ = lazy.value
    with pytest.raises(DecodeError) as second:
        _ = lazy.value
    assert first.value is second.value is lazy.error
    assert codec.calls == 1


def test_lazy_value_decodes_on_first_access_only() -> None:
    """A bare LazyValue decodes nothing when built and once however often it is read."""
    codec = CountingCodec(MsgpackCodec())
    lazy = LazyValue(msgpack.packb({"a": [1, 2]}), codec)
    assert (codec.calls, lazy.decoded, lazy.error) == (0, False, None)
    assert lazy.value == {"a": [1, 2]}
    assert lazy.value is lazy.value
    assert (codec.calls, lazy.decoded, lazy.error) == (1, True, None)


@pytest.mark.parametrize(
    ("payload", "content_type", "expected"),
    [
        (b"\x00\x00\x00\x00\x07" + b'{"framed": true}', "application/json", {"framed": True}),
        (b'{"a": 1}', "application/json", {"a": 1}),
        (b"\x00", "application/msgpack", 0),
        (b"\x00\x00\x00\x00\x07\x01", "application/msgpack", DecodeError),
        (b"\x00\x00\x00\x00\x07", "application/x-protobuf", DecodeError),
        (b"", "application/json", DecodeError),
    ],
    ids=[
        "framed-json",
        "plain-json",
        "zero-msgpack",
        "msgpack-is-never-framed",
        "framed-empty-protobuf",
        "empty",
    ],
)
def test_decoded_message_strips_the_prefix_only_where_publishing_did(
    payload: bytes, content_type: str, expected: Any
) -> None:
    """Only media types publishing frames lose a leading 0x00 + id; others decode whole."""
    codec = codec_for(content_type, schema=PROTO_FILE)
    message = DecodedMessage(payload, {CONTENT_TYPE: content_type}, codec)
    if expected is DecodeError:
        with pytest.raises(DecodeError):
            _ = message.value
        assert message.error is not None
    else:
        assert message.value == expected


def test_unframed_json_is_decoded_whole() -> None:
    """A JSON body without a wire prefix reaches the codec unchanged."""
    message = DecodedMessage(b'{"a": 1}', {CONTENT_TYPE: "application/json"}, JsonCodec())
    assert message.value == {"a": 1}
    assert message.schema_id is None


def test_decode_error_message_is_one_line() -> None:
    """Library messages spanning lines are cut to their first line and prefixed."""
    error = DecodeError("json", "first line\nsecond line")
    assert str(error) == "json payload could not be decoded: first line"
