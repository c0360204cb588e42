"""Manifest bodies are bounded as they are parsed: no YAML aliases, at most MAX_MANIFEST_DEPTH
levels, and every such refusal is a 422 ``invalid_manifest``, never a 500."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.envelope import Tenant
from broker.registry.events import RegistryEvent, RegistryEventType, encode
from broker.registry.manifest import (
    MAX_MANIFEST_DEPTH,
    AgentManifest,
    AgentName,
    ManifestInvalid,
    canonical_json,
    parse_manifest,
)

pytestmark = pytest.mark.unit

HEAD = "name: bomb\nversion: 1.0.0\ndescription: d\ncapabilities:\n- action: a\n  input_schema:\n"
#: Levels a manifest has above its input schema: root, capabilities, the capability.
ABOVE_SCHEMA = 3


def manifest(input_schema: Any) -> dict[str, Any]:
    return {
        "name": "deep",
        "version": "1.0.0",
        "description": "d",
        "capabilities": [{"action": "a", "input_schema": input_schema}],
    }


def nest(levels: int) -> Any:
    """``levels`` of arrays and objects, alternately, around a string."""
    value: Any = "leaf"
    for i in range(levels):
        value = [value] if i % 2 else {"a": value}
    return value


def deep_manifest(depth: int) -> dict[str, Any]:
    """A valid manifest whose deepest value is ``depth`` levels down."""
    return manifest({"a": nest(depth - ABOVE_SCHEMA - 1)})


def refused(body: bytes, content_type: str) -> ManifestInvalid:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(body, content_type)
    error = caught.value
    assert (error.status, error.error_code) == (422, "invalid_manifest")
    return error


@pytest.mark.timeout(10)
def test_yaml_alias_bomb_is_refused_before_anything_expands() -> None:
    lines = ['a0: &a0 ["lol"]'] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)
    ]
    body = (HEAD + "".join(f"    {line}\n" for line in lines)).encode()
    assert len(body) < 1024  # and it stands for 10**9 strings
    error = refused(body, "application/yaml")
    assert "anchors and aliases" in error.message
    assert "line 7" in error.message


@pytest.mark.parametrize(
    "document",
    [
        "    x: &one {type: string}\n",  # an anchor alone
        "    x: {type: string}\n    y: *x\n",  # an alias to no anchor
        "    base: &b {type: object}\n    merged: {<<: *b}\n",  # a merge key
    ],
)
def test_yaml_anchors_aliases_and_merge_keys_are_refused(document: str) -> None:
    assert "anchors and aliases" in refused((HEAD + document).encode(), "application/yaml").message


def test_json_schema_nested_300_deep_is_422_naming_where() -> None:
    body = json.dumps(manifest({"a": nest(300)})).encode()  # deeper than orjson writes
    error = refused(body, "application/json")
    assert f"deeper than {MAX_MANIFEST_DEPTH} levels" in error.message
    assert error.errors[0]["loc"].startswith("capabilities.0.input_schema.a")


def test_yaml_nested_5000_deep_is_422_not_a_recursion_error() -> None:
    body = (HEAD.removesuffix("\n") + " " + "[" * 5000 + "]" * 5000 + "\n").encode()
    assert f"deeper than {MAX_MANIFEST_DEPTH} levels" in refused(body, "application/yaml").message


def test_json_past_orjsons_own_depth_limit_is_422() -> None:
    body = orjson.dumps(manifest({})).replace(b"{}", b'{"a":' * 2000 + b"1" + b"}" * 2000)
    refused(body, "application/json")


@settings(max_examples=40, deadline=None)
@given(st.integers(ABOVE_SCHEMA + 1, MAX_MANIFEST_DEPTH + 8))
def test_json_and_yaml_agree_on_the_depth_bound(depth: int) -> None:
    data = deep_manifest(depth)
    for body, content_type in (
        (orjson.dumps(data), "application/json"),
        (yaml.safe_dump(data).encode(), "application/yaml"),
    ):
        if depth <= MAX_MANIFEST_DEPTH:
            parse_manifest(body, content_type)
        else:
            refused(body, content_type)


def test_a_manifest_at_the_bound_can_be_stored() -> None:
    parsed = parse_manifest(orjson.dumps(deep_manifest(MAX_MANIFEST_DEPTH)), "application/json")
    event = RegistryEvent(RegistryEventType.REGISTERED, Tenant("t"), AgentName("deep"), parsed)
    assert orjson.loads(encode(event).payload)["manifest"] == parsed.model_dump(mode="json")
    canonical_json(parsed)


def test_a_manifest_built_in_code_too_deep_to_store_is_422_not_a_crash() -> None:
    built = AgentManifest.model_validate(manifest({"a": nest(300)}))
    event = RegistryEvent(RegistryEventType.REGISTERED, Tenant("t"), AgentName("deep"), built)
    for store in (lambda: encode(event), lambda: canonical_json(built)):
        with pytest.raises(ManifestInvalid, match="cannot be serialized") as caught:
            store()
        assert caught.value.status == 422
