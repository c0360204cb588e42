"""Import an A2A agent card (``/.well-known/agent.json``) as an agent manifest.

A card's skills become capabilities (skill id → action, its examples kept for routing,
its input modes → accepted content types and modalities); the card's description, skill
names and examples become the text the router embeds.

A card is the provider's to write, and A2A constrains little of it, so the import reads
what it can: a version that is not Semantic Versioning (``1.0-beta``, ``1.0.0.1``,
``2025-06-01``) becomes one (``1.0.0-beta``, ``1.0.0+1``, ``2025.6.1``); input
modes are media types read without case or parameters, the older ``text``, ``data`` and
``file`` modes included (``file``: any type, so the skill lists none); a name with no
character a manifest name may hold becomes ``agent-`` and a hash of it; skill ids that
come out as the same action get ``-2``, ``-3``, ... in card order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from broker.envelope import media_type
from broker.registry.manifest import (
    AgentManifest,
    ManifestInvalid,
    Modality,
    validate_manifest,
    version_order,
)

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
    "data": "application/json",
}
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
#: The older A2A mode for a file of any type: the skill then takes any content type.
_ANY_FILE = "file"


def _name(value: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", value.strip()).strip("-")[:64]
    if cleaned:
        return cleaned
    return "agent-" + hashlib.blake2b(value.encode(), digest_size=4).hexdigest()


def _action(skill_id: str) -> str:
    action = re.sub(r"[^a-z0-9_.-]+", "-", skill_id.strip().lower()).strip("-.")[:64]
    return action if action and action[0].isalnum() else f"skill-{action}".strip("-")[:64]


def _unique(action: str, taken: set[str]) -> str:
    unique, n = action, 1
    while unique in taken:
        n += 1
        suffix = f"-{n}"
        unique = action[: 64 - len(suffix)] + suffix
    taken.add(unique)
    return unique


def _identifiers(text: str) -> str:
    """``text`` as dot-separated Semantic Versioning identifiers (``[0-9A-Za-z-]``)."""
    parts = (re.sub(r"[^0-9A-Za-z-]+", "-", p).strip("-") for p in text.split("."))
    return ".".join(p for p in parts if p)


def _semver(version: str) -> str:
    """``version`` when it is Semantic Versioning, else the nearest version that is: a
    date's three numbers; a numeric head padded to three numbers (numbers past three kept as
    build metadata), what follows a ``-`` as the pre-release; a head that is not numbers,
    as build metadata of ``0.0.0``."""
    text = version.strip().removeprefix("v").removeprefix("V")
    try:
        version_order(text)
        return text
    except ValueError:
        pass
    if date := _DATE.fullmatch(text):  # a release date: its numbers sort as a version does
        return ".".join(str(int(n)) for n in date.groups())
    head, dash, rest = text.partition("-")
    numbers = head.split(".")
    if all(n.isascii() and n.isdigit() for n in numbers):
        release = [str(int(n)) for n in numbers[:3]] + ["0"] * (3 - len(numbers[:3]))
        candidate = ".".join(release)
        pre = _identifiers(rest) if dash else ""
        pre = ".".join(p if not p.isdigit() else str(int(p)) for p in pre.split(".") if p)
        build = ".".join(numbers[3:])
        candidate += f"-{pre}" if pre else ""
        candidate += f"+{build}" if build else ""
    else:
        build = _identifiers(text)
        candidate = f"0.0.0+{build}" if build else "0.0.0"
    try:
        version_order(candidate)
    except ValueError:
        return "0.0.0"
    return candidate


def _modes(value: Any, where: str) -> list[str] | None:
    """The content types of a list of input modes, ``None`` when one of them takes any file
    (``[]`` when there is no list)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise ManifestInvalid(
            f"{where} must be a list of strings", [{"loc": where, "msg": "not a list of strings"}]
        )
    found: list[str] = []
    for mode in value:
        bare = media_type(mode)
        if bare == _ANY_FILE:
            return None
        bare = _MODE_ALIASES.get(bare, bare)
        if bare not in found:
            found.append(bare)
    return found


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
    actions: set[str] = set()
    for i, skill in enumerate(skills):
        if not isinstance(skill, Mapping) or not isinstance(skill.get("id"), str):
            raise ManifestInvalid(
                "every skill needs an id", [{"loc": f"skills.{i}.id", "msg": "required string"}]
            )
        own = _modes(skill.get("inputModes"), f"skills.{i}.inputModes")
        content_types = (own if own != [] else default_in) or []
        given = skill.get("examples")
        listed = given if isinstance(given, list) else []  # a lone string is not a list
        examples = [e for e in listed if isinstance(e, str)][:50]
        summary = skill.get("description") or skill.get("name") or ""
        capabilities.append(
            {
                "action": _unique(_action(skill["id"]), actions),
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
            "name": _name(name),
            "version": _semver(str(card.get("version") or "0.0.0")),
            "description": description[:2000],
            "endpoint": card.get("url") if isinstance(card.get("url"), str) else None,
            "capabilities": capabilities,
            "embedding": {"text": " ".join(t for t in texts if t)[:4000]},
            "labels": labels,
        }
    )
