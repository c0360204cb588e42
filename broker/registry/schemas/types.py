"""The schema registry's vocabulary: schema types, compatibility levels, a parsed schema.

:func:`parse_schema` is the one entry point that turns registered text into a
:class:`ParsedSchema`; it dispatches on :class:`SchemaType` to the per-type parsers in
``avro``, ``jsonschema`` and ``protobuf``. Every way a text can be wrong ends as
:class:`InvalidSchemaError` with a one-line message. The input bounds (size, nesting) and
the JSON loading that Avro and JSON Schema share live here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAX_SCHEMA_BYTES = 1 << 20
"""The largest schema text accepted, in UTF-8 bytes (1 MiB)."""

MAX_NESTING = 64
"""The deepest nesting accepted: JSON arrays/objects, or ``{`` blocks in a ``.proto`` file."""

MAX_COMPARE_DEPTH = 256
"""How deep a compatibility walk follows named types/references before it gives up."""


class SchemaType(StrEnum):
    """The schema languages the registry understands (Confluent's ``schemaType``)."""

    AVRO = "AVRO"
    PROTOBUF = "PROTOBUF"
    JSON = "JSON"


class CompatibilityLevel(StrEnum):
    """Which versions a new schema is checked against, and in which direction."""

    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"


class InvalidSchemaError(ValueError):
    """The schema text is not a valid schema of its type; the message says why, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class SchemaTooComplexError(InvalidSchemaError):
    """A compatibility check would take more work than it is allowed (the schema may well be
    valid): refused rather than left to hold the worker."""


@dataclass(frozen=True, slots=True)
class ParsedSchema:
    """A validated schema with its canonical form and a type-specific payload.

    Equality and hashing use ``schema_type``, ``text`` and ``canonical`` only.

    - ``parsed``: Avro: the ``fastavro``-parsed schema (named types from references
      resolved); JSON: the schema as a ``dict`` (or ``bool``); Protobuf: ``None``.
    - ``file_descriptor_set``/``file_name``: Protobuf only: a serialized
      ``google.protobuf.FileDescriptorSet`` including imports, and the main file's name.
    - ``references``: the reference name → referenced schema mapping it was parsed with.
    """

    schema_type: SchemaType
    text: str
    canonical: str
    parsed: Any = field(default=None, compare=False, repr=False)
    file_descriptor_set: bytes = field(default=b"", compare=False, repr=False)
    file_name: str = field(default="", compare=False)
    references: Mapping[str, ParsedSchema] = field(default_factory=dict, compare=False, repr=False)


Parser = Callable[[str, Mapping[str, ParsedSchema]], ParsedSchema]


def parse_schema(
    schema_type: SchemaType | str,
    text: str,
    references: Mapping[str, ParsedSchema] | None = None,
) -> ParsedSchema:
    """Validate ``text`` as a schema of ``schema_type`` and return its parsed form.

    ``references`` maps a Confluent reference name (Avro: a named type's full name;
    Protobuf: an import path; JSON: a ``$ref`` URL) to the already-parsed schema.
    Raises :class:`InvalidSchemaError` for anything that is not a valid schema.
    """
    from broker.registry.schemas import avro, jsonschema, protobuf

    parsers: dict[SchemaType, Parser] = {
        SchemaType.AVRO: avro.parse,
        SchemaType.JSON: jsonschema.parse,
        SchemaType.PROTOBUF: protobuf.parse,
    }
    try:
        kind = SchemaType(schema_type)
    except ValueError:
        raise InvalidSchemaError(f"unknown schema type {schema_type!r}") from None
    if not isinstance(text, str):
        raise InvalidSchemaError(f"schema must be a string, not {type(text).__name__}")
    check_size(text)
    refs = dict(references or {})
    for name, ref in refs.items():
        if ref.schema_type is not kind:
            raise InvalidSchemaError(
                f"reference {name!r} is a {ref.schema_type} schema, expected {kind}"
            )
    return parsers[kind](text, refs)


def check_size(text: str) -> None:
    """Reject a schema text over :data:`MAX_SCHEMA_BYTES`."""
    if len(text) > MAX_SCHEMA_BYTES or len(text.encode("utf-8", "surrogatepass")) > (
        MAX_SCHEMA_BYTES
    ):
        raise InvalidSchemaError(f"schema is larger than {MAX_SCHEMA_BYTES} bytes")


def load_json(text: str) -> Any:
    """Parse JSON text, bounded in size and nesting; errors become InvalidSchemaError."""
    check_size(text)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidSchemaError(f"schema nests deeper than {MAX_NESTING} levels") from None
    except ValueError as e:
        raise InvalidSchemaError(f"schema is not valid JSON: {e}") from None
    if json_depth(value) > MAX_NESTING:
        raise InvalidSchemaError(f"schema nests deeper than {MAX_NESTING} levels")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_depth(value: Any) -> int:
    """The nesting depth of a JSON value (scalars are 0), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: list[Any] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def canonical_json(value: Any) -> str:
    """Sorted-key, compact JSON: equal for equal values whatever their key order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
