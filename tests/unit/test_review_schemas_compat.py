"""Compatibility rules reviewed against what a consumer actually sees: JSON Schema writers
built with ``allOf``/``anyOf``, writer enum values checked against the reader, Protobuf
oneof members removed."""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.registry.schemas import jsonschema as js
from broker.registry.schemas import protobuf
from broker.registry.schemas.types import (
    ParsedSchema,
    SchemaTooComplexError,
    SchemaType,
    parse_schema,
)

pytestmark = pytest.mark.unit

DRAFT4 = "http://json-schema.org/draft-04/schema#"
DRAFT2020 = "https://json-schema.org/draft/2020-12/schema"


def json_schema(schema: Any) -> ParsedSchema:
    return parse_schema(SchemaType.JSON, json.dumps(schema))


def accepts(schema: Any, value: Any) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return bool(cls(schema).is_valid(value))


@pytest.mark.parametrize(
    ("writer", "reader", "value"),
    [
        pytest.param(
            {"allOf": [
                {"patternProperties": {"^x": {"type": "string"}}},
                {"patternProperties": {"^y": {"type": "integer"}}, "additionalProperties": False},
            ]},
            {"patternProperties": {"^x": {"type": "string"}}, "additionalProperties": False},
            {"y1": 5},
            id="additionalProperties-without-its-patternProperties",
        ),
        pytest.param(
            {"type": "object", "patternProperties": {"^x": {"type": "string"}}, "anyOf": [
                {"patternProperties": {"^y": {"type": "integer"}}, "additionalProperties": False},
            ]},
            {"type": "object", "patternProperties": {"^x": {"type": "string"}},
             "additionalProperties": False},
            {"y1": 5},
            id="anyOf-branch-with-siblings",
        ),
        pytest.param(
            {"type": "array", "allOf": [
                {"items": [{"type": "integer"}]},
                {"items": [{}, {}], "additionalItems": False},
            ]},
            {"type": "array", "items": [{"type": "integer"}], "additionalItems": False},
            [1, "x"],
            id="additionalItems-without-its-items",
        ),
        pytest.param(
            {"type": "array", "allOf": [{"additionalItems": False}, {"items": [{}]}]},
            {"type": "array", "items": [{}], "additionalItems": False},
            [1, 2],
            id="additionalItems-given-items-it-never-had",
        ),
        pytest.param(
            {"$schema": DRAFT2020, "type": "array", "allOf": [
                {"prefixItems": [{"type": "integer"}]},
                {"prefixItems": [{}, {}], "items": False},
            ]},
            {"$schema": DRAFT2020, "type": "array", "prefixItems": [{"type": "integer"}],
             "items": False},
            [1, "x"],
            id="items-without-its-prefixItems",
        ),
        pytest.param(
            {"$schema": DRAFT4, "type": "number", "allOf": [
                {"maximum": 10}, {"maximum": 100, "exclusiveMaximum": True},
            ]},
            {"$schema": DRAFT4, "type": "number", "maximum": 10, "exclusiveMaximum": True},
            10,
            id="draft4-exclusiveMaximum-without-its-maximum",
        ),
    ],
)  # fmt: skip
def test_json_writer_allof_is_not_merged_into_a_narrower_schema(
    writer: Any, reader: Any, value: Any
) -> None:
    """A writer whose ``allOf``/``anyOf`` branches are merged must not come out narrower than
    the writer: a keyword that depends on a sibling (``additionalProperties`` on
    ``patternProperties``, ``additionalItems`` on ``items``...) cannot be taken without it.
    Before, each of these was accepted, and the reader refused ``value`` the writer wrote."""
    assert accepts(writer, value)
    assert not accepts(reader, value)
    assert js.compatible(json_schema(reader), json_schema(writer)) != []


def test_json_writer_allof_merge_keeps_what_it_can_prove() -> None:
    """The merge still proves the ordinary cases: branches with their own properties."""
    writer = {"allOf": [
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        {"properties": {"b": {"type": "integer"}}, "patternProperties": {"^x": {}}},
    ]}  # fmt: skip
    reader = {"type": "object", "properties": {"a": {"type": "string"},
              "b": {"type": "number"}}, "required": ["a"]}  # fmt: skip
    assert js.compatible(json_schema(reader), json_schema(writer)) == []


