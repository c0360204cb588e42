"""Codec benchmark: decode throughput through the broker vs the raw library, same bytes, same run.

For each of JSON, Avro, Protobuf and MessagePack one representative agent event (a dozen
fields, a nested object, a short list) is encoded with the real library. Then, ``--n``
times each:

* **broker** -- what a reader does per stored message: build a
  :class:`~broker.codecs.DecodedMessage` from the stored payload (with the Confluent wire
  prefix for Avro and Protobuf) and its headers, and read ``.value`` (prefix split, bounds
  checks, decode, cache);
* **raw** -- the library alone on the body without the prefix: ``orjson.loads``,
  ``fastavro.schemaless_reader`` over a ``BytesIO`` with the already-parsed schema,
  upb ``ParseFromString`` *plus* ``json_format.MessageToDict(preserving_proto_field_name=
  True)`` (the codec returns that dict, so the baseline does the same conversion), and
  ``msgpack.unpackb``.

The ratio is broker/raw throughput (target >= 0.8x). Both sides are closures over the
same local variables, and their runs alternate (broker, raw, broker, raw, ...) so that a
busy neighbour slows both alike; each keeps its best of ``--repeat`` runs.

Two shapes: a small ``event`` (~250-370 bytes) and a ``document`` (~4.5 KB: the event with
a 4 KB text and 40 tags, closer to what agents exchange).

The first line says which ``DecodedMessage`` was measured: the C accelerator
(``broker.codecs._lazy``, built at install where a C compiler is available) or the Python
classes (not built, or ``BROKER_PURE_PYTHON=1``).

Usage: ``python benchmarks/codecs.py [--n 50000] [--repeat 5] [--shape event|document|both]``
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import msgpack
import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.codecs import Codec, DecodedMessage, codec_for  # noqa: E402
from broker.codecs.lazy import IMPLEMENTATION  # noqa: E402
from broker.envelope import CONTENT_TYPE, SCHEMA_ID  # noqa: E402

_F = descriptor_pb2.FieldDescriptorProto
EVENT: dict[str, Any] = {
    "event_id": "01J9ZK3V6Q8H4W2N5T7R9X1Y3B",
    "agent": "planner-7",
    "kind": "task.completed",
    "seq": 1_234_567,
    "attempt": 2,
    "score": 0.8731,
    "ok": True,
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "summary": "Planned 4 steps for the booking request; all tools answered within budget.",
    "tags": ["booking", "travel", "priority-high"],
    "result": {"status": "done", "tokens": 1834, "model": "small-v2"},
}
AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "AgentEvent",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "agent", "type": "string"},
        {"name": "kind", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "attempt", "type": "int"},
        {"name": "score", "type": "double"},
        {"name": "ok", "type": "boolean"},
        {"name": "trace_id", "type": "string"},
        {"name": "summary", "type": "string"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {
            "name": "result",
            "type": {
                "type": "record",
                "name": "Result",
                "fields": [
                    {"name": "status", "type": "string"},
                    {"name": "tokens", "type": "long"},
                    {"name": "model", "type": "string"},
                ],
            },
        },
    ],
}
PREFIX = b"\x00" + (42).to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class Case:
    """One format: the stored message (for the broker) and the raw decode of its body."""

    name: str
    payload: bytes
    headers: dict[str, str]
    codec: Codec
    raw: Callable[[], object]
    baseline: str


def _proto_file() -> Any:
    proto = descriptor_pb2.FileDescriptorProto(name="bench.proto", package="b", syntax="proto3")
    event = proto.message_type.add(name="AgentEvent")
    result = proto.message_type.add(name="Result")
    scalars = [
        ("event_id", _F.TYPE_STRING),
        ("agent", _F.TYPE_STRING),
        ("kind", _F.TYPE_STRING),
        ("seq", _F.TYPE_INT64),
        ("attempt", _F.TYPE_INT32),
        ("score", _F.TYPE_DOUBLE),
        ("ok", _F.TYPE_BOOL),
        ("trace_id", _F.TYPE_STRING),
        ("summary", _F.TYPE_STRING),
    ]
    for number, (name, kind) in enumerate(scalars, start=1):
        event.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    event.field.add(name="tags", number=10, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
    nested = event.field.add(name="result", number=11, type=_F.TYPE_MESSAGE)
    nested.type_name = ".b.Result"
    result.field.add(name="status", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    result.field.add(name="tokens", number=2, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL)
    result.field.add(name="model", number=3, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool.FindFileByName("bench.proto")


def document() -> dict[str, Any]:
    """A typical agent message: the event with a 4 KB text and 40 tags."""
    words = "the planner asked the booking tool for three options and ranked them by price "
    return {
        **EVENT,
        "summary": (words * 60)[:4000],
        "tags": [f"tag-{i}" for i in range(40)],
    }


def cases(event: dict[str, Any]) -> list[Case]:
    """The four formats, each encoded by its own library."""
    EVENT = event
    json_body = orjson.dumps(EVENT)
    parsed = fastavro.parse_schema(AVRO_SCHEMA)
    stream = io.BytesIO()
    fastavro.schemaless_writer(stream, parsed, EVENT)
    avro_body = stream.getvalue()
    file = _proto_file()
    message_class = message_factory.GetMessageClass(file.message_types_by_name["AgentEvent"])
    proto_body = message_class(**EVENT).SerializeToString()
    msgpack_body = msgpack.packb(EVENT)

    def raw_proto() -> object:
        message = message_class()
        message.ParseFromString(proto_body)
        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    def headers(content_type: str, framed: bool) -> dict[str, str]:
        return {CONTENT_TYPE: content_type, **({SCHEMA_ID: "42"} if framed else {})}

    return [
        Case(
            "json",
            json_body,
            headers("application/json", False),
            codec_for("application/json"),
            lambda: orjson.loads(json_body),
            "orjson.loads",
        ),
        Case(
            "avro",
            PREFIX + avro_body,
            headers("application/avro", True),
            codec_for("application/avro", schema=AVRO_SCHEMA),
            lambda: fastavro.schemaless_reader(io.BytesIO(avro_body), parsed, None),
            "schemaless_reader(BytesIO)",
        ),
        Case(
            "protobuf",
            PREFIX + b"\x00" + proto_body,
            headers("application/x-protobuf", True),
            codec_for("application/x-protobuf", schema=file),
            raw_proto,
            "ParseFromString+MessageToDict",
        ),
        Case(
            "msgpack",
            msgpack_body,
            headers("application/msgpack", False),
            codec_for("application/msgpack"),
            lambda: msgpack.unpackb(msgpack_body),
            "msgpack.unpackb",
        ),
    ]


def best_rates(fns: list[Callable[[], object]], n: int, repeat: int) -> list[float]:
    """Calls per second of each of ``fns``: the best of ``repeat`` runs of ``n`` calls, the
    runs of all of them interleaved."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for index, fn in enumerate(fns):
            started = time.perf_counter()
            for _ in range(n):
                fn()
            best[index] = min(best[index], time.perf_counter() - started)
    return [n / seconds for seconds in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="decodes per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is kept")
    parser.add_argument(
        "--shape",
        choices=["event", "document", "both"],
        default="both",
        help="event: ~250-370 bytes; document: ~4.5 KB (a 4 KB text, 40 tags)",
    )
    args = parser.parse_args()
    print(f"DecodedMessage: {IMPLEMENTATION} implementation")
    shapes = {"event": EVENT, "document": document()}
    for shape, event in shapes.items():
        if args.shape in {shape, "both"}:
            run(shape, event, args.n, args.repeat)


def reader(case: Case) -> Callable[[], object]:
    """What a reader does per stored message: wrap it, read ``.value``."""
    payload, headers, codec = case.payload, case.headers, case.codec

    def broker() -> object:
        return DecodedMessage(payload, headers, codec).value

    return broker


def run(shape: str, event: dict[str, Any], n: int, repeat: int) -> None:
    print(f"\n{shape}")
    print(f"{'codec':<9} {'bytes':>6} {'broker/s':>11} {'raw/s':>11} {'ratio':>6}  raw baseline")
    for case in cases(event):
        expected = case.raw()
        broker = reader(case)
        assert broker() == expected, f"{case.name}: broker and raw decode differ"
        broker_rate, raw_rate = best_rates([broker, case.raw], n, repeat)
        print(
            f"{case.name:<9} {len(case.payload):>6} {broker_rate:>11,.0f} {raw_rate:>11,.0f} "
            f"{broker_rate / raw_rate:>5.2f}x  {case.baseline}"
        )


if __name__ == "__main__":
    main()
