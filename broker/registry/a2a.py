"""Import an A2A agent card (``/.well-known/agent.json``) as an agent manifest.

A card's skills become capabilities (skill id → action, its examples kept for routing,
its input modes → accepted content types and modalities); the card's description, skill
names and examples become the text the router embeds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from broker.registry.manifest import AgentManifest, ManifestInvalid, Modality, validate_manifest

_MODALITY_BY_PREFIX = (
    ("text/", Modality.TEXT),
    ("image/", Modality.IMAGE),
    ("audio/", Modality.AUDIO),
    ("video/", Modality.VIDEO),
    ("application/pdf", Modality.DOCUMENT),
    ("application/json", Modality.STRUCTURED),
)
_MODE_ALIASES: dict[str, str] = {
    "text": "text/plain",
    "image": "image/*",
    "audio": "audio/*",
    "video": "video/*",
}


def _token(value: str, *, lower: bool = False) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", value.strip()).strip("-")[:64]
    return cleaned.lower() if lower else cleaned


def _action(skill_id: str) -> str:
    action = re.sub(r"[^a-z0-9_.-]+", "-", skill_id.strip().lower()).strip("-.")[:64]
    return action if action and action[0].isalnum() else f"skill-{action}".strip("-")[:64]


def _semver(version: str) -> str:
    parts = version.strip().lstrip("v").split(".")
    if len(parts) < 3 and all(p.isascii() and p.isdigit() for p in parts):
        parts += ["0"] * (3 - len(parts))
    return ".".join(parts)


def _modes(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise ManifestInvalid(
            f"{where} must be a list of strings", [{"loc": where, "msg": "not a list of strings"}]
        )
    modes: list[str] = value
    return [_MODE_ALIASES.get(mode) or mode for mode in modes]


def _modalities(content_types: list[str]) -> list[str]:
    found: list[str] = []
    for media in content_types:
        for prefix, modality in _MODALITY_BY_PREFIX:
            if media.startswith(prefix) and modality.value not in found:
                found.append(modality.value)
    return found


def manifest_from_agent_card(card: Mapping[str, Any]) -> AgentManifest:
    """The manifest for an A2A agent card; :class:`ManifestInvalid` names what is missing."""
    if not isinstance(card, Mapping):
        raise ManifestInvalid(
            "an agent card is a JSON object", [{"loc": "(root)", "msg": "not an object"}]
        )
    name, description = card.get("name"), card.get("description")
    skills = card.get("skills")
    problems = [
        {"loc": field, "msg": "required string"}
        for field, value in (("name", name), ("description", description))
        if not isinstance(value, str) or not value.strip()
    ]
    if not isinstance(skills, list) or not skills:
        problems.append({"loc": "skills", "msg": "at least one skill is required"})
    if problems:
        raise ManifestInvalid("not a usable A2A agent card", problems)
    assert isinstance(name, str)
    assert isinstance(description, str)
    assert isinstance(skills, list)
    default_in = _modes(card.get("defaultInputModes"), "defaultInputModes")
    capabilities: list[dict[str, Any]] = []
    texts = [description]
    for i, skill in enumerate(skills):
        if not isinstance(skill, Mapping) or not isinstance(skill.get("id"), str):
            raise ManifestInvalid(
                "every skill needs an id", [{"loc": f"skills.{i}.id", "msg": "required string"}]
            )
        content_types = _modes(skill.get("inputModes"), f"skills.{i}.inputModes") or default_in
        given = skill.get("examples")
        listed = given if isinstance(given, list) else []  # a lone string is not a list
        examples = [e for e in listed if isinstance(e, str)][:50]
        summary = skill.get("description") or skill.get("name") or ""
        capabilities.append(
            {
                "action": _action(skill["id"]),
                "description": str(summary)[:1000],
                "content_types": content_types,
                "modalities": _modalities(content_types),
                "examples": [e[:500] for e in examples],
            }
        )
        texts += [str(skill.get("name") or ""), str(summary), *examples]
    labels = {"a2a/name": name[:256]}
    provider = card.get("provider")
    if isinstance(provider, Mapping) and isinstance(provider.get("organization"), str):
        labels["a2a/provider"] = provider["organization"][:256]
    return validate_manifest(
        {
            "name": _token(name),
            "version": _semver(str(card.get("version") or "0.0.0")),
            "description": description[:2000],
            "endpoint": card.get("url") if isinstance(card.get("url"), str) else None,
            "capabilities": capabilities,
            "embedding": {"text": " ".join(t for t in texts if t)[:4000]},
            "labels": labels,
        }
    )