# ``items``, ``prefixItems``, ``additionalItems``, ``patternProperties`` and
# ``additionalProperties`` side by side, in branches of a writer ``allOf``.
_leaf = st.sampled_from([
    {}, {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"maximum": 2},
])  # fmt: skip
_part = st.fixed_dictionaries(
    {},
    optional={
        "properties": st.dictionaries(st.sampled_from(["a", "xa"]), _leaf, max_size=2),
        "patternProperties": st.dictionaries(st.sampled_from(["^x", "^y"]), _leaf, max_size=2),
        "additionalProperties": st.sampled_from([False, {"type": "string"}]),
        "items": st.one_of(_leaf, st.lists(_leaf, min_size=1, max_size=2)),
        "additionalItems": st.sampled_from([False, {"type": "integer"}]),
        "maximum": st.integers(0, 3),
        "minimum": st.integers(0, 3),
    },
)
_values = st.recursive(
    st.one_of(st.integers(-1, 4), st.sampled_from(["s", 2.5, None])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "xa", "y1", "z"]), inner, max_size=3),
    ),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_part, min_size=2, max_size=3),
    st.data(),
    st.lists(_values, min_size=10, max_size=25),
)
def test_json_allof_writer_compatible_means_every_written_value_is_read(
    parts: list[dict[str, Any]], data: st.DataObject, values: list[Any]
) -> None:
    """Soundness: a reader the check accepts for a writer ``allOf`` reads every value the
    writer accepts. The reader is a branch, or branches laid over each other, as one who
    flattens an ``allOf`` would write it."""
    writer = {"allOf": parts}
    chosen = data.draw(st.lists(st.sampled_from(parts), min_size=1, max_size=len(parts)))
    reader = {k: v for part in chosen for k, v in part.items()}
    if js.compatible(json_schema(reader), json_schema(writer)):
        return
    for value in values:
        try:
            wrong = accepts(writer, value) and not accepts(reader, value)
        except TypeError:  # jsonschema itself trips on some draft 7 item forms
            continue
        assert not wrong, f"reader refuses {value!r}, which the writer accepts"


def test_json_writer_enum_against_a_reader_jsonschema_cannot_run_is_a_message() -> None:
    """Draft 7 ``items: true`` beside ``additionalItems`` makes ``jsonschema`` raise
    ``TypeError`` on an array; checking a writer's enum values against such a reader was a
    traceback (HTTP 500), and is now a refusal with a message."""
    reader = json_schema({"items": True, "additionalItems": False})
    writer = json_schema({"enum": [[1, 2]]})
    assert js.compatible(reader, writer) != []


def test_json_writer_enum_against_a_backtracking_reader_pattern_is_bounded() -> None:
    """A reader ``pattern`` that backtracks catastrophically, run by ``re`` on a writer enum
    value, held the worker: about 17 s at 41 characters, doubling every two more. Now the
    match is bounded like ``patternProperties``: too complex, within the matching time."""
    reader = json_schema({"type": "string", "pattern": "^(a|aa)+$"})
    writer = json_schema({"enum": ["a" * 60 + "b"]})
    started = time.perf_counter()
    with pytest.raises(SchemaTooComplexError, match="pattern"):
        js.compatible(reader, writer)
    assert time.perf_counter() - started < 5 * js.MAX_PATTERN_SECONDS


def test_json_writer_enum_is_still_checked_against_reader_patterns() -> None:
    reader = json_schema({
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}$"}},
        "patternProperties": {"^x-": {"type": "string"}},
        "additionalProperties": False,
    })  # fmt: skip
    good = json_schema({"enum": [{"code": "DE"}, {"code": "FR", "x-note": "n"}]})
    assert js.compatible(reader, good) == []
    for bad in ({"code": "de"}, {"code": "DE", "x-note": 1}, {"code": "DE", "other": "o"}):
        assert js.compatible(reader, json_schema({"enum": [bad]})) != []


def proto(body: str) -> ParsedSchema:
    return parse_schema(SchemaType.PROTOBUF, f'syntax = "proto3";\npackage acme;\n{body}')


def test_protobuf_member_removed_from_a_oneof_is_incompatible() -> None:
    """A reader whose oneof lost a member reads a message with that member set as one with
    none set; Confluent refuses it (``ONEOF_FIELD_REMOVED``), and it was accepted here."""
    old = proto("message M { oneof kind { string a = 1; int32 b = 2; } }")
    new = proto("message M { oneof kind { string a = 1; } }")
    assert any("removed from oneof 'kind'" in m for m in protobuf.compatible(new, old))


def test_protobuf_member_dropped_while_the_oneof_is_renamed_is_incompatible() -> None:
    old = proto("message M { oneof kind { string a = 1; int32 b = 2; } }")
    new = proto("message M { oneof sort { string a = 1; } }")
    assert protobuf.compatible(new, old) != []


def test_protobuf_whole_oneof_removed_or_member_added_is_compatible() -> None:
    old = proto("message M { int32 id = 9; oneof kind { string a = 1; int32 b = 2; } }")
    assert protobuf.compatible(proto("message M { int32 id = 9; }"), old) == []
    added = proto(
        "message M { int32 id = 9; oneof kind { string a = 1; int32 b = 2; bool c = 3; } }"
    )
    assert protobuf.compatible(added, old) == []
