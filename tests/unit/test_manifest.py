"""Agent manifests: validation with field paths, canonical form, A2A import, schema export."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import Tenant
from broker.registry.a2a import manifest_from_agent_card
from broker.registry.events import RegistryEvent, RegistryEventType
from broker.registry.manifest import (
    SCHEMA_PATH,
    AgentManifest,
    AgentName,
    ManifestInvalid,
    canonical_json,
    parse_manifest,
    render_schema,
)
from broker.registry.snapshot import fold

pytestmark = pytest.mark.unit

VALID: dict[str, Any] = {
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


def test_json_and_yaml_manifests_parse_to_the_same_model() -> None:
    from_json = parse_manifest(orjson.dumps(VALID), "application/json")
    from_yaml = parse_manifest(yaml.safe_dump(VALID).encode(), "application/yaml")
    assert from_json == from_yaml
    assert from_json.capabilities[0].output_schema is not None


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"version": "1.0"}, "version"),
        ({"name": "has space"}, "name"),
        ({"capabilities": []}, "capabilities"),
        ({"capabilities": [{"action": "Bad Action"}]}, "capabilities.0.action"),
        (
            {"capabilities": [{"action": "a", "content_types": ["png"]}]},
            "capabilities.0.content_types",
        ),
        (
            {"capabilities": [{"action": "a", "content_types": ["text/plain\n"]}]},
            "capabilities.0.content_types",
        ),
        (
            {"capabilities": [{"action": "a", "modalities": ["smell"]}]},
            "capabilities.0.modalities.0",
        ),
        ({"embedding": {}}, "embedding"),
        ({"embedding": {"vector": [1.0, float("inf")]}}, "embedding"),
        ({"embedding": {"vector": [1.0], "model": "all MiniLM"}}, "embedding.model"),
        ({"embedding": {"vector": [1.0], "model": "m" * 201}}, "embedding.model"),
        ({"embedding": {"vector": [1.0], "model": ""}}, "embedding.model"),
        ({"limits": {"max_qps": 0}}, "limits.max_qps"),
        ({"labels": {"Bad Key": "x"}}, "labels"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_manifests_name_the_failing_path(change: dict[str, Any], path: str) -> None:
    body = {**VALID, **change}
    with pytest.raises(ManifestInvalid) as caught:  # YAML: JSON cannot carry inf
        parse_manifest(yaml.safe_dump(body).encode(), "application/yaml")
    assert path in [error["loc"] for error in caught.value.errors]
    assert caught.value.to_dict()["error_code"] == "invalid_manifest"


def test_duplicate_actions_are_refused() -> None:
    body = {**VALID, "capabilities": [{"action": "a"}, {"action": "a"}]}
    with pytest.raises(ManifestInvalid, match="capabilities"):
        parse_manifest(orjson.dumps(body))


@pytest.mark.parametrize("data", [b"[]", b"not json", b"\xff\xfe", b"null"])
def test_non_mapping_or_malformed_input_is_refused(data: bytes) -> None:
    with pytest.raises(ManifestInvalid):
        parse_manifest(data)


def test_canonical_json_ignores_key_order() -> None:
    reordered = dict(reversed(list(VALID.items())))
    assert canonical_json(parse_manifest(orjson.dumps(reordered))) == canonical_json(
        parse_manifest(orjson.dumps(VALID))
    )


names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
actions = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,15}", fullmatch=True)
manifests = st.builds(
    lambda name, major, minor, description, acts, labels: {
        "name": name,
        "version": f"{major}.{minor}.0",
        "description": description,
        "capabilities": [{"action": a} for a in acts],
        "labels": labels,
    },
    names,
    st.integers(0, 99),
    st.integers(0, 99),
    st.text(min_size=1, max_size=50),
    st.lists(actions, min_size=1, max_size=4, unique=True),
    st.dictionaries(
        st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True), st.text(max_size=20), max_size=3
    ),
)


@given(manifests)
def test_canonical_json_round_trips(body: dict[str, Any]) -> None:
    manifest = AgentManifest.model_validate(body)
    assert parse_manifest(canonical_json(manifest)) == manifest


@given(
    st.dictionaries(
        st.sampled_from(["name", "version", "description", "capabilities", "labels", "x"]),
        st.text(max_size=10) | st.integers(-(2**63), 2**63 - 1) | st.lists(st.text(max_size=5)),
        max_size=6,
    )
)
def test_arbitrary_mappings_are_a_manifest_or_a_clear_error(body: dict[str, Any]) -> None:
    status = 200
    try:
        parse_manifest(orjson.dumps(body))
    except ManifestInvalid as e:
        status = e.status
    assert status in {200, 422}


def test_exported_manifest_schema_is_current() -> None:
    """Run ``python -m broker.registry.manifest`` after changing the model."""
    assert SCHEMA_PATH.read_bytes() == render_schema(), (
        "schemas/agent-manifest.schema.json is stale"
    )


CARD: dict[str, Any] = {
    "name": "Recipe Assistant",
    "description": "Helps plan meals and shopping lists.",
    "url": "https://agents.example/recipes",
    "version": "1.0",
    "provider": {"organization": "Example Foods"},
    "defaultInputModes": ["text/plain"],
    "defaultOutputModes": ["text/plain"],
    "skills": [
        {
            "id": "plan_meals",
            "name": "Plan meals",
            "description": "Builds a weekly meal plan.",
            "tags": ["food"],
            "examples": ["what should I cook this week?"],
        },
        {
            "id": "Read Receipt",
            "name": "Read a receipt",
            "description": "Reads a photographed receipt.",
            "inputModes": ["image/png", "image/jpeg"],
        },
    ],
}


def test_a2a_card_becomes_a_manifest() -> None:
    manifest = manifest_from_agent_card(CARD)
    assert manifest.name == "Recipe-Assistant"
    assert manifest.version == "1.0.0"
    assert manifest.endpoint == "https://agents.example/recipes"
    assert [c.action for c in manifest.capabilities] == ["plan_meals", "read-receipt"]
    plan, receipt = manifest.capabilities
    assert plan.content_types == ["text/plain"]
    assert plan.modalities == ["text"]
    assert plan.examples == ["what should I cook this week?"]
    assert receipt.content_types == ["image/png", "image/jpeg"]
    assert receipt.modalities == ["image"]
    assert manifest.labels == {"a2a/name": "Recipe Assistant", "a2a/provider": "Example Foods"}
    assert manifest.embedding is not None
    assert "weekly meal plan" in (manifest.embedding.text or "")


@pytest.mark.parametrize(
    ("card", "path"),
    [
        ({**CARD, "skills": []}, "skills"),
        ({k: v for k, v in CARD.items() if k != "name"}, "name"),
        ({**CARD, "skills": [{"name": "no id"}]}, "skills.0.id"),
        ({**CARD, "defaultInputModes": "text"}, "defaultInputModes"),
    ],
)
def test_unusable_a2a_cards_are_refused(card: dict[str, Any], path: str) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        manifest_from_agent_card(card)
    assert path in [e["loc"] for e in caught.value.errors]


def _event(kind: RegistryEventType, name: str, seq: int, version: str = "1.0.0") -> RegistryEvent:
    manifest = None
    if kind is not RegistryEventType.DEREGISTERED:
        manifest = AgentManifest.model_validate({**VALID, "name": name, "version": version})
    return RegistryEvent(kind, Tenant("t"), AgentName(name), manifest, seq)


@pytest.mark.parametrize("examples", ["hello", 5, {"a": 1}])
def test_a2a_examples_that_are_not_a_list_are_left_out(examples: Any) -> None:
    """A lone string used to become its letters as examples; a number was a TypeError."""
    card = {**CARD, "skills": [{**CARD["skills"][0], "examples": examples}]}
    (plan,) = manifest_from_agent_card(card).capabilities
    assert plan.examples == []


def test_fold_is_copy_on_write_and_skips_redelivered_events() -> None:
    first = fold([_event(RegistryEventType.REGISTERED, "a", 1)])
    second = first.apply(_event(RegistryEventType.UPDATED, "a", 2, "2.0.0"))
    assert first.agent(Tenant("t"), "a").manifest.version == "1.0.0"  # type: ignore[union-attr]
    assert second.agent(Tenant("t"), "a").manifest.version == "2.0.0"  # type: ignore[union-attr]
    assert second.agent(Tenant("t"), "a").registered_seq == 1  # type: ignore[union-attr]
    assert second.apply(_event(RegistryEventType.UPDATED, "a", 2, "9.9.9")).last_seq == 2
    gone = second.apply(_event(RegistryEventType.DEREGISTERED, "a", 3))
    assert gone.agent(Tenant("t"), "a") is None
    assert len(gone) == 0
    assert second.agent(Tenant("other"), "a") is None


def test_snapshots_refuse_mutation() -> None:
    snapshot = fold([_event(RegistryEventType.REGISTERED, "a", 1)])
    record = snapshot.agent(Tenant("t"), "a")
    with pytest.raises(TypeError):
        snapshot[("t", "b")] = record  # type: ignore[assignment]
    with pytest.raises(TypeError):
        snapshot.pop(("t", "a"))
    assert snapshot.get(("t", "a")) is record


@pytest.mark.parametrize(
    ("given", "version"),
    [
        ("1.0-beta", "1.0.0-beta"),
        ("1.0.0.1", "1.0.0+1"),
        ("2025-06-01", "2025.6.1"),
        ("v2", "2.0.0"),
        ("1.2.3-rc.1+build.5", "1.2.3-rc.1+build.5"),
        ("1.0-beta.01", "1.0.0-beta.1"),
        ("latest", "0.0.0+latest"),
    ],
)
def test_an_a2a_version_is_read_as_the_nearest_semantic_version(given: str, version: str) -> None:
    """A2A leaves a card's version format to its provider; the import refused any that was
    not Semantic Versioning after padding (``1.0-beta``, ``1.0.0.1``, a date)."""
    assert manifest_from_agent_card({**CARD, "version": given}).version == version


def test_a2a_modes_are_media_types_and_the_older_modes_are_read() -> None:
    skills = [
        {"id": "a", "inputModes": ["Text/Plain; charset=utf-8", "IMAGE/PNG"]},
        {"id": "b", "inputModes": ["text", "data"]},
        {"id": "c", "inputModes": ["text", "file"]},  # a file of any type: no list
    ]
    a, b, c = manifest_from_agent_card({**CARD, "skills": skills}).capabilities
    assert a.content_types == ["text/plain", "image/png"]
    assert b.content_types == ["text/plain", "application/json"]
    assert c.content_types == []


def test_a2a_names_and_skill_ids_that_clean_up_alike_stay_apart() -> None:
    skills = [{"id": "Translate"}, {"id": "translate"}, {"id": "翻译"}, {"id": "要約"}]
    manifest = manifest_from_agent_card({**CARD, "name": "翻译助手", "skills": skills})
    actions = [c.action for c in manifest.capabilities]
    assert actions == ["translate", "translate-2", "skill", "skill-2"]
    assert manifest.name.startswith("agent-")
    assert manifest_from_agent_card({**CARD, "name": "翻译助手"}).name == manifest.name
