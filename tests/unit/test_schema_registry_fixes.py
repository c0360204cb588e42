"""Schema registry rules that reviews found broken: references to "latest" are pinned when
stored, references nest at most 16 deep and a diamond of them costs its size, and a JSON
Schema ``$ref`` hides its siblings before draft 2019-09."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import orjson
import pytest

from broker.errors import InvalidSchema, ReferenceExists
from broker.registry.schemas import decisions
from broker.registry.schemas.compatibility import check_compatibility
from broker.registry.schemas.decisions import MAX_REFERENCE_DEPTH, SchemaCatalog, SchemaRequest
from broker.registry.schemas.events import SchemaId, SchemaReference, SchemaVersionRegistered
from broker.registry.schemas.types import (
    CompatibilityLevel,
    ParsedSchema,
    SchemaType,
    parse_schema,
)
from tests.unit.test_schema_registry_state import Registry, T

pytestmark = pytest.mark.unit

INNER = '{"type": "record", "name": "Inner", "fields": [{"name": "a", "type": "int"}]}'
OUTER = '{"type": "record", "name": "Outer", "fields": [{"name": "i", "type": "Inner"}]}'


def avro(text: str, *refs: SchemaReference) -> SchemaRequest:
    return SchemaRequest(SchemaType.AVRO, text, refs)


def test_a_reference_to_latest_is_stored_as_the_version_it_meant_and_protects_it() -> None:
    r = Registry()
    r.register("inner", avro(INNER))
    outer = r.register("outer", avro(OUTER, SchemaReference("Inner", "inner", -1)))
    assert r.reg.schema(outer).references == (SchemaReference("Inner", "inner", 1),)
    assert r.reg.referenced_by("inner", 1) == [outer]
    with pytest.raises(ReferenceExists):
        decisions.delete_version(r.reg, T, "inner", "1", permanent=False)
    # The same schema sent again with -1 is the one registered, under lookup and register.
    again = avro(OUTER, SchemaReference("Inner", "inner", -1))
    assert decisions.lookup(r.catalog, r.reg, T, "outer", again).version == 1
    assert r.register("outer", again) == outer
    assert r.state.last_seq == 2


def test_a_reference_to_latest_of_a_subject_without_versions_is_refused() -> None:
    r = Registry()
    with pytest.raises(InvalidSchema, match="does not exist"):
        r.register("outer", avro(OUTER, SchemaReference("Inner", "inner", -1)))


def test_a_reference_to_latest_stored_before_pinning_reads_as_the_version_it_meant() -> None:
    r = Registry()
    r.register("inner", avro(INNER))
    legacy = SchemaVersionRegistered(
        T, "outer", 1, SchemaId(2), SchemaType.AVRO, OUTER, (SchemaReference("Inner", "inner", -1),)
    )
    r.apply(legacy)
    assert r.reg.schema(2).references == (SchemaReference("Inner", "inner", 1),)
    assert r.reg.referenced_by("inner", 1) == [SchemaId(2)]


def chain_link(level: int) -> SchemaRequest:
    """A record that holds the record one level down (``L0`` holds an int)."""
    if level == 0:
        return avro('{"type": "record", "name": "L0", "fields": [{"name": "x", "type": "int"}]}')
    body = {
        "type": "record",
        "name": f"L{level}",
        "fields": [{"name": "d", "type": f"L{level - 1}"}],
    }
    return avro(orjson.dumps(body).decode(), SchemaReference(f"L{level - 1}", f"s{level - 1}", 1))


def test_references_nest_16_deep_and_no_deeper_whatever_is_parsed_already() -> None:
    r = Registry()
    for level in range(MAX_REFERENCE_DEPTH + 1):  # s16 -> s15 -> ... -> s0: 16 references
        r.register(f"s{level}", chain_link(level))
    with pytest.raises(InvalidSchema, match=f"references nest deeper than {MAX_REFERENCE_DEPTH}"):
        r.register("too-deep", chain_link(MAX_REFERENCE_DEPTH + 1))
    cold = SchemaCatalog()  # a new process parses the chain from the top down
    top = r.reg.version(f"s{MAX_REFERENCE_DEPTH}", 1).schema
    assert cold.parsed(r.reg, T, top).schema_type is SchemaType.AVRO
    with pytest.raises(InvalidSchema, match="nest deeper"):
        SchemaCatalog().resolve(r.reg, T, chain_link(MAX_REFERENCE_DEPTH + 1).references)


def avro_node(name: str, below: list[tuple[str, ParsedSchema]]) -> ParsedSchema:
    fields = [{"name": f"f{i}", "type": ref} for i, (ref, _) in enumerate(below)]
    body = {"type": "record", "name": name, "fields": fields or [{"name": "x", "type": "int"}]}
    return parse_schema(SchemaType.AVRO, json.dumps(body), dict(below))


def json_node(name: str, below: list[tuple[str, ParsedSchema]]) -> ParsedSchema:
    props = {f"f{i}": {"$ref": ref} for i, (ref, _) in enumerate(below)}
    body = {"$id": name, "type": "object", "properties": props or {"x": {"type": "integer"}}}
    return parse_schema(SchemaType.JSON, json.dumps(body), dict(below))


def proto_node(name: str, below: list[tuple[str, ParsedSchema]]) -> ParsedSchema:
    message = name.removesuffix(".proto").upper()
    imports = "".join(f'import "{ref}";\n' for ref, _ in below)
    fields = " ".join(
        f"{ref.removesuffix('.proto').upper()} f{i} = {i + 1};" for i, (ref, _) in enumerate(below)
    )
    text = f'syntax = "proto3";\n{imports}message {message} {{ {fields or "int32 x = 1;"} }}\n'
    return parse_schema(SchemaType.PROTOBUF, text, dict(below))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("make", "suffix"), [(avro_node, ""), (json_node, ".json"), (proto_node, ".proto")]
)
def test_a_diamond_of_references_per_level_costs_its_size_not_its_paths(
    make: Callable[[str, list[tuple[str, ParsedSchema]]], ParsedSchema], suffix: str
) -> None:
    """Level k holds both schemas of level k-1: 2**k paths lead to level 0 from the top. At
    24 levels a walk along every path takes hours; one along every schema is instant."""
    below: list[tuple[str, ParsedSchema]] = []
    for level in range(24):
        below = [(f"{side}{level}{suffix}", make(f"{side}{level}{suffix}", below)) for side in "ab"]
    top = below[0][1]
    assert check_compatibility(CompatibilityLevel.FULL, top, [top]) == []


DRAFT7_OLD = {
    "type": "object",
    "properties": {"x": {"$ref": "#/definitions/any", "type": "string"}},
    "definitions": {"any": {}},
}
NEW = {"type": "object", "properties": {"x": {"type": "string"}}}


def incompatible(old: Any, new: Any) -> list[str]:
    parsed = [parse_schema(SchemaType.JSON, json.dumps(s)) for s in (old, new)]
    return check_compatibility(CompatibilityLevel.BACKWARD, parsed[1], [parsed[0]])


def test_before_draft_2019_09_a_ref_hides_its_siblings_as_validators_do() -> None:
    assert jsonschema.Draft7Validator(DRAFT7_OLD).is_valid({"x": 5})
    assert not jsonschema.Draft7Validator(NEW).is_valid({"x": 5})
    assert incompatible(DRAFT7_OLD, NEW) != []  # no $schema: draft 7
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", **DRAFT7_OLD}
    assert incompatible(draft4, NEW) != []


def test_from_draft_2019_09_a_ref_applies_beside_its_siblings() -> None:
    draft = "https://json-schema.org/draft/2019-09/schema"
    old = {"$schema": draft, **DRAFT7_OLD, "$defs": {"any": {}}}
    old["properties"] = {"x": {"$ref": "#/$defs/any", "type": "string"}}
    assert not jsonschema.Draft201909Validator(old).is_valid({"x": 5})
    assert incompatible(old, {"$schema": draft, **NEW}) == []
