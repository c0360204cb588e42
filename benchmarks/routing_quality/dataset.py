"""The labelled dataset: agents.yaml (manifests) and requests.yaml (requests with labels).

``load()`` reads both files and builds every request's bytes; ``problems()`` lists what is
wrong with a dataset (an empty list means it is sound). The runner, the baselines and the
unit test all read the dataset through this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import yaml

from benchmarks.routing_quality.payloads import CONTENT_TYPES, MAGIC, build
from broker.registry.manifest import ManifestInvalid, validate_manifest

HERE = Path(__file__).resolve().parent
AGENTS_FILE = HERE / "agents.yaml"
REQUESTS_FILE = HERE / "requests.yaml"

MIN_AGENTS = 12
MIN_REQUESTS = 60
_BODY_FIELDS = ("body", "json", "ndjson", "payload")
_FIELDS = {
    "id",
    "label",
    "modality",
    "content_type",
    "text",
    "intent",
    "hard",
    "note",
    *_BODY_FIELDS,
}


class Modality(StrEnum):
    """How a request reaches the broker; per-modality accuracy is reported on these."""

    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    DOCUMENT = "document"
    SENSOR = "sensor"
    STRUCTURED = "structured"


#: The content types each modality may be sent as (a media-type prefix ends with "/").
MODALITY_TYPES: dict[Modality, tuple[str, ...]] = {
    Modality.TEXT: ("text/",),
    Modality.IMAGE: ("image/",),
    Modality.AUDIO: ("audio/",),
    Modality.DOCUMENT: ("application/pdf",),
    Modality.SENSOR: ("application/json", "application/x-ndjson"),
    Modality.STRUCTURED: ("application/json",),
}


@dataclass(frozen=True)
class Request:
    """One labelled request, with the exact bytes and headers the runner sends."""

    id: str
    label: str
    modality: Modality
    content_type: str
    body: bytes
    text: str | None = None
    intent: str | None = None
    hard: bool = False
    note: str = ""
    payload_kind: str | None = None

    def headers(self) -> dict[str, str]:
        """Content-Type, and Broker-Text (percent-encoded UTF-8) / Broker-Intent when given."""
        headers = {"content-type": self.content_type}
        if self.text:
            headers["broker-text"] = quote(self.text, safe="")
        if self.intent:
            headers["broker-intent"] = self.intent
        return headers

    def plain_text(self) -> str:
        """The words a text-only router sees: Broker-Text, or else a textual body; else ''."""
        if self.text:
            return self.text
        textual = self.content_type.startswith("text/") or self.content_type in (
            "application/json",
            "application/x-ndjson",
        )
        return self.body.decode() if textual else ""


@dataclass(frozen=True)
class Dataset:
    agents: list[dict[str, Any]]
    requests: list[Request]
    errors: list[str] = field(default_factory=list)

    @property
    def agent_names(self) -> list[str]:
        return [str(a.get("name")) for a in self.agents]


def _body(raw: Mapping[str, Any]) -> tuple[bytes, str | None]:
    """(the payload bytes, the generated kind or None)."""
    present = [f for f in _BODY_FIELDS if f in raw]
    if len(present) != 1:
        raise ValueError(f"needs exactly one of {', '.join(_BODY_FIELDS)}, has {present or 'none'}")
    match present[0]:
        case "body":
            return str(raw["body"]).encode(), None
        case "json":
            return orjson.dumps(raw["json"]), None
        case "ndjson":
            return b"".join(orjson.dumps(item) + b"\n" for item in raw["ndjson"]), None
        case _:
            spec = raw["payload"]
            return build(spec), str(spec.get("kind"))


def _request(raw: Mapping[str, Any]) -> Request:
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    body, kind = _body(raw)
    return Request(
        id=str(raw["id"]),
        label=str(raw["label"]),
        modality=Modality(raw["modality"]),
        content_type=str(raw["content_type"]),
        body=body,
        text=raw.get("text"),
        intent=raw.get("intent"),
        hard=bool(raw.get("hard", False)),
        note=str(raw.get("note", "")),
        payload_kind=kind,
    )


def load(agents_file: Path = AGENTS_FILE, requests_file: Path = REQUESTS_FILE) -> Dataset:
    """Both files, every request's bytes built; a request that cannot be built is an error."""
    agents = yaml.safe_load(agents_file.read_text())["agents"]
    requests: list[Request] = []
    errors: list[str] = []
    for index, raw in enumerate(yaml.safe_load(requests_file.read_text())["requests"]):
        try:
            requests.append(_request(raw))
        except (KeyError, ValueError, TypeError) as e:
            errors.append(f"request #{index} ({raw.get('id', '?')}): {e}")
    return Dataset(agents, requests, errors)


def _manifest_problems(dataset: Dataset) -> list[str]:
    found: list[str] = []
    for agent in dataset.agents:
        try:
            validate_manifest(agent)
        except ManifestInvalid as e:
            found.append(f"agent {agent.get('name')!r}: {e.message} {e.errors}")
            continue
        if str(agent["description"]).count(". ") or not str(agent["description"]).endswith("."):
            found.append(f"agent {agent['name']!r}: the description is not one sentence")
    names = Counter(dataset.agent_names)
    found += [f"agent {n!r} is listed {c} times" for n, c in names.items() if c > 1]
    if len(names) < MIN_AGENTS:
        found.append(f"{len(names)} agents, at least {MIN_AGENTS} wanted")
    return found


def _actions(dataset: Dataset) -> set[str]:
    return {str(c["action"]) for a in dataset.agents for c in a.get("capabilities", [])}


def _request_problems(dataset: Dataset, request: Request) -> list[str]:
    where = f"request {request.id}"
    found: list[str] = []
    if request.label not in dataset.agent_names:
        found.append(f"{where}: label {request.label!r} names no agent")
    if not request.content_type.startswith(MODALITY_TYPES[request.modality]):
        found.append(f"{where}: {request.content_type} is not a {request.modality} content type")
    if request.intent is not None and request.intent not in _actions(dataset):
        found.append(f"{where}: intent {request.intent!r} is no agent's capability action")
    if request.payload_kind is not None:
        if request.content_type != CONTENT_TYPES[request.payload_kind]:
            kind = request.payload_kind
            found.append(f"{where}: a {kind} payload sent as {request.content_type}")
        if not request.body.startswith(MAGIC[request.payload_kind]):
            found.append(f"{where}: the {request.payload_kind} payload lacks its magic bytes")
    if not request.body:
        found.append(f"{where}: empty body")
    return found


def problems(dataset: Dataset) -> list[str]:
    """Everything wrong with the dataset, as sentences; empty when it is sound."""
    found = list(dataset.errors) + _manifest_problems(dataset)
    ids = Counter(r.id for r in dataset.requests)
    found += [f"request id {i!r} is used {c} times" for i, c in ids.items() if c > 1]
    if len(dataset.requests) < MIN_REQUESTS:
        found.append(f"{len(dataset.requests)} requests, at least {MIN_REQUESTS} wanted")
    for request in dataset.requests:
        found += _request_problems(dataset, request)
    return found
