"""Compatibility levels applied to a subject's history: which versions, which direction.

A subject's schemas evolve; :func:`check_compatibility` asks whether a new schema may
follow the live ones under a :class:`CompatibilityLevel`, as Confluent's registry does:

- ``BACKWARD``: the new schema, as reader, reads data written with the latest version;
- ``FORWARD``: the latest version, as reader, reads data written with the new schema;
- ``FULL``: both; the ``*_TRANSITIVE`` levels check every live version, not just the
  latest; ``NONE`` checks nothing.

The per-type rules are the pure ``compatible(reader, writer)`` functions of the ``avro``,
``jsonschema`` and ``protobuf`` modules, picked from a registry keyed by schema type. Each
bounds its own work; a transitive check also stops once it has run
:data:`MAX_CHECK_SECONDS` with versions left to compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import Flag, auto

from broker.registry.schemas import avro, jsonschema, protobuf
from broker.registry.schemas.types import (
    CompatibilityLevel,
    ParsedSchema,
    SchemaTooComplexError,
    SchemaType,
)

MAX_CHECK_SECONDS = 5.0
"""How long one check against a subject's history may run. One pair of schemas is bounded by
its type's rule (JSON Schema: :data:`~broker.registry.schemas.jsonschema.MAX_COMPARE_STEPS`),
but a ``*_TRANSITIVE`` level compares every live version, twice for ``FULL``: past this, with
versions still to compare, the check is refused as too complex instead of holding the worker
for a time that grows with the subject's history."""

Rule = Callable[[ParsedSchema, ParsedSchema], list[str]]
"""``rule(reader, writer)``: why the reader cannot read the writer's data (empty: it can)."""

RULES: dict[SchemaType, Rule] = {
    SchemaType.AVRO: avro.compatible,
    SchemaType.JSON: jsonschema.compatible,
    SchemaType.PROTOBUF: protobuf.compatible,
}


class _Direction(Flag):
    NONE = 0
    BACKWARD = auto()
    FORWARD = auto()
    BOTH = BACKWARD | FORWARD


_LEVELS: dict[CompatibilityLevel, tuple[_Direction, bool]] = {
    CompatibilityLevel.BACKWARD: (_Direction.BACKWARD, False),
    CompatibilityLevel.BACKWARD_TRANSITIVE: (_Direction.BACKWARD, True),
    CompatibilityLevel.FORWARD: (_Direction.FORWARD, False),
    CompatibilityLevel.FORWARD_TRANSITIVE: (_Direction.FORWARD, True),
    CompatibilityLevel.FULL: (_Direction.BOTH, False),
    CompatibilityLevel.FULL_TRANSITIVE: (_Direction.BOTH, True),
    CompatibilityLevel.NONE: (_Direction.NONE, False),
}


def check_compatibility(
    level: CompatibilityLevel | str,
    new: ParsedSchema,
    existing: Sequence[ParsedSchema],
) -> list[str]:
    """Why ``new`` may not follow ``existing`` (live versions, oldest first) under ``level``.

    An empty list means compatible. Each message names the existing schema by its
    1-based position in ``existing`` and the direction that failed.
    """
    direction, transitive = _LEVELS[CompatibilityLevel(level)]
    if not direction or not existing:
        return []
    start = 0 if transitive else len(existing) - 1
    out: list[str] = []
    started = time.perf_counter()
    for position in range(start, len(existing)):
        old = existing[position]
        name = f"existing schema {position + 1} of {len(existing)}"
        if position > start and time.perf_counter() - started > MAX_CHECK_SECONDS:
            raise SchemaTooComplexError(
                "schema is too complex to check for compatibility: checking it against the "
                f"subject's {len(existing)} versions takes more than {MAX_CHECK_SECONDS} s "
                f"(stopped before {name})"
            )
        if old.schema_type is not new.schema_type:
            out.append(f"{name}: schema type changed from {old.schema_type} to {new.schema_type}")
            continue
        rule = RULES[new.schema_type]
        if direction & _Direction.BACKWARD:
            out += [f"backward, new reads {name}: {m}" for m in rule(new, old)]
        if direction & _Direction.FORWARD:
            out += [f"forward, {name} reads new: {m}" for m in rule(old, new)]
    return out
