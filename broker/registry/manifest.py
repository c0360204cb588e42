"""The agent manifest: what an agent is, can do, accepts, and may touch.

Validated by pydantic; its JSON Schema is exported to ``schemas/agent-manifest.schema.json``
(``python -m broker.registry.manifest``) so editors can check manifests as they are written.
"""

from __future__ import annotations

import math
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NewType

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.envelope import media_type
from broker.errors import Unprocessable, UnsupportedMediaType

AgentName = NewType("AgentName", str)
#: An agent name is a NATS subject token: reg.<tenant>.agent.<name>, route.<tenant>.<name>.
AGENT_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "agent-manifest.schema.json"
SCHEMA_ID = "https://agent-broker.dev/schemas/agent-manifest.schema.json"

# Semantic Versioning 2.0.0, the regular expression the specification gives.
_SEMVER = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SEMVER_PARTS = re.compile(_SEMVER)


def version_order(version: str) -> tuple[Any, ...]:
    """A key that sorts manifest versions by Semantic Versioning 2.0.0 precedence (its
    section 11): major, minor and patch as numbers; a pre-release below its release, its
    identifiers compared one by one (numbers as numbers, below words, which compare in
    ASCII order; more identifiers rank higher when the rest are equal); build metadata
    ignored. ``ValueError`` for a string that is not a version."""
    parts = _SEMVER_PARTS.fullmatch(version)
    if parts is None:
        raise ValueError(f"{version[:64]!r} is not a semantic version")
    major, minor, patch, pre = parts.group(1, 2, 3, 4)
    release = (int(major), int(minor), int(patch))
    if pre is None:
        return (*release, 1, ())
    ids = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in pre.split("."))
    return (*release, 0, ids)


_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*)$")
LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,62}$")

MAX_MANIFEST_DEPTH = 72
"""The deepest nesting of objects and arrays a manifest may have: an ``input_schema`` as deep
as the schema registry takes (64 levels) still fits under ``capabilities[]``. Deeper is no use,
only cost: YAML is composed recursively (5,000 levels overflow the stack), and orjson and
pydantic refuse to serialize past 254 levels, so the manifest could not be stored."""


class ManifestInvalid(Unprocessable):
    """A manifest that does not validate; ``errors`` names each failing field path."""

    error_code = "invalid_manifest"

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "errors": self.errors}


SERIALIZE_ERRORS = (ValueError, orjson.JSONEncodeError)
"""What serializing a manifest raises when it cannot be (pydantic's depth limit is a plain
``ValueError``): one built in code is not bounded by :func:`validate_manifest`, so these are
answered as :class:`ManifestInvalid` too."""


