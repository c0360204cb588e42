"""Schema-on-read codecs: decode stored payloads lazily, under hard bounds, with one error."""

from broker.codecs.avro import AVRO_MAX_DEPTH, AvroCodec, AvroSchema
from broker.codecs.base import (
    DEFAULT_LIMITS,
    Codec,
    CodecKind,
    DecodeError,
    DecodeLimits,
    kind_for,
    split_wire_prefix,
)
from broker.codecs.json import ORJSON_MAX_DEPTH, JsonCodec
from broker.codecs.lazy import CODECS, DecodedMessage, LazyValue, Schema, codec_for
from broker.codecs.msgpack import MSGPACK_MAX_DEPTH, MsgpackCodec
from broker.codecs.protobuf import UPB_MAX_DEPTH, ProtobufCodec, read_message_indexes
from broker.codecs.raw import RawCodec

__all__ = [
    "AVRO_MAX_DEPTH",
    "CODECS",
    "DEFAULT_LIMITS",
    "MSGPACK_MAX_DEPTH",
    "ORJSON_MAX_DEPTH",
    "UPB_MAX_DEPTH",
    "AvroCodec",
    "AvroSchema",
    "Codec",
    "CodecKind",
    "DecodeError",
    "DecodeLimits",
    "DecodedMessage",
    "JsonCodec",
    "LazyValue",
    "MsgpackCodec",
    "ProtobufCodec",
    "RawCodec",
    "Schema",
    "codec_for",
    "kind_for",
    "read_message_indexes",
    "split_wire_prefix",
]
