"""Avro schemas the registry accepts can be read: it refuses records with no finite value
and ``fixed`` sizes past 32 bits, and a schema with references is handed to the codec with
the named types they define written in (:func:`broker.registry.schemas.avro.standalone`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.codecs import codec_for
from broker.registry.schemas import avro
from broker.registry.schemas.decoders import writer_schema
from broker.registry.schemas.types import InvalidSchemaError, ParsedSchema
from tests.unit.test_schema_avro import parse

pytestmark = pytest.mark.unit


def record(name: str, *types: Any, **extra: Any) -> dict[str, Any]:
    fields = [{"name": f"f{i}", "type": t} for i, t in enumerate(types)]
    return {"type": "record", "name": name, "fields": fields, **extra}


# --- records with no finite value ------------------------------------------------------

NO_FINITE_VALUE = {
    "array of a record of itself": {"type": "array", "items": record("R", "R")},
    "itself at the root": record("R", "int", "R"),
    "through another record": record("A", record("B", "A")),
    "a union of only itself": record("R", ["R"]),
    "a union of records that hold it": record("A", [record("B", "A"), record("C", "B")]),
}


@pytest.mark.parametrize("schema", NO_FINITE_VALUE.values(), ids=NO_FINITE_VALUE.keys())
def test_a_record_with_no_finite_value_is_refused(schema: Any) -> None:
    with pytest.raises(InvalidSchemaError, match="has no finite value"):
        parse(schema)


FINITE = {
    "optional next": record("R", "int", ["null", "R"]),
    "array of itself": record("R", {"type": "array", "items": "R"}),
    "map of itself": record("R", {"type": "map", "values": "R"}),
    "a union with a finite record": record("A", [record("B", "A"), record("C", "int")]),
    "an empty record": record("E"),
    "ended further down": record("A", record("B", record("C", ["null", "A"]))),
}


@pytest.mark.parametrize("schema", FINITE.values(), ids=FINITE.keys())
def test_a_recursive_record_that_can_end_is_accepted(schema: Any) -> None:
    assert parse(schema).canonical


def test_a_record_with_no_finite_value_through_a_reference_is_refused() -> None:
    holder = parse(record("Holder", ["null", "Node"]), {"Node": parse(record("Node", "int"))})
    assert holder.canonical  # a reference that ends is fine
    box = parse(record("Box", "int"))
    with pytest.raises(InvalidSchemaError, match="'Outer' has no finite value"):
        parse(record("Outer", "Box", "Outer"), {"Box": box})


# --- fixed sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2**31, 3_000_000_000, 2**64, -1])
def test_a_fixed_size_outside_32_bits_is_refused(size: int) -> None:
    with pytest.raises(InvalidSchemaError, match="fixed 'size' must be an integer from 0 to"):
        parse({"type": "fixed", "name": "F", "size": size})


def test_the_largest_fixed_size_is_accepted() -> None:
    assert parse({"type": "fixed", "name": "F", "size": 2**31 - 1}).canonical


# --- schemas with references, as the codec reads them ---------------------------------

INNER = record("Inner", "int")


def decode(schema: Any, body: bytes, references: dict[str, ParsedSchema]) -> Any:
    """``body`` read with ``schema`` as replay reads it: the registry's parsed schema, the
    codec built from :func:`writer_schema`."""
    parsed = parse(schema, references)
    return codec_for("application/avro", schema=writer_schema(parsed)).decode(body)


@pytest.mark.parametrize(
    ("schema", "body", "value"),
    [
        (record("Outer", "Inner"), b"\x04", {"f0": {"f0": 2}}),
        (["null", "Inner"], b"\x02\x04", {"f0": 2}),
        ({"type": "array", "items": "Inner"}, b"\x04\x04\x06\x00", [{"f0": 2}, {"f0": 3}]),
        ({"type": "map", "values": "Inner"}, b"\x02\x02k\x04\x00", {"k": {"f0": 2}}),
        ("Inner", b"\x04", {"f0": 2}),
        (
            record("Twice", "Inner", ["null", "Inner"]),
            b"\x04\x02\x06",
            {"f0": {"f0": 2}, "f1": {"f0": 3}},
        ),
    ],
)
def test_a_schema_with_a_reference_decodes(schema: Any, body: bytes, value: Any) -> None:
    assert decode(schema, body, {"Inner": parse(INNER)}) == value


def test_references_of_references_and_their_nested_types_decode() -> None:
    """A reference's nested type used before the type that defines it, a namespace, and a
    reference that has references of its own: each definition is written once."""
    color = {"type": "enum", "name": "Color", "symbols": ["RED", "BLUE"]}
    base = parse(record("Base", "long", color, namespace="geo"))
    middle = parse(record("Middle", "geo.Base", "geo.Color", namespace="geo"), {"geo.Base": base})
    outer = record("Outer", "geo.Color", "geo.Middle", ["null", "geo.Base"])
    refs = {"geo.Middle": middle, "geo.Base": base}
    body = b"\x02" + b"\x0a\x00" + b"\x02" + b"\x02\x07\x02"
    assert decode(outer, body, refs) == {
        "f0": "BLUE",
        "f1": {"f0": {"f0": 5, "f1": "RED"}, "f1": "BLUE"},
        "f2": {"f0": -4, "f1": "BLUE"},
    }
    written = json.dumps(avro.standalone(parse(outer, refs)))
    for name in ("geo.Color", "geo.Middle", "geo.Base"):
        assert written.count(f'"name": "{name}"') == 1


def test_a_recursive_reference_decodes() -> None:
    node = parse(record("Node", "int", ["null", "Node"]))
    body = b"\x04" + b"\x04\x00" + b"\x06\x00" + b"\x00"  # two nodes, each with no next
    assert decode({"type": "array", "items": "Node"}, body, {"Node": node}) == [
        {"f0": 2, "f1": None},
        {"f0": 3, "f1": None},
    ]


def test_a_schema_without_references_is_handed_over_as_parsed() -> None:
    parsed = parse(INNER)
    assert writer_schema(parsed) is parsed.parsed
    assert avro.standalone(parsed) == json.loads(parsed.canonical)
