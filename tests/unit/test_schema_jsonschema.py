"""JSON Schema parsing and the reader-accepts-everything-the-writer-accepts check."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.registry.schemas import jsonschema as js
from broker.registry.schemas.types import (
    InvalidSchemaError,
    ParsedSchema,
    SchemaType,
    parse_schema,
)

pytestmark = pytest.mark.unit


def parse(schema: Any, references: dict[str, ParsedSchema] | None = None) -> ParsedSchema:
    return parse_schema(SchemaType.JSON, json.dumps(schema), references)


def check(reader: Any, writer: Any) -> list[str]:
    return js.compatible(parse(reader), parse(writer))


def obj(props: dict[str, Any], *, required: list[str] | None = None, **extra: Any) -> Any:
    return {"type": "object", "properties": props, "required": required or [], **extra}


STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}


def test_json_canonical_ignores_key_order_and_whitespace() -> None:
    a = parse_schema(SchemaType.JSON, '{"type": "object", "properties": {"a": {"type": "string"}}}')
    b = parse_schema(SchemaType.JSON, '{"properties":{"a":{"type":"string"}},\n "type":"object"}')
    assert a.canonical == b.canonical
    assert a.parsed == {"type": "object", "properties": {"a": {"type": "string"}}}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "object or a boolean"),
        ('{"type": "strin"}', "invalid JSON Schema"),
        ('{"minLength": -1}', "invalid JSON Schema"),
        ('{"$schema": "http://example.com/nope", "type": "string"}', "unknown $schema"),
        ('{"$ref": "#/definitions/missing"}', "does not resolve"),
        ('{"$ref": "other.json"}', "does not resolve"),
        ('{"type": "number", "minimum": NaN}', "not valid JSON"),
    ],
)
def test_json_invalid_schema_is_rejected_with_a_message(text: str, fragment: str) -> None:
    with pytest.raises(InvalidSchemaError, match=fragment.replace("$", r"\$")):
        parse_schema(SchemaType.JSON, text)


def test_json_draft_2020_12_is_validated_with_its_meta_schema() -> None:
    draft = "https://json-schema.org/draft/2020-12/schema"
    parse({"$schema": draft, "prefixItems": [STR], "items": False})
    with pytest.raises(InvalidSchemaError):
        parse({"$schema": draft, "prefixItems": STR})


def test_json_nesting_over_64_levels_and_huge_text_are_rejected() -> None:
    deep: Any = {}
    for _ in range(70):
        deep = {"items": deep}
    with pytest.raises(InvalidSchemaError, match="nests deeper"):
        parse(deep)
    with pytest.raises(InvalidSchemaError, match="larger than"):
        parse_schema(SchemaType.JSON, '{"description": "' + "x" * (1 << 20) + '"}')


def test_json_ref_to_a_reference_resolves_and_is_compared() -> None:
    address = parse(obj({"street": STR}))
    v1 = parse(obj({"home": {"$ref": "address.json"}}), {"address.json": address})
    narrower = parse(obj({"street": {"type": "string", "maxLength": 10}}))
    v2 = parse(obj({"home": {"$ref": "address.json"}}), {"address.json": narrower})
    assert js.compatible(v1, v1) == []
    assert js.compatible(v2, v1) != []
    assert js.compatible(v1, v2) == []


def test_json_integer_is_readable_as_number_but_not_the_reverse() -> None:
    assert check(NUM, INT) == []
    assert check(INT, NUM) != []


def test_json_type_narrowed_is_incompatible_and_widened_is_compatible() -> None:
    assert check({"type": ["string", "null"]}, STR) == []
    assert any("'null'" in m for m in check(STR, {"type": ["string", "null"]}))
    assert check(STR, {}) != []


def test_json_optional_property_added_to_closed_writer_is_compatible() -> None:
    writer = obj({"a": STR}, additionalProperties=False)
    reader = obj({"a": STR, "b": INT})
    assert check(reader, writer) == []


def test_json_property_added_to_open_content_model_is_flagged() -> None:
    problems = check(obj({"a": STR, "b": INT}), obj({"a": STR}))
    assert any("open" in m and "/properties/b" in m for m in problems)


def test_json_property_added_with_any_schema_to_open_model_is_compatible() -> None:
    assert check(obj({"a": STR, "b": {}}), obj({"a": STR})) == []


def test_json_property_removed_from_closed_reader_is_incompatible() -> None:
    reader = obj({"a": STR}, additionalProperties=False)
    problems = check(reader, obj({"a": STR, "b": INT}))
    assert any("removed" in m and "/properties/b" in m for m in problems)


def test_json_property_removed_from_open_reader_is_compatible() -> None:
    assert check(obj({"a": STR}), obj({"a": STR, "b": INT})) == []


def test_json_closing_an_open_content_model_is_incompatible() -> None:
    problems = check(obj({"a": STR}, additionalProperties=False), obj({"a": STR}))
    assert any("closed" in m for m in problems)


def test_json_required_property_added_is_incompatible() -> None:
    problems = check(obj({"a": STR}, required=["a"]), obj({"a": STR}))
    assert any("'a' is required" in m for m in problems)
    assert check(obj({"a": STR}), obj({"a": STR}, required=["a"])) == []


def test_json_enum_narrowed_is_incompatible_and_widened_is_compatible() -> None:
    assert check({"enum": ["a", "b", "c"]}, {"enum": ["a", "b"]}) == []
    assert any("'c'" in m for m in check({"enum": ["a", "b"]}, {"enum": ["a", "b", "c"]}))
    assert check({"enum": ["a"]}, STR) != []
    assert check(STR, {"const": "a"}) == []


@pytest.mark.parametrize(
    ("reader", "writer", "ok"),
    [
        ({"type": "string", "maxLength": 10}, {"type": "string", "maxLength": 5}, True),
        ({"type": "string", "maxLength": 5}, {"type": "string", "maxLength": 10}, False),
        ({"type": "string", "minLength": 2}, {"type": "string"}, False),
        ({"type": "array", "maxItems": 3}, {"type": "array"}, False),
        ({"type": "array", "minItems": 1}, {"type": "array", "minItems": 2}, True),
        ({"type": "number", "minimum": 0}, {"type": "number", "minimum": 1}, True),
        ({"type": "number", "minimum": 1}, {"type": "number", "minimum": 0}, False),
        ({"type": "number", "exclusiveMinimum": 0}, {"type": "number", "minimum": 0}, False),
        ({"type": "number", "maximum": 10}, {"type": "number", "exclusiveMaximum": 10}, True),
        ({"type": "number", "maximum": 10}, {"type": "number"}, False),
        ({"type": "number", "multipleOf": 2}, {"type": "number", "multipleOf": 4}, True),
        ({"type": "number", "multipleOf": 3}, {"type": "number", "multipleOf": 4}, False),
        ({"type": "string", "pattern": "^a"}, {"type": "string"}, False),
        ({"maxLength": 5}, {"type": "integer"}, True),
    ],
)
def test_json_bounds_tightened_are_incompatible(reader: Any, writer: Any, ok: bool) -> None:
    assert (check(reader, writer) == []) is ok


def test_json_array_items_are_compared_recursively() -> None:
    assert check({"type": "array", "items": NUM}, {"type": "array", "items": INT}) == []
    problems = check({"type": "array", "items": INT}, {"type": "array", "items": NUM})
    assert any("/items" in m for m in problems)
    tuple_writer = {"type": "array", "items": [STR, INT], "additionalItems": False}
    assert check({"type": "array", "items": {"type": ["string", "integer"]}}, tuple_writer) == []


def test_json_nested_objects_are_compared_recursively() -> None:
    reader = obj({"inner": obj({"x": INT}, required=["x"])})
    writer = obj({"inner": obj({"x": INT})})
    assert any("/properties/inner" in m for m in check(reader, writer))


def test_json_writer_union_needs_every_branch_readable() -> None:
    assert check({"type": ["string", "integer"]}, {"anyOf": [STR, INT]}) == []
    assert check(STR, {"oneOf": [STR, INT]}) != []


def test_json_reader_union_needs_one_branch_that_reads_the_writer() -> None:
    assert check({"anyOf": [STR, INT]}, INT) == []
    assert check({"oneOf": [{"type": "null"}, STR]}, STR) == []
    assert check({"anyOf": [STR, {"type": "null"}]}, INT) != []


def test_json_recursive_ref_terminates() -> None:
    tree = {
        "type": "object",
        "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
    }
    assert check(tree, tree) == []
    assert check(tree | {"required": ["children"]}, tree) != []


def test_json_unknown_constraint_in_reader_is_flagged_conservatively() -> None:
    assert check({"not": STR}, {}) != []
    assert check({"not": STR}, {"not": STR}) == []


def test_json_boolean_schemas() -> None:
    assert check(True, {"type": "string"}) == []
    assert check({"type": "string"}, False) == []
    assert check(False, {"type": "string"}) != []


# --- properties ------------------------------------------------------------------------

_leaf = st.sampled_from([
    STR, INT, NUM, {"type": "boolean"}, {"type": "null"}, {"enum": ["a", 1, None]},
    {"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0}, {},
])  # fmt: skip
_schemas = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(lambda i: {"type": "array", "items": i}, inner),
        st.builds(
            lambda props, closed: {
                "type": "object",
                "properties": props,
                "required": sorted(props)[:1],
                "additionalProperties": not closed,
            },
            st.dictionaries(st.sampled_from("abcd"), inner, max_size=3),
            st.booleans(),
        ),
        st.builds(lambda xs: {"anyOf": xs}, st.lists(inner, min_size=1, max_size=3)),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(_schemas)
def test_json_every_schema_is_compatible_with_itself(schema: Any) -> None:
    parsed = parse(schema)
    assert js.compatible(parsed, parsed) == []


@settings(max_examples=60, deadline=None)
@given(_schemas, st.randoms())
def test_json_canonical_is_independent_of_key_order(schema: Any, rnd: Any) -> None:
    def shuffle(node: Any) -> Any:
        if isinstance(node, dict):
            items = list(node.items())
            rnd.shuffle(items)
            return {k: shuffle(v) for k, v in items}
        return [shuffle(v) for v in node] if isinstance(node, list) else node

    text = json.dumps(shuffle(schema), indent=rnd.choice([None, 1, 4]))
    assert parse_schema(SchemaType.JSON, text).canonical == parse(schema).canonical


_near_json = st.from_regex(r'\{"type": ?"[a-z]*"(, ?"\$ref": ?".*")?\}', fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=200), _near_json, st.builds(json.dumps, st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["type", "$ref", "items", "enum", "x"]), inner, max_size=3),
))))  # fmt: skip
def test_json_parse_of_arbitrary_text_raises_only_invalid_schema_error(text: str) -> None:
    with contextlib.suppress(InvalidSchemaError):
        parse_schema(SchemaType.JSON, text)
