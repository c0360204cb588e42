"""Avro parsing, canonical form, and the Avro spec's schema-resolution rules."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.registry.schemas import avro
from broker.registry.schemas.types import (
    InvalidSchemaError,
    ParsedSchema,
    SchemaType,
    parse_schema,
)

pytestmark = pytest.mark.unit


def parse(schema: Any, references: dict[str, ParsedSchema] | None = None) -> ParsedSchema:
    return parse_schema(SchemaType.AVRO, json.dumps(schema), references)


def record(*fields: Any, name: str = "User", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def field(name: str, kind: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, **extra}


def check(reader: Any, writer: Any) -> list[str]:
    return avro.compatible(parse(reader), parse(writer))


def test_avro_canonical_uses_full_names_and_ignores_key_order() -> None:
    a = parse(record(field("id", "long"), namespace="com.acme"))
    b = parse_schema(
        SchemaType.AVRO,
        '{"fields": [{"type": {"type": "long"}, "name": "id"}],\n'
        ' "name": "User", "type": "record", "namespace": "com.acme"}',
    )
    c = parse({"type": "record", "name": "com.acme.User", "fields": [field("id", "long")]})
    assert a.canonical == b.canonical == c.canonical
    assert '"com.acme.User"' in a.canonical
    assert a.parsed["name"] == "com.acme.User"


def test_avro_canonical_differs_when_a_default_differs() -> None:
    a = parse(record(field("n", "int", default=1)))
    assert a.canonical != parse(record(field("n", "int", default=2))).canonical


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nope"},
        record(field("a", "int"), field("a", "long")),
        {"type": "enum", "name": "E", "symbols": ["A", "A"]},
        {"type": "enum", "name": "E", "symbols": ["A"], "default": "B"},
        {"type": "fixed", "name": "F"},
        ["int", "int"],
        ["int", ["null"]],
        record(field("a", "int", default="x")),
        record(field("a", "Missing")),
        {"type": "record", "name": "1bad", "fields": []},
        {"type": "array"},
        3,
        [],
    ],
)
def test_avro_invalid_schema_is_rejected_with_a_message(schema: Any) -> None:
    with pytest.raises(InvalidSchemaError) as info:
        parse(schema)
    assert "\n" not in str(info.value)
    assert str(info.value)


def test_avro_nesting_over_64_levels_is_rejected() -> None:
    deep: Any = "int"
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidSchemaError, match="nests deeper"):
        parse(deep)


def test_avro_reference_supplies_a_named_type() -> None:
    address = parse(record(field("city", "string"), name="Address", namespace="geo"))
    user = parse(record(field("home", "geo.Address")), {"geo.Address": address})
    assert user.parsed["__named_schemas"]["geo.Address"]["fields"][0]["name"] == "city"
    assert avro.compatible(user, user) == []
    with pytest.raises(InvalidSchemaError, match="unknown type"):
        parse(record(field("home", "geo.Address")))


def test_avro_field_added_with_default_is_backward_compatible() -> None:
    old = record(field("id", "long"))
    new = record(field("id", "long"), field("email", "string", default=""))
    assert check(new, old) == []


def test_avro_field_added_without_default_breaks_backward() -> None:
    problems = check(
        record(field("id", "long"), field("email", "string")), record(field("id", "long"))
    )
    assert problems == ["/fields/email: reader field is missing in the writer and has no default"]


def test_avro_removed_field_is_fine_for_the_reader() -> None:
    assert check(record(field("id", "long")), record(field("id", "long"), field("x", "int"))) == []


def test_avro_field_alias_matches_a_renamed_field() -> None:
    reader = record(field("user_id", "long", aliases=["id"]))
    assert check(reader, record(field("id", "long"))) == []


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"),
        ("long", "double"), ("float", "double"), ("string", "bytes"), ("bytes", "string"),
    ],
)  # fmt: skip
def test_avro_type_promotion_is_compatible(writer: str, reader: str) -> None:
    assert check(record(field("v", reader)), record(field("v", writer))) == []


@pytest.mark.parametrize(
    ("writer", "reader"), [("long", "int"), ("double", "float"), ("int", "string")]
)
def test_avro_narrowing_or_unrelated_type_is_incompatible(writer: str, reader: str) -> None:
    problems = check(record(field("v", reader)), record(field("v", writer)))
    assert len(problems) == 1
    assert "/fields/v" in problems[0]


def enum(*symbols: str, **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": "Color", "symbols": list(symbols), **extra}


def test_avro_enum_symbol_added_in_reader_is_compatible() -> None:
    assert check(enum("RED", "GREEN"), enum("RED")) == []


def test_avro_enum_symbol_removed_in_reader_is_incompatible() -> None:
    assert any("GREEN" in m for m in check(enum("RED"), enum("RED", "GREEN")))


def test_avro_enum_symbol_removed_with_reader_default_is_compatible() -> None:
    assert check(enum("RED", "UNKNOWN", default="UNKNOWN"), enum("RED", "GREEN")) == []


def test_avro_union_writer_needs_every_branch_readable() -> None:
    assert check(["null", "string", "long"], ["null", "int"]) == []
    assert check(["null", "string"], ["null", "int"]) != []
    assert check("string", ["null", "string"]) != []


def test_avro_union_reader_needs_a_matching_branch() -> None:
    assert check(["null", "long"], "int") == []
    assert any("no branch" in m for m in check(["null", "string"], "int"))


def test_avro_optional_field_via_union_with_default() -> None:
    old = record(field("id", "long"))
    new = record(field("id", "long"), field("nick", ["null", "string"], default=None))
    assert check(new, old) == []
    assert check(old, new) == []


def test_avro_record_name_must_match_or_be_aliased() -> None:
    assert any("does not match" in m for m in check(record(name="A"), record(name="B")))
    assert check(record(name="A", aliases=["B"]), record(name="B")) == []
    assert check(record(name="A", namespace="x"), record(name="A", namespace="y")) == []


def test_avro_fixed_size_must_match() -> None:
    fixed = {"type": "fixed", "name": "Hash"}
    assert check(fixed | {"size": 16}, fixed | {"size": 16}) == []
    assert any("size" in m for m in check(fixed | {"size": 32}, fixed | {"size": 16}))


def test_avro_arrays_and_maps_are_compared_recursively() -> None:
    assert check({"type": "array", "items": "long"}, {"type": "array", "items": "int"}) == []
    assert check({"type": "map", "values": "int"}, {"type": "map", "values": "long"}) != []
    assert check({"type": "map", "values": "int"}, {"type": "array", "items": "int"}) != []


def test_avro_recursive_types_terminate() -> None:
    node = record(field("value", "int"), field("next", ["null", "Node"], default=None), name="Node")
    assert check(node, node) == []
    wider = record(
        field("value", "long"), field("next", ["null", "Node"], default=None), name="Node"
    )
    assert check(wider, node) == []
    assert check(node, wider) != []


# --- properties ------------------------------------------------------------------------

_names = st.sampled_from(["a", "b", "c", "d", "e"])
_prims = st.sampled_from(["null", "boolean", "int", "long", "float", "double", "bytes", "string"])


@st.composite
def _records(draw: st.DrawFn) -> dict[str, Any]:
    counter = iter(range(1000))

    def kind(depth: int) -> Any:
        choice = draw(st.integers(0, 4 if depth < 2 else 0))
        if choice == 0:
            return draw(_prims)
        if choice == 1:
            return {"type": "array", "items": kind(depth + 1)}
        if choice == 2:
            return {"type": "map", "values": kind(depth + 1)}
        if choice == 3:
            return ["null", kind_not_union(depth + 1)]
        return make(depth + 1)

    def kind_not_union(depth: int) -> Any:
        value = kind(depth)
        return value if not isinstance(value, list) and value != "null" else "string"

    def make(depth: int) -> dict[str, Any]:
        names = draw(st.lists(_names, unique=True, max_size=4))
        return record(*(field(n, kind(depth)) for n in names), name=f"R{next(counter)}")

    return make(0)


@settings(max_examples=60, deadline=None)
@given(_records())
def test_avro_every_schema_is_compatible_with_itself(schema: dict[str, Any]) -> None:
    assert check(schema, schema) == []


@settings(max_examples=60, deadline=None)
@given(_records(), st.sampled_from(["int", "string", "double"]))
def test_avro_adding_a_defaulted_field_is_backward_and_removing_it_forward(
    schema: dict[str, Any], kind: str
) -> None:
    default = {"int": 0, "string": "", "double": 1.5}[kind]
    extended = dict(schema, fields=[*schema["fields"], field("zz_new", kind, default=default)])
    assert check(extended, schema) == []  # BACKWARD: the new schema reads old data
    assert check(schema, extended) == []  # FORWARD of the removal: old reads new data


@settings(max_examples=60, deadline=None)
@given(_records(), st.randoms())
def test_avro_canonical_is_independent_of_key_order_and_whitespace(
    schema: dict[str, Any], rnd: Any
) -> None:
    def shuffle(node: Any) -> Any:
        if isinstance(node, dict):
            items = list(node.items())
            rnd.shuffle(items)
            return {k: shuffle(v) for k, v in items}
        return [shuffle(v) for v in node] if isinstance(node, list) else node

    text = json.dumps(shuffle(schema), indent=rnd.choice([None, 2]))
    assert parse_schema(SchemaType.AVRO, text).canonical == parse(schema).canonical


_jsonish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["int", "record", "R", "a.b"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["type", "name", "fields", "items", "values", "symbols", "size"]),
            inner,
            max_size=4,
        )
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=100), st.builds(json.dumps, _jsonish)))
def test_avro_parse_of_arbitrary_text_raises_only_invalid_schema_error(text: str) -> None:
    with contextlib.suppress(InvalidSchemaError):
        parse_schema(SchemaType.AVRO, text)