class Modality(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"
    DOCUMENT = "document"
    SENSOR = "sensor"
    STRUCTURED = "structured"


def _integral(value: Any) -> Any:
    """``2.0`` as ``2``: JSON Schema counts a number with no fraction as an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


_JsonInt = Annotated[int, Strict(), BeforeValidator(_integral)]
"""An integer as JSON Schema has it: ``2`` or ``2.0``; never ``true``, ``"2"`` or ``2.5``. A
bounded one names its bound first, ``Annotated[int, Field(ge=1), Strict(), BeforeValidator(…)]``:
a bound outside the validator is exported as ``ge``, which JSON Schema does not know."""
_JsonNumber = Annotated[float, Strict()]
"""A number as JSON Schema has it: an integer or a float; never ``true`` or ``"1.5"``."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SchemaRef(_Model):
    """A schema in the schema registry, by subject and version."""

    subject: str = Field(min_length=1, max_length=255)
    version: _JsonInt | Literal["latest"] = "latest"


SchemaSpec = dict[str, Any] | SchemaRef
_SCHEMA_SPEC = (
    "A JSON Schema, or a schema in the schema registry by subject and version. The manifest "
    f"nests at most {MAX_MANIFEST_DEPTH} levels in all (checked by the API only)."
)


class Capability(_Model):
    """One thing the agent does, what it takes and gives, and how people ask for it."""

    action: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = Field(default="", max_length=1000)
    input_schema: SchemaSpec | None = Field(default=None, description=_SCHEMA_SPEC)
    output_schema: SchemaSpec | None = Field(default=None, description=_SCHEMA_SPEC)
    content_types: list[
        Annotated[str, Field(json_schema_extra={"pattern": _MEDIA_TYPE.pattern})]
    ] = Field(default_factory=list, max_length=32)
    modalities: list[Modality] = Field(default_factory=list, max_length=8)
    examples: list[Annotated[str, Field(max_length=500)]] = Field(
        default_factory=list, max_length=50, description="Example requests, for routing."
    )

    @field_validator("content_types")
    @classmethod
    def _media_types(cls, value: list[str]) -> list[str]:
        for media in value:
            if not _MEDIA_TYPE.fullmatch(media):  # $ alone allows a final newline
                raise ValueError(f"{media!r} is not a media type such as image/png or image/*")
        return value


#: A model's name (``embedding.model``, the ``Broker-Embedding-Model`` header): a hub id
#: (``owner/name``), a directory or an embedder's name; printable ASCII, no spaces.
MODEL_NAME_PATTERN = r"^[!-~]{1,200}$"


class Embedding(_Model):
    """The agent's meaning for semantic routing: a vector, or text to embed."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": [field], "properties": {field: {"not": {"type": "null"}}}}
                for field in ("vector", "text")
            ]
        }
    )

    vector: list[_JsonNumber] | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Finite numbers (JSON has no others; the API refuses YAML's .inf and .nan).",
    )
    text: str | None = Field(default=None, min_length=1, max_length=4000)
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=MODEL_NAME_PATTERN,
        description=(
            "The model that made vector (e.g. all-MiniLM-L6-v2, or the router's embedder name; "
            "printable ASCII, no spaces). When given and not the routers' model, they ignore "
            "vector and embed text (or the description) themselves; when absent, vector is "
            "used whenever its dimension matches."
        ),
    )

    @model_validator(mode="after")
    def _one_of(self) -> Embedding:
        if self.vector is None and self.text is None:
            raise ValueError("give a vector, a text, or both")
        if self.vector is not None and not all(math.isfinite(x) for x in self.vector):
            raise ValueError("vector values must be finite numbers")
        return self


class Limits(_Model):
    max_qps: _JsonNumber | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_concurrency: Annotated[int, Field(ge=1), Strict(), BeforeValidator(_integral)] | None = None


class MemoryScope(StrEnum):
    TENANT_ISOLATED = "tenant_isolated"
    AGENT_PRIVATE = "agent_private"
    SHARED = "shared"


class Security(_Model):
    allowed_tools: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=256
    )
    memory_scope: MemoryScope = MemoryScope.TENANT_ISOLATED


class AgentManifest(_Model):
    """An agent, as registered in the ``REGISTRY`` stream."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra={"title": "Agent manifest"}
    )

    name: str = Field(min_length=1, max_length=64, pattern=AGENT_NAME_PATTERN)
    version: str = Field(pattern=_SEMVER, max_length=128, description="Semantic version.")
    description: str = Field(min_length=1, max_length=2000)
    endpoint: str | None = Field(
        default=None, max_length=1024, description="Inbox or URL; default: its route subject."
    )
    capabilities: list[Capability] = Field(
        min_length=1,
        max_length=128,
        description=(
            "Each with its own action. JSON Schema cannot say that items differ in one field: "
            "uniqueItems refuses only identical capabilities, the API any repeated action."
        ),
        json_schema_extra={"uniqueItems": True},
    )
    embedding: Embedding | None = None
    limits: Limits = Field(default_factory=Limits)
    security: Security = Field(default_factory=Security)
    labels: dict[str, Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict,
        max_length=64,
        json_schema_extra={"propertyNames": {"pattern": LABEL_KEY.pattern}},
    )

    @field_validator("capabilities")
    @classmethod
    def _unique_actions(cls, value: list[Capability]) -> list[Capability]:
        actions = [c.action for c in value]
        duplicates = sorted({a for a in actions if actions.count(a) > 1})
        if duplicates:
            raise ValueError(f"duplicate action(s): {', '.join(duplicates)}")
        return value

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not LABEL_KEY.fullmatch(key):
                raise ValueError(f"label key {key[:70]!r} is not lower-case a-z 0-9 . _ / -")
        return value


def _errors(error: ValidationError) -> list[dict[str, str]]:
    return [
        {"loc": ".".join(str(part) for part in e["loc"]) or "(root)", "msg": e["msg"]}
        for e in error.errors(include_url=False)
    ]


#: What JSON holds as it is (a tuple as an array), beside mappings with string keys.
_JSON_VALUES = (str, int, float, bool, type(None), list, tuple)


def _path(trail: tuple[Any, ...], most: int) -> str:
    parts: list[str] = []
    while trail:
        trail, part = trail
        parts.append(str(part)[:64])
    parts.reverse()
    return ".".join(parts[:most]) + (".…" if len(parts) > most else "") or "(root)"


def _not_json(node: Any) -> str | None:
    """Why ``node`` (a leaf, or a mapping by its keys) is no JSON value, if it is not."""
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, str):
                kind = type(key).__name__
                return f"has the key {str(key)[:64]!r} ({kind}), and JSON keys are strings"
        return None
    if isinstance(node, float) and not math.isfinite(node):
        return f"is {node}, which JSON has no number for"
    if isinstance(node, _JSON_VALUES):
        return None
    return f"is a YAML {type(node).__name__}, which JSON has no value for"


