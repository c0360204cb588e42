"""The seven compatibility levels applied to a subject's history, for every schema type."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.registry.schemas.compatibility import check_compatibility
from broker.registry.schemas.types import (
    CompatibilityLevel,
    ParsedSchema,
    SchemaType,
    parse_schema,
)

pytestmark = pytest.mark.unit

L = CompatibilityLevel


def avro(*fields: tuple[str, str, Any]) -> ParsedSchema:
    def one(name: str, kind: str, default: Any) -> dict[str, Any]:
        return {"name": name, "type": kind} | ({} if default is ... else {"default": default})

    schema = {"type": "record", "name": "User", "fields": [one(*f) for f in fields]}
    return parse_schema(SchemaType.AVRO, json.dumps(schema))


ID = ("id", "long", ...)
V1 = avro(ID)
WITH_EMAIL_DEFAULT = avro(ID, ("email", "string", ""))
WITH_EMAIL_REQUIRED = avro(ID, ("email", "string", ...))


def test_none_is_always_compatible() -> None:
    assert check_compatibility(L.NONE, avro(("x", "boolean", ...)), [V1]) == []


@pytest.mark.parametrize("level", list(L))
def test_first_version_is_compatible_under_every_level(level: CompatibilityLevel) -> None:
    assert check_compatibility(level, V1, []) == []


def test_backward_new_reader_must_read_latest_data() -> None:
    assert check_compatibility(L.BACKWARD, WITH_EMAIL_DEFAULT, [V1]) == []
    problems = check_compatibility(L.BACKWARD, WITH_EMAIL_REQUIRED, [V1])
    assert len(problems) == 1
    assert problems[0].startswith("backward, new reads existing schema 1 of 1:")


def test_forward_latest_reader_must_read_new_data() -> None:
    assert check_compatibility(L.FORWARD, WITH_EMAIL_REQUIRED, [V1]) == []
    problems = check_compatibility(L.FORWARD, V1, [WITH_EMAIL_REQUIRED])
    assert len(problems) == 1
    assert problems[0].startswith("forward, existing schema 1 of 1 reads new:")


def test_full_needs_both_directions() -> None:
    assert check_compatibility(L.FULL, WITH_EMAIL_DEFAULT, [V1]) == []
    assert check_compatibility(L.FULL, WITH_EMAIL_REQUIRED, [V1]) != []
    assert check_compatibility(L.FULL, V1, [WITH_EMAIL_REQUIRED]) != []


# A chain v1 -> v2 -> v3 where v3 is compatible with v2 but not with v1: v2 drops the int
# field "a", v3 brings "a" back as a string with a default. v3 reads v2's data (the default
# fills "a") but not v1's (an int cannot be read as a string).
BACK_V1 = avro(ID, ("a", "int", ...))
BACK_V2 = avro(ID)
BACK_V3 = avro(ID, ("a", "string", "x"))


@pytest.mark.parametrize(
    ("plain", "transitive", "chain"),
    [
        (L.BACKWARD, L.BACKWARD_TRANSITIVE, [BACK_V1, BACK_V2, BACK_V3]),
        (L.FULL, L.FULL_TRANSITIVE, [BACK_V1, BACK_V2, BACK_V3]),
    ],
)
def test_transitive_checks_every_version_plain_only_the_latest(
    plain: CompatibilityLevel, transitive: CompatibilityLevel, chain: list[ParsedSchema]
) -> None:
    *existing, new = chain
    assert check_compatibility(plain, new, existing) == []
    problems = check_compatibility(transitive, new, existing)
    assert problems
    assert all("existing schema 1 of 2" in m for m in problems)


def test_forward_transitive_checks_every_version() -> None:
    v1 = avro(ID, ("a", "string", ...))
    v2 = avro(ID)
    v3 = avro(ID, ("a", "int", ...))  # v2 (no "a") reads it, v1 ("a" string) cannot
    assert check_compatibility(L.FORWARD, v3, [v1, v2]) == []
    problems = check_compatibility(L.FORWARD_TRANSITIVE, v3, [v1, v2])
    assert problems
    assert all("existing schema 1 of 2 reads new" in m for m in problems)


def test_changing_schema_type_is_incompatible() -> None:
    json_schema = parse_schema(SchemaType.JSON, '{"type": "object"}')
    problems = check_compatibility(L.BACKWARD, json_schema, [V1])
    assert problems == ["existing schema 1 of 1: schema type changed from AVRO to JSON"]


def test_json_levels_use_the_json_rules() -> None:
    old = parse_schema(
        SchemaType.JSON, '{"type": "object", "properties": {"a": {"type": "string"}}}'
    )
    new = parse_schema(
        SchemaType.JSON,
        '{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}',
    )
    assert check_compatibility(L.BACKWARD, new, [old]) != []
    assert check_compatibility(L.FORWARD, new, [old]) == []


def test_protobuf_levels_use_the_protobuf_rules() -> None:
    def proto(body: str) -> ParsedSchema:
        return parse_schema(SchemaType.PROTOBUF, f'syntax = "proto3"; {body}')

    old = proto("message M { int32 a = 1; }")
    assert (
        check_compatibility(L.FULL, proto("message M { int32 a = 1; string b = 2; }"), [old]) == []
    )
    assert check_compatibility(L.FULL, proto("message M { string a = 1; }"), [old]) != []


def test_level_given_as_string_is_accepted() -> None:
    assert check_compatibility("BACKWARD", WITH_EMAIL_REQUIRED, [V1]) != []


_SAMPLES = {
    SchemaType.AVRO: st.sampled_from(["int", "string", "long"]).map(
        lambda k: json.dumps({"type": "record", "name": "R", "fields": [{"name": "f", "type": k}]})
    ),
    SchemaType.JSON: st.sampled_from(["string", "integer", "object"]).map(
        lambda k: json.dumps({"type": k, "properties": {"x": {"type": "number"}}})
    ),
    SchemaType.PROTOBUF: st.sampled_from(["int32", "string", "double"]).map(
        lambda k: f'syntax = "proto3"; message M {{ {k} f = 1; }}'
    ),
}


@settings(max_examples=45, deadline=None)
@given(st.sampled_from(list(SchemaType)).flatmap(lambda t: st.tuples(st.just(t), _SAMPLES[t])),
       st.sampled_from(list(L)))  # fmt: skip
def test_every_schema_is_compatible_with_itself_under_every_level(
    sample: tuple[SchemaType, str], level: CompatibilityLevel
) -> None:
    parsed = parse_schema(*sample)
    assert check_compatibility(level, parsed, [parsed, parsed]) == []
