"""The API and the exported JSON Schema accept and refuse the same manifests.

The API validates a manifest with the pydantic models in ``broker.registry.manifest``; users,
editors and CI check the same manifest against ``schemas/agent-manifest.schema.json``. Each
manifest below is given to both, as JSON bytes the way the API receives it, and both must
come to the expected answer. The few rules JSON Schema cannot state are listed apart: the API
refuses those manifests and the schema names the rule in a description.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import jsonschema.validators
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema.exceptions import ValidationError

from broker.registry.manifest import (
    MAX_MANIFEST_DEPTH,
    SCHEMA_PATH,
    ManifestInvalid,
    parse_manifest,
)

pytestmark = pytest.mark.unit

SCHEMA: dict[str, Any] = orjson.loads(SCHEMA_PATH.read_bytes())


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """``pattern`` as JSON Schema defines it (ECMA-262), where ``$`` is the end of the string.
    jsonschema uses Python's ``re``, whose ``$`` also matches before a final newline, so it
    would take ``"text/plain\\n"`` for a media type where editors and the API do not."""
    if not validator.is_type(instance, "string"):
        return
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if not re.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _validator() -> Any:
    declared = jsonschema.validators.validator_for(SCHEMA, default=None)
    assert declared is jsonschema.Draft202012Validator, SCHEMA.get("$schema")
    declared.check_schema(SCHEMA)
    ecma = jsonschema.validators.extend(declared, {"pattern": _ecma_pattern})
    return ecma(SCHEMA)


VALIDATOR = _validator()

BASE: dict[str, Any] = {
    "name": "summarizer",
    "version": "1.2.0-beta.1+build.5",
    "description": "Summarises long documents and reports.",
    "endpoint": "route.default.summarizer",
    "capabilities": [
        {
            "action": "summarize",
            "description": "Shorten a document",
            "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
            "output_schema": {"subject": "summaries-value", "version": 3},
            "content_types": ["text/plain", "application/pdf"],
            "modalities": ["text", "document"],
            "examples": ["give me the gist of this"],
        }
    ],
    "embedding": {"text": "summaries of documents"},
    "limits": {"max_qps": 50, "max_concurrency": 4},
    "security": {"allowed_tools": ["search"], "memory_scope": "tenant_isolated"},
    "labels": {"team": "docs", "env": "canary"},
}
MINIMAL: dict[str, Any] = {
    "name": "m",
    "version": "0.1.0",
    "description": "d",
    "capabilities": [{"action": "a"}],
}


def _with(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def _capability(**changes: Any) -> dict[str, Any]:
    return _with(capabilities=[{**BASE["capabilities"][0], **changes}])


VALID: dict[str, dict[str, Any]] = {
    "full": BASE,
    "minimal": MINIMAL,
    "fractional max_qps": _with(limits={"max_qps": 1.5}),
    "integer max_qps": _with(limits={"max_qps": 2}),
    "max_concurrency 2.0 is the integer 2": _with(limits={"max_concurrency": 2.0}),
    "null limits fields": _with(limits={"max_qps": None, "max_concurrency": None}),
    "vector of ints and floats": _with(embedding={"vector": [0, 1.5, -2]}),
    "text with a null vector": _with(embedding={"vector": None, "text": "x"}),
    "vector and text": _with(embedding={"vector": [0.5], "text": "x"}),
    "no embedding": _with(embedding=None),
    "media ranges": _capability(content_types=["image/*", "application/vnd.api+json"]),
    "label keys": _with(labels={"a2a/name": "x", "k8s.io_x-y": "v", "a" * 63: ""}),
    "two actions": _with(capabilities=[{"action": "a"}, {"action": "b"}]),
    "schema ref by latest": _capability(output_schema={"subject": "s", "version": "latest"}),
}

REFUSED: dict[str, dict[str, Any]] = {
    "max_qps as a string": _with(limits={"max_qps": "1.5"}),
    "max_qps true": _with(limits={"max_qps": True}),
    "max_qps zero": _with(limits={"max_qps": 0}),
    "max_concurrency true": _with(limits={"max_concurrency": True}),
    "max_concurrency as a string": _with(limits={"max_concurrency": "4"}),
    "max_concurrency with a fraction": _with(limits={"max_concurrency": 2.5}),
    "max_concurrency zero": _with(limits={"max_concurrency": 0.0}),
    "vector of strings": _with(embedding={"vector": ["0.5"]}),
    "vector with a boolean": _with(embedding={"vector": [0.5, True]}),
    "content type foo": _capability(content_types=["foo"]),
    "content type with a newline": _capability(content_types=["text/plain\n"]),
    "content type in upper case": _capability(content_types=["Text/Plain"]),
    "content type without a subtype": _capability(content_types=["text/"]),
    "label key with a space": _with(labels={"Bad Key": "x"}),
    "label key with spaces": _with(labels={"has space": "x"}),
    "empty label key": _with(labels={"": "x"}),
    "label key of 64 characters": _with(labels={"a" * 64: "x"}),
    "label key ending in a newline": _with(labels={"team\n": "x"}),
    "empty embedding": _with(embedding={}),
    "embedding of nulls": _with(embedding={"vector": None, "text": None}),
    "embedding with a null vector only": _with(embedding={"vector": None}),
    "identical capabilities": _with(capabilities=[{"action": "a"}, {"action": "a"}]),
    "name ending in a newline": _with(name="summarizer\n"),
    "unknown field": _with(owner="me"),
    "no description": {k: v for k, v in BASE.items() if k != "description"},
}


def _nest(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"a": value}
    return value


#: Manifests the API refuses by a rule JSON Schema cannot state, and where the schema says so.
API_ONLY: dict[str, tuple[dict[str, Any], tuple[str, ...], str]] = {
    "an action repeated in different capabilities": (
        _with(capabilities=[{"action": "a"}, {"action": "a", "description": "again"}]),
        ("properties", "capabilities", "description"),
        "action",
    ),
    "an input schema past the depth bound": (
        _capability(input_schema=_nest(MAX_MANIFEST_DEPTH)),
        ("$defs", "Capability", "properties", "input_schema", "description"),
        f"{MAX_MANIFEST_DEPTH} levels",
    ),
}


def api_refusal(document: Any) -> ManifestInvalid | None:
    """How ``PUT /v1/agents/{name}`` refuses this JSON body, if it does (short of storing)."""
    try:
        parse_manifest(orjson.dumps(document), "application/json")
    except ManifestInvalid as e:
        return e
    return None


def api_accepts(document: Any) -> bool:
    refusal = api_refusal(document)
    if refusal is None:
        return True
    body = refusal.to_dict()
    assert (refusal.status, body["error_code"]) == (422, "invalid_manifest")
    assert isinstance(body["message"], str)
    assert body["message"]
    return False


def schema_accepts(document: Any) -> bool:
    """What a user's JSON Schema validator decides for the same JSON text."""
    return bool(VALIDATOR.is_valid(json.loads(orjson.dumps(document))))