def _too_deep(value: Any) -> str | None:
    """Where ``value`` nests deeper than :data:`MAX_MANIFEST_DEPTH`, as a field path, if it
    does; iterative, as such a value is what overflows a recursive walk."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 0, ())]
    while stack:
        node, depth, trail = stack.pop()
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        if depth == MAX_MANIFEST_DEPTH:
            return _path(trail, 6)
        stack.extend((child, depth + 1, (trail, key)) for key, child in children)
    return None


def _not_json_at(value: Any) -> tuple[str, str] | None:
    """Where ``value`` (no deeper than :data:`MAX_MANIFEST_DEPTH`) holds what JSON cannot,
    and what: YAML's ``.inf`` and ``.nan``, timestamps, ``!!binary``, ``!!set``, keys that
    are not strings. A field of a type refuses them itself; a free-form one (``input_schema``)
    took them, and stored as JSON they read back changed (``null``, a string) or merged."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        node, trail = stack.pop()
        if (problem := _not_json(node)) is not None:
            return _path(trail, 16), problem
        if isinstance(node, dict):
            stack.extend((child, (trail, key)) for key, child in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((child, (trail, i)) for i, child in enumerate(node))
    return None


def validate_manifest(data: Any) -> AgentManifest:
    """A manifest from parsed JSON/YAML; :class:`ManifestInvalid` names every failing path."""
    if not isinstance(data, dict):
        raise ManifestInvalid(
            "a manifest is a mapping (JSON object)", [{"loc": "(root)", "msg": "not an object"}]
        )
    if (where := _too_deep(data)) is not None:
        problem = f"nests deeper than {MAX_MANIFEST_DEPTH} levels"
        raise ManifestInvalid(f"manifest {problem} at {where}", [{"loc": where, "msg": problem}])
    try:
        manifest = AgentManifest.model_validate(data)
    except ValidationError as e:
        errors = _errors(e)
        paths = ", ".join(err["loc"] for err in errors[:10])
        raise ManifestInvalid(f"invalid manifest at {paths}", errors) from None
    if (found := _not_json_at(data)) is not None:
        where, problem = found
        raise ManifestInvalid(f"manifest {problem} at {where}", [{"loc": where, "msg": problem}])
    return manifest


class _ManifestLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without anchors and aliases, and at most :data:`MAX_MANIFEST_DEPTH`
    deep. An alias is a reference: a few hundred bytes of nested aliases (a "billion laughs")
    stand for billions of nodes, which validating or storing the manifest would expand. A
    manifest never needs them, so they are refused as they are read."""

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        mark = event.start_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            raise ManifestInvalid(f"YAML anchors and aliases are not allowed in a manifest{where}")
        nests = isinstance(event, yaml.CollectionStartEvent)
        if nests and self._depth == MAX_MANIFEST_DEPTH:
            raise ManifestInvalid(f"manifest nests deeper than {MAX_MANIFEST_DEPTH} levels{where}")
        self._depth += nests
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nests


#: The media types a manifest may be sent as (``+json`` and ``+yaml`` suffixes too).
_YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


def manifest_is_yaml(content_type: str | None) -> bool:
    """Whether a manifest sent as ``content_type`` is YAML (else JSON, also when no type is
    given); :class:`UnsupportedMediaType` for any other media type. Media types compare
    without case and parameters (RFC 9110): ``Application/JSON; charset=utf-8`` is JSON."""
    bare = media_type(content_type)
    if bare in _YAML_TYPES or bare.endswith("+yaml"):
        return True
    if not bare or bare == "application/json" or bare.endswith("+json"):
        return False
    raise UnsupportedMediaType(
        f"a manifest is application/json or application/yaml, not {bare[:100]!r}"
    )


def parse_manifest(data: bytes, content_type: str | None = None) -> AgentManifest:
    """Parse and validate a JSON or YAML manifest (:func:`manifest_is_yaml`)."""
    is_yaml = manifest_is_yaml(content_type)
    try:
        parsed = yaml.load(data, Loader=_ManifestLoader) if is_yaml else orjson.loads(data)
    except (yaml.YAMLError, orjson.JSONDecodeError, UnicodeDecodeError) as e:
        kind = "YAML" if is_yaml else "JSON"
        raise ManifestInvalid(f"manifest is not valid {kind}: {str(e)[:200]}") from None
    return validate_manifest(parsed)


def canonical_json(manifest: AgentManifest) -> bytes:
    """Deterministic bytes: identical manifests compare equal whatever their key order."""
    try:
        return orjson.dumps(manifest.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    except SERIALIZE_ERRORS as e:
        raise ManifestInvalid(f"manifest cannot be serialized: {e}") from None


def manifest_json_schema() -> dict[str, Any]:
    schema = AgentManifest.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def render_schema() -> bytes:
    return (
        orjson.dumps(manifest_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        + b"\n"
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_PATH
    target.write_bytes(render_schema())
    print(f"wrote {target}")
