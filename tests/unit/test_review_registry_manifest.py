"""Manifest values a reviewer found stored other than sent: in a YAML manifest's free-form
fields (``input_schema``, ``output_schema``), a value JSON has no form for (``.inf``,
``.nan``, a timestamp, ``!!binary``, ``!!set``, a key that is not a string) was accepted and
stored changed: ``null`` for ``.inf``, a string for a date, a list in no set order, ``"1"``
for the key ``1`` (and ``true``, equal to ``1``, overwrote it). Refused now, naming where."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.registry.manifest import (
    AgentManifest,
    ManifestInvalid,
    canonical_json,
    parse_manifest,
    validate_manifest,
)

pytestmark = pytest.mark.unit

HEAD = b"name: y\nversion: 1.0.0\ndescription: d\ncapabilities:\n- action: x\n"


def with_schema(field: str, value: str) -> bytes:
    return HEAD + f"  {field}:\n    type: object\n    properties:\n      n: {value}\n".encode()


@pytest.mark.parametrize("field", ["input_schema", "output_schema"])
@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("{maximum: .inf}", "properties.n.maximum"),
        ("{minimum: -.inf}", "properties.n.minimum"),
        ("{multipleOf: .nan}", "properties.n.multipleOf"),
        ("{const: 2001-01-01}", "properties.n.const"),
        ("{const: 2001-01-01 10:00:00}", "properties.n.const"),
        ("{const: !!binary aGk=}", "properties.n.const"),
        ("{enum: !!set {a, b}}", "properties.n.enum"),
        ("{enum: [1, .inf]}", "properties.n.enum.1"),
        ("{const: {1: a}}", "properties.n.const"),
        ("{const: {null: a}}", "properties.n.const"),
        ("{const: {1: a, true: b}}", "properties.n.const"),
    ],
)
def test_a_yaml_value_json_cannot_hold_is_refused_not_stored_changed(
    field: str, value: str, where: str
) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(with_schema(field, value), "application/yaml")
    assert [e["loc"] for e in caught.value.errors] == [f"capabilities.0.{field}.{where}"]
    assert "JSON" in caught.value.errors[0]["msg"]


def test_yaml_values_json_holds_are_still_taken() -> None:
    """YAML 1.1 spellings of JSON values (``0x10``, ``yes``, ``~``, ``1_000``) are those
    values, and a quoted date or infinity is a string: nothing is lost storing them."""
    document = with_schema(
        "input_schema",
        '{maximum: 0x10, default: yes, const: ~, minimum: 1_000, title: ".inf",'
        ' description: "2001-01-01", examples: [1.5, -2, "x"]}',
    )
    manifest = parse_manifest(document, "application/yaml")
    assert manifest.capabilities[0].input_schema == {
        "type": "object",
        "properties": {
            "n": {
                "maximum": 16,
                "default": True,
                "const": None,
                "minimum": 1000,
                "title": ".inf",
                "description": "2001-01-01",
                "examples": [1.5, -2, "x"],
            }
        },
    }


def _stored_again(manifest: AgentManifest) -> AgentManifest:
    """The manifest as a reader gets it back: its stored JSON, validated."""
    return validate_manifest(orjson.loads(canonical_json(manifest)))


#: YAML scalars and flows: some JSON holds (spelled the YAML 1.1 way), some it cannot.
_YAML_SCALARS = st.sampled_from(
    [
        ".inf",
        "-.inf",
        ".nan",
        ".NaN",
        "2001-01-01",
        "2001-12-14t21:59:43.10-05:00",
        "!!binary aGk=",
        "!!set {a}",
        "{1: a}",
        "{~: a}",
        "{1.5: a}",
        "{true: a, 1: b}",
        "1",
        "-1",
        "1.5",
        "1e3",
        "0x1f",
        "0o17",
        "yes",
        "off",
        "~",
        "null",
        "x",
        '".inf"',
        "[1, 2]",
        "{a: b}",
        "''",
        "1_000",
    ]
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_YAML_SCALARS, min_size=1, max_size=4))
def test_what_a_yaml_manifest_is_accepted_as_is_what_is_stored(values: list[str]) -> None:
    """Accepted, a YAML manifest reads back from its stored JSON exactly as accepted."""
    properties = "".join(f"      p{i}: {{const: {v}}}\n" for i, v in enumerate(values))
    document = HEAD + b"  input_schema:\n    properties:\n" + properties.encode()
    try:
        manifest = parse_manifest(document, "application/yaml")
    except ManifestInvalid:
        return
    accepted: Any = manifest.model_dump()
    assert _stored_again(manifest).model_dump() == accepted