@pytest.mark.parametrize("name", VALID)
def test_manifests_the_schema_accepts_the_api_accepts(name: str) -> None:
    document = VALID[name]
    assert (api_accepts(document), schema_accepts(document)) == (True, True)


@pytest.mark.parametrize("name", REFUSED)
def test_manifests_the_schema_refuses_the_api_refuses_with_422(name: str) -> None:
    document = REFUSED[name]
    assert (api_accepts(document), schema_accepts(document)) == (False, False)


@pytest.mark.parametrize("name", API_ONLY)
def test_rules_json_schema_cannot_state_are_refused_by_the_api_and_described(name: str) -> None:
    document, where, phrase = API_ONLY[name]
    assert (api_accepts(document), schema_accepts(document)) == (False, True)
    node: Any = SCHEMA
    for key in where:
        node = node[key]
    assert phrase in node


def test_yaml_numbers_are_still_numbers_to_the_strict_api() -> None:
    """``broker agents apply`` parses a YAML manifest before it validates it: ints and floats
    arrive as ints and floats, and a quoted number is a string there too."""
    document = (
        "name: y\nversion: 1.0.0\ndescription: d\ncapabilities:\n- action: a\n"
        "  output_schema: {subject: s, version: 3}\n"
        "embedding: {vector: [1, 0.5, -2.0e+3]}\nlimits: {max_qps: 1.5, max_concurrency: 4}\n"
    )
    manifest = parse_manifest(document.encode(), "application/yaml")
    assert (manifest.limits.max_qps, manifest.limits.max_concurrency) == (1.5, 4)
    assert VALIDATOR.is_valid(yaml.safe_load(document))
    quoted = document.replace("max_qps: 1.5", 'max_qps: "1.5"')
    assert not VALIDATOR.is_valid(yaml.safe_load(quoted))
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(quoted.encode(), "application/yaml")
    assert [error["loc"] for error in caught.value.errors] == ["limits.max_qps"]


def test_yaml_infinity_is_refused_not_stored_as_null() -> None:
    """JSON has no infinity, YAML has ``.inf``: it used to pass ``max_qps > 0`` and be stored
    as ``null``, dropping the limit."""
    document = b"name: y\nversion: 1.0.0\ndescription: d\ncapabilities: [{action: a}]\n"
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(document + b"limits: {max_qps: .inf}\n", "application/yaml")
    assert [error["loc"] for error in caught.value.errors] == ["limits.max_qps"]


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(allow_nan=False, allow_infinity=False).map(str)
    | st.integers(-5, 5).map(str)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
)
_media_like = st.from_regex(r"[a-zA-Z0-9*+. \n-]{0,6}/?[a-zA-Z0-9*+. \n-]{0,6}", fullmatch=True)
_label_keys = st.from_regex(r"[a-zA-Z0-9._/ \n-]{0,66}", fullmatch=True)
_embeddings = st.fixed_dictionaries(
    {},
    optional={
        "vector": st.none() | st.lists(_json_scalars, max_size=3),
        "text": st.none() | st.text(max_size=3),
    },
)


def _placed(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(BASE)
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


_variations = st.one_of(
    st.builds(_placed, st.just(("limits", "max_qps")), _json_scalars),
    st.builds(_placed, st.just(("limits", "max_concurrency")), _json_scalars),
    st.builds(_placed, st.just(("embedding",)), _embeddings),
    st.builds(_placed, st.just(("capabilities", 0, "content_types", 0)), _media_like),
    st.builds(_placed, st.just(("capabilities", 0, "modalities", 0)), _json_scalars),
    st.builds(_placed, st.just(("security", "memory_scope")), _json_scalars),
    st.builds(_placed, st.just(("name",)), _json_scalars),
    st.builds(lambda key: _placed(("labels", key), "v"), _label_keys),
    st.builds(  # a repeated action is an API-only rule unless the capability is the same
        lambda extra: _placed(("capabilities",), [BASE["capabilities"][0], extra]),
        st.sampled_from([BASE["capabilities"][0], {"action": "other"}]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(_variations)
def test_variations_of_a_valid_manifest_get_one_answer(document: dict[str, Any]) -> None:
    """One field of a valid manifest swapped for another JSON value: both agree."""
    assert api_accepts(document) == schema_accepts(document)
