"""JSON Schema compatibility is bounded work: a sub-problem met again is compared once, and a
check past MAX_COMPARE_STEPS is refused as too complex (422, 42201), not left to run."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from broker.errors import InvalidSchema
from broker.registry.schemas import compatibility, decisions
from broker.registry.schemas import jsonschema as js
from broker.registry.schemas.decisions import SchemaRequest
from broker.registry.schemas.types import (
    CompatibilityLevel,
    ParsedSchema,
    SchemaTooComplexError,
    SchemaType,
    parse_schema,
)
from tests.unit.test_schema_registry_state import Registry, T

pytestmark = pytest.mark.unit

STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}


def parse(schema: Any) -> ParsedSchema:
    return parse_schema(SchemaType.JSON, json.dumps(schema))


def check(reader: Any, writer: Any) -> list[str]:
    return js.compatible(parse(reader), parse(writer))


def ref_chain(length: int, leaf: Any, **siblings: Any) -> Any:
    """``d0`` is ``anyOf`` two references to ``d1``, and so on: 2**length paths to ``leaf``.
    Draft 2020-12, where a ``$ref``'s siblings apply beside it (before 2019-09 they are
    ignored, and the sibling case would test nothing more)."""
    twice = [{"$ref": f"#/$defs/d{i + 1}", **siblings} for i in range(length) for _ in (0, 1)]
    defs = {f"d{i}": {"anyOf": twice[2 * i : 2 * i + 2]} for i in range(length)}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": defs | {f"d{length}": leaf},
        "$ref": "#/$defs/d0",
    }


def crossed_unions(branches: int) -> tuple[Any, Any]:
    """A reader and a writer ``anyOf`` no branch of which reads another: every pair is tried."""
    reader = {"anyOf": [{"type": "string", "minLength": i} for i in range(branches)]}
    writer = {"anyOf": [{"type": "integer", "minimum": i} for i in range(branches)]}
    return reader, writer


@pytest.mark.timeout(10)
@pytest.mark.parametrize("siblings", [{}, {"minLength": 0}])
def test_a_definition_reached_by_many_paths_is_compared_once(siblings: dict[str, Any]) -> None:
    writer = ref_chain(40, STR, **siblings)
    assert check(ref_chain(40, {"type": ["string", "null"]}, **siblings), writer) == []
    assert len(check(ref_chain(40, INT, **siblings), writer)) == 1


@pytest.mark.timeout(10)
def test_messages_are_not_multiplied_by_the_paths_that_reach_them() -> None:
    def dag(leaf: Any) -> Any:
        step = {"type": "object"}
        defs = {
            f"d{i}": step | {"properties": {k: {"$ref": f"#/$defs/d{i + 1}"} for k in "ab"}}
            for i in range(18)
        }
        return {"$defs": defs | {"d18": leaf}, "$ref": "#/$defs/d0"}

    messages = check(dag(STR), dag(INT))
    assert len(messages) == 2  # /a/a/…/a and /a/a/…/b: each reached 2**17 ways
    assert all(m.endswith("the reader does not accept type 'integer'") for m in messages)


def test_a_union_that_is_its_own_branch_proves_nothing() -> None:
    itself = {"anyOf": [{"$ref": "#"}, STR]}
    assert check(itself, INT) != []
    assert check(itself, STR) == []
    assert check({"anyOf": [NUM, STR]}, itself) != []  # conservative: refers to itself


@pytest.mark.timeout(30)
def test_crossed_unions_past_the_budget_are_refused_as_too_complex() -> None:
    reader, writer = crossed_unions(400)  # 160,000 pairs, 30 KB
    with pytest.raises(SchemaTooComplexError, match="too complex to check for compatibility"):
        check(reader, writer)


@pytest.mark.timeout(30)
def test_a_pattern_that_backtracks_for_hours_is_refused_within_its_time() -> None:
    """``^(a|aa)+$`` against sixty ``a`` and a ``!`` backtracks for longer than anyone waits
    (Python's ``re`` cannot be stopped); the check gives up after MAX_PATTERN_SECONDS."""
    reader = {"type": "object", "patternProperties": {"^(a|aa)+$": STR}}
    writer = {"type": "object", "properties": {"a" * 60 + "!": INT}}
    started = time.perf_counter()
    with pytest.raises(SchemaTooComplexError, match=r"patternProperties '\^\(a\|aa\)\+\$'"):
        check(reader, writer)
    assert time.perf_counter() - started < 10 * js.MAX_PATTERN_SECONDS


def test_patterns_are_matched_as_before() -> None:
    patterns = {"^x_[0-9]+$": INT, "^y": STR}
    reader = {"type": "object", "patternProperties": patterns}

    def writer(**properties: Any) -> Any:
        return {"type": "object", "patternProperties": patterns, "properties": properties}

    assert check(reader, writer(x_12=INT, yes=STR, other=NUM)) == []
    assert check(reader, writer(x_12=STR)) != []
    assert check(reader, writer(y=INT)) != []


def test_matching_time_is_shared_by_the_whole_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(js, "MAX_PATTERN_SECONDS", 0.0)  # none left: the first match stops it
    reader = {"type": "object", "patternProperties": {"^x": INT}}
    with pytest.raises(SchemaTooComplexError, match=r"0\.0 s in all"):
        check(reader, {"type": "object", "properties": {"x1": INT}})


def test_a_transitive_check_stops_after_its_time_with_versions_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each pair is bounded, but FULL_TRANSITIVE compares every version twice: the check as
    a whole stops after MAX_CHECK_SECONDS rather than grow with the subject's history."""
    monkeypatch.setattr(compatibility, "MAX_CHECK_SECONDS", 0.0)
    history = [parse({"type": "object", "properties": {f"p{i}": INT}}) for i in range(3)]
    new = parse({"type": "object"})
    with pytest.raises(SchemaTooComplexError, match="before existing schema 2 of 3"):
        compatibility.check_compatibility(CompatibilityLevel.FULL_TRANSITIVE, new, history)
    # the one comparison of a non-transitive level always runs
    assert compatibility.check_compatibility(CompatibilityLevel.FULL, new, history) != []


def test_enum_values_count_against_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(js, "MAX_COMPARE_STEPS", 1_000)
    reader = {"anyOf": [{"type": "string", "maxLength": 1 + i} for i in range(10)]}
    with pytest.raises(SchemaTooComplexError):
        check(reader, {"enum": [f"value {i}" for i in range(200)]})  # 2,000 validations
    assert len(check(reader, {"enum": ["a", "bb"]})) == 0


def test_a_model_of_types_referring_to_each_other_fits_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(js, "MAX_COMPARE_STEPS", js.MAX_COMPARE_STEPS // 4)

    def model(extra: Any) -> Any:
        defs = {
            f"d{i}": {
                "type": "object",
                "properties": {
                    "id": INT,
                    "name": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 50}]},
                    "next": {"$ref": f"#/definitions/d{(i + 1) % 50}"},
                    "items": {
                        "type": "array",
                        "items": {"$ref": f"#/definitions/d{(i * 7) % 50}"},
                    },
                    "kind": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {}}]},
                }
                | ({"extra": extra} if i % 3 == 0 else {}),
                "required": ["id"],
                "additionalProperties": False,
            }
            for i in range(50)
        }
        return {"definitions": defs, "$ref": "#/definitions/d0"}

    assert check(model(NUM), model(INT)) == []
    messages = check(model(INT), model(NUM))
    assert 0 < len(messages) < 50  # each said once, not once per path to it (983,862)
    assert all("'number'" in m for m in messages)


def test_references_nested_past_the_stack_are_too_complex_not_a_crash() -> None:
    def chain(leaf: Any) -> Any:
        defs = {
            f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(300)
        }
        return {"$defs": defs | {"d300": leaf}, "$ref": "#/$defs/d0"}

    with pytest.raises(SchemaTooComplexError, match="nest too deeply"):
        check(chain(NUM), chain(INT))


@pytest.mark.timeout(30)
def test_a_check_too_complex_to_make_answers_42201_on_check_and_register() -> None:
    reader, writer = crossed_unions(400)
    r = Registry()
    r.register("s", SchemaRequest(SchemaType.JSON, json.dumps(writer)))
    request = SchemaRequest(SchemaType.JSON, json.dumps(reader))
    for attempt in (
        lambda: decisions.check(r.catalog, r.reg, T, "s", request, version=None),
        lambda: decisions.register(r.catalog, r.reg, T, "s", request),
    ):
        with pytest.raises(InvalidSchema, match="too complex to check") as caught:
            attempt()
        assert (caught.value.status, caught.value.registry_code) == (422, 42201)
        assert caught.value.to_dict()["error_code"] == 42201
