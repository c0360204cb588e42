"""Protobuf enums are varint integers for compatibility, as in Confluent's
``FieldSchemaDiff``: an enum field may become an int32/int64/uint32/uint64/bool and back."""

from __future__ import annotations

import pytest

from broker.registry.schemas import protobuf
from broker.registry.schemas.types import ParsedSchema, SchemaType, parse_schema

pytestmark = pytest.mark.unit


def parse(body: str) -> ParsedSchema:
    text = f'syntax = "proto3";\npackage lab;\nenum State {{ IDLE = 0; BUSY = 1; }}\n{body}'
    return parse_schema(SchemaType.PROTOBUF, text)


def field_change(old: str, new: str, *, extra: str = "") -> list[str]:
    """Why a reader whose field 1 is ``new`` cannot read data written with ``old``."""
    reader = parse(f"message Probe {{ {new} state = 1; }}\n{extra}")
    writer = parse(f"message Probe {{ {old} state = 1; }}\n{extra}")
    return protobuf.compatible(reader, writer)


@pytest.mark.parametrize("integer", ["int32", "int64", "uint32", "uint64", "bool"])
def test_protobuf_enum_and_varint_integer_are_interchangeable(integer: str) -> None:
    assert field_change("State", integer) == []
    assert field_change(integer, "State") == []


def test_protobuf_enum_replaced_by_another_enum_is_compatible() -> None:
    """Confluent compares enum fields by scalar kind only, never by the enum's name."""
    assert field_change("State", "Phase", extra="enum Phase { NEW = 0; }") == []


@pytest.mark.parametrize("other", ["sint32", "sint64", "fixed32", "sfixed64", "double", "string"])
def test_protobuf_enum_and_a_non_varint_type_stay_incompatible(other: str) -> None:
    assert field_change("State", other) == [f"Probe.state(1): type changed from enum to {other}"]
    assert field_change(other, "State") == [f"Probe.state(1): type changed from {other} to enum"]


def test_protobuf_enum_and_message_stay_incompatible() -> None:
    problems = field_change("State", "Box", extra="message Box { int32 v = 1; }")
    assert problems == ["Probe.state(1): type changed from enum to message"]


def test_protobuf_enum_in_repeated_fields_and_map_values_is_a_varint_too() -> None:
    assert field_change("repeated State", "repeated int32") == []
    assert field_change("map<string, State>", "map<string, uint64>") == []
    assert field_change("map<string, State>", "map<string, string>") != []
