"""Avro schemas: parsing, a canonical form, and the spec's schema-resolution rules.

:func:`parse` validates the text (our own structural checks for clear messages, then
``fastavro.parse_schema`` for defaults and the rest) and normalises it: full names
everywhere, no ``namespace`` keys, ``{"type": "int"}`` written as ``"int"``, keys sorted.
:func:`compatible` tells whether a *reader* schema can read data written with a *writer*
schema, following "Schema Resolution" in the Avro specification.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import fastavro

from broker.registry.schemas.types import (
    MAX_COMPARE_DEPTH,
    InvalidSchemaError,
    ParsedSchema,
    SchemaType,
    canonical_json,
    load_json,
)

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ORDERS = frozenset({"ascending", "descending", "ignore"})
#: The largest ``fixed`` size: Avro's Java parser reads it as an ``int``, as do our codecs.
_MAX_SIZE = 2**31 - 1
_PROMOTIONS: dict[str, frozenset[str]] = {  # writer type -> reader types that can read it
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


class _Normaliser:
    """One pass over an Avro schema's JSON: validates it and writes its normalised form."""

    def __init__(self, known: Mapping[str, Any]) -> None:
        self.known = known
        self.names: dict[str, Any] = {}

    def node(self, node: Any, ns: str, path: str) -> Any:
        if isinstance(node, str):
            return self.ref(node, ns, path)
        if isinstance(node, list):
            return self.union(node, ns, path)
        if not isinstance(node, dict):
            raise InvalidSchemaError(f"{path}: expected a type, got {json.dumps(node)[:80]}")
        kind = node.get("type")
        if isinstance(kind, dict | list):
            return self.node(kind, ns, path)
        if not isinstance(kind, str):
            raise InvalidSchemaError(f"{path}: 'type' must be a string, object or array")
        props = {k: v for k, v in node.items() if k != "type"}
        if kind in PRIMITIVES:
            return {"type": kind, **props} if props else kind
        if kind in _NAMED:
            return self.named(kind, node, ns, path)
        if kind in ("array", "map"):
            key = "items" if kind == "array" else "values"
            if key not in node:
                raise InvalidSchemaError(f"{path}: {kind} has no '{key}'")
            props[key] = self.node(node[key], ns, f"{path}/{key}")
            return {"type": kind, **props}
        return self.ref(kind, ns, path)

    def ref(self, name: str, ns: str, path: str) -> str:
        if name in PRIMITIVES:
            return name
        candidates = [name] if "." in name else ([f"{ns}.{name}"] if ns else []) + [name]
        for full in candidates:
            if full in self.names or full in self.known:
                return full
        raise InvalidSchemaError(f"{path}: unknown type {name!r}")

    def union(self, branches: list[Any], ns: str, path: str) -> list[Any]:
        if not branches:
            raise InvalidSchemaError(f"{path}: a union must have at least one branch")
        out: list[Any] = []
        seen: set[str] = set()
        for i, branch in enumerate(branches):
            if isinstance(branch, list):
                raise InvalidSchemaError(f"{path}/{i}: a union may not directly contain a union")
            normal = self.node(branch, ns, f"{path}/{i}")
            key = _branch_key(normal)
            if key in seen:
                raise InvalidSchemaError(f"{path}: union has more than one {key!r} branch")
            seen.add(key)
            out.append(normal)
        return out

    def named(self, kind: str, node: dict[str, Any], ns: str, path: str) -> dict[str, Any]:
        name = node.get("name")
        if not isinstance(name, str):
            raise InvalidSchemaError(f"{path}: {kind} has no 'name'")
        own_ns = node.get("namespace")
        if own_ns is not None and not isinstance(own_ns, str):
            raise InvalidSchemaError(f"{path}: 'namespace' must be a string")
        full = _full_name(name, ns if own_ns is None else own_ns, path)
        if full in self.names or full in self.known or full in PRIMITIVES:
            raise InvalidSchemaError(f"{path}: type {full!r} is defined more than once")
        inner_ns = full.rpartition(".")[0]
        out: dict[str, Any] = {k: v for k, v in node.items() if k != "namespace"}
        out["name"] = full
        if "." not in full and ns:
            out["namespace"] = ""  # keeps the null namespace when the canonical is re-read
        self.names[full] = out
        if "aliases" in node:
            out["aliases"] = self.aliases(node["aliases"], inner_ns, path)
        if kind in ("record", "error"):
            out["fields"] = self.fields(node.get("fields"), inner_ns, path)
        elif kind == "enum":
            symbols = node.get("symbols")
            if not isinstance(symbols, list) or not all(
                isinstance(s, str) and _NAME.match(s) for s in symbols
            ):
                raise InvalidSchemaError(f"{path}: enum 'symbols' must be a list of names")
            if len(set(symbols)) != len(symbols):
                raise InvalidSchemaError(f"{path}: enum symbols must be unique")
            if "default" in node and node["default"] not in symbols:
                raise InvalidSchemaError(f"{path}: enum default is not one of its symbols")
        else:
            size = node.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_SIZE:
                raise InvalidSchemaError(
                    f"{path}: fixed 'size' must be an integer from 0 to {_MAX_SIZE}"
                )
        return out

    def fields(self, fields: Any, ns: str, path: str) -> list[dict[str, Any]]:
        if not isinstance(fields, list):
            raise InvalidSchemaError(f"{path}: record 'fields' must be a list")
        out: list[dict[str, Any]] = []
        for i, field in enumerate(fields):
            where = f"{path}/fields/{i}"
            if not isinstance(field, dict):
                raise InvalidSchemaError(f"{where}: a field must be an object")
            name = field.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise InvalidSchemaError(f"{where}: field 'name' must be a valid name")
            if any(f["name"] == name for f in out):
                raise InvalidSchemaError(f"{where}: field {name!r} is defined more than once")
            if "type" not in field:
                raise InvalidSchemaError(f"{where}: field {name!r} has no 'type'")
            normal = dict(field)
            normal["type"] = self.node(field["type"], ns, f"{where}/type")
            if normal.get("order", "ascending") not in _ORDERS:
                raise InvalidSchemaError(f"{where}: field 'order' must be one of {sorted(_ORDERS)}")
            if normal.get("order") == "ascending":
                del normal["order"]
            if "aliases" in field:
                aliases = field["aliases"]
                if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                    raise InvalidSchemaError(f"{where}: field 'aliases' must be a list of names")
            out.append(normal)
        return out

    def aliases(self, aliases: Any, ns: str, path: str) -> list[str]:
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise InvalidSchemaError(f"{path}: 'aliases' must be a list of names")
        return [_full_name(a, ns, path) for a in aliases]


def _full_name(name: str, ns: str, path: str) -> str:
    full = name if "." in name else (f"{ns}.{name}" if ns else name)
    if not all(_NAME.match(part) for part in full.split(".")):
        raise InvalidSchemaError(f"{path}: {full!r} is not a valid Avro name")
    return full


def _branch_key(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        kind = str(schema["type"])
        return str(schema["name"]) if kind in _NAMED else kind
    return "union"


def _normalise(
    value: Any, references: Mapping[str, ParsedSchema]
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The normalised schema, the named types of its references, and its own named types."""
    known = _referenced_types(references, {})
    normaliser = _Normaliser(known)
    normal = normaliser.node(value, "", "")
    return normal, known, normaliser.names


_Types = tuple[dict[str, Any], dict[str, Any]]


def _referenced_types(
    references: Mapping[str, ParsedSchema], done: dict[int, tuple[ParsedSchema, _Types]]
) -> dict[str, Any]:
    """The named types that ``references`` define, each after the types it uses. ``done``
    holds each reference's (known, own) types once it is normalised, so a reference reached
    again (references that form a diamond) is not walked again: linear, not exponential."""
    known: dict[str, Any] = {}
    for ref in references.values():
        if (hit := done.get(id(ref))) is None:
            ref_known = _referenced_types(ref.references, done)
            normaliser = _Normaliser(ref_known)
            normaliser.node(json.loads(ref.canonical), "", "")
            hit = done[id(ref)] = (ref, (ref_known, normaliser.names))
        ref_known, ref_own = hit[1]
        known.update(ref_known)
        known.update(ref_own)
    return known


def _field_choices(schema: Any, names: Mapping[str, Any]) -> frozenset[str] | None:
    """The records one of which a field of type ``schema`` must hold, or ``None`` when it can
    hold a value without any record (a primitive, an enum, a fixed, an array, a map)."""
    if isinstance(schema, str):
        schema = names.get(schema, schema)
    if isinstance(schema, dict) and schema["type"] in ("record", "error"):
        return frozenset({schema["name"]})
    if isinstance(schema, list):
        choices = [_field_choices(branch, names) for branch in schema]
        if any(c is None for c in choices):
            return None
        return frozenset().union(*(c for c in choices if c is not None))
    return None


def _check_finite(names: Mapping[str, Any], own: Mapping[str, Any]) -> None:
    """Refuse a record of ``own`` that has no finite value: one that holds itself through
    fields with no union, array or map on the way that could end it (``R {next: R}``).
    The records with a value are found as a grammar's productive symbols are: a record has
    one once each of its fields can hold a record that has one (linear in the fields)."""
    waiting: dict[str, int] = {}  # record -> its fields that cannot hold a value yet
    needed_by: dict[str, list[tuple[str, int]]] = {}  # record -> (record, field) it can end
    ready: list[str] = []
    for name, definition in names.items():
        if definition["type"] not in ("record", "error"):
            continue
        open_fields = 0
        for i, field in enumerate(definition["fields"]):
            choices = _field_choices(field["type"], names)
            if choices is None:
                continue
            open_fields += 1
            for choice in choices:
                needed_by.setdefault(choice, []).append((name, i))
        waiting[name] = open_fields
        if not open_fields:
            ready.append(name)
    ended: set[tuple[str, int]] = set()
    while ready:
        for record, i in needed_by.get(ready.pop(), ()):
            if (record, i) not in ended:
                ended.add((record, i))
                waiting[record] -= 1
                if not waiting[record]:
                    ready.append(record)
    for name in own:
        if waiting.get(name):
            raise InvalidSchemaError(
                f"record {name!r} has no finite value: its fields hold records without end "
                "(no union branch, array or map ends them)"
            )


def parse(text: str, references: Mapping[str, ParsedSchema]) -> ParsedSchema:
    """Validate Avro schema text against the named types of ``references``."""
    normal, known, own = _normalise(load_json(text), references)
    _check_finite({**known, **own}, own)
    try:
        named: dict[str, Any] = {}
        for definition in known.values():
            fastavro.parse_schema(json.loads(canonical_json(definition)), named_schemas=named)
        parsed = fastavro.parse_schema(json.loads(canonical_json(normal)), named_schemas=named)
        if isinstance(parsed, str) and parsed in named:
            parsed = fastavro.parse_schema(named[parsed], named_schemas=dict(named))
    except Exception as e:
        raise InvalidSchemaError(f"invalid Avro schema: {e}") from None
    return ParsedSchema(
        schema_type=SchemaType.AVRO,
        text=text,
        canonical=canonical_json(normal),
        parsed=parsed,
        references=dict(references),
    )


def standalone(schema: ParsedSchema) -> Any:
    """``schema``'s normalised JSON with each named type of its references defined where it
    is first used (the Avro spec allows a definition at any use): what a reader without the
    registry parses, such as :class:`~broker.codecs.AvroCodec`. Each definition is written
    once, so it is no larger than the schema and its references together."""
    normal, known, _ = _normalise(json.loads(schema.canonical), schema.references)
    defined: set[str] = set()

    def inline(node: Any) -> Any:
        if isinstance(node, str):
            if node in known and node not in defined:
                return inline(known[node])
            return node
        if isinstance(node, list):
            return [inline(branch) for branch in node]
        kind = node["type"]
        if kind in _NAMED:
            if node["name"] in defined:  # a reference's nested type, used before it
                return node["name"]
            defined.add(node["name"])
            out = dict(node)
            if "." not in out["name"]:
                out["namespace"] = ""  # stays in the null namespace wherever it is written
            if kind in ("record", "error"):
                out["fields"] = [{**f, "type": inline(f["type"])} for f in node["fields"]]
            return out
        if kind in ("array", "map"):
            key = "items" if kind == "array" else "values"
            return {**node, key: inline(node[key])}
        return node

    return inline(normal) if known else normal


class _Resolver:
    """Compares one reader schema with one writer schema; remembers named-type pairs."""

    def __init__(self, reader_names: Mapping[str, Any], writer_names: Mapping[str, Any]) -> None:
        self.reader_names = reader_names
        self.writer_names = writer_names
        self.done: dict[tuple[str, str], list[str]] = {}

    def compare(self, reader: Any, writer: Any, path: str, depth: int) -> list[str]:
        if depth > MAX_COMPARE_DEPTH:
            return [f"{path or '/'}: schema nests too deeply to check"]
        reader = self.reader_names.get(reader, reader) if isinstance(reader, str) else reader
        writer = self.writer_names.get(writer, writer) if isinstance(writer, str) else writer
        if isinstance(writer, list):
            out: list[str] = []
            for i, branch in enumerate(writer):
                out += self.compare(reader, branch, f"{path}/{i}", depth + 1)
            return out
        if isinstance(reader, list):
            for branch in reader:
                if not self.compare(branch, writer, path, depth + 1):
                    return []
            return [f"{path or '/'}: no branch of the reader union can read {_describe(writer)}"]
        r_kind, w_kind = _kind(reader), _kind(writer)
        if (r_kind in _NAMED and r_kind == w_kind) or {r_kind, w_kind} == {"record", "error"}:
            return self.named(reader, writer, path, depth)
        if r_kind == w_kind == "array":
            return self.compare(reader["items"], writer["items"], f"{path}/items", depth + 1)
        if r_kind == w_kind == "map":
            return self.compare(reader["values"], writer["values"], f"{path}/values", depth + 1)
        if r_kind == w_kind or r_kind in _PROMOTIONS.get(w_kind, frozenset()):
            return []
        return [f"{path or '/'}: reader type {_describe(reader)} cannot read {_describe(writer)}"]

    def named(self, reader: Any, writer: Any, path: str, depth: int) -> list[str]:
        key = (reader["name"], writer["name"])
        if key in self.done:
            return self.done[key]
        where = path or "/"
        if not _names_match(reader, writer):
            return [f"{where}: reader {reader['name']!r} does not match writer {writer['name']!r}"]
        self.done[key] = []  # assume compatible while inside (recursive types)
        out: list[str] = []
        if _kind(reader) == "fixed" and reader["size"] != writer["size"]:
            out.append(f"{where}: fixed size changed from {writer['size']} to {reader['size']}")
        elif _kind(reader) == "enum":
            missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
            if missing and "default" not in reader:
                out.append(f"{where}: reader enum {reader['name']!r} lacks symbols {missing}")
        elif _kind(reader) != "fixed":
            out += self.fields(reader, writer, path, depth)
        self.done[key] = out
        return out

    def fields(self, reader: Any, writer: Any, path: str, depth: int) -> list[str]:
        by_name = {f["name"]: f for f in writer["fields"]}
        out: list[str] = []
        for field in reader["fields"]:
            names = [field["name"], *field.get("aliases", [])]
            match = next((by_name[n] for n in names if n in by_name), None)
            where = f"{path}/fields/{field['name']}"
            if match is not None:
                out += self.compare(field["type"], match["type"], where, depth + 1)
            elif "default" not in field:
                out.append(f"{where}: reader field is missing in the writer and has no default")
        return out


def _kind(schema: Any) -> str:
    return schema if isinstance(schema, str) else str(schema["type"])


def _describe(schema: Any) -> str:
    if isinstance(schema, dict) and "name" in schema:
        return f"{schema['type']} {schema['name']!r}"
    return repr(_kind(schema)) if not isinstance(schema, list) else "union"


def _names_match(reader: Mapping[str, Any], writer: Mapping[str, Any]) -> bool:
    short = str(reader["name"]).rpartition(".")[2] == str(writer["name"]).rpartition(".")[2]
    return short or writer["name"] in reader.get("aliases", [])


def compatible(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    """Why ``reader`` cannot read data written with ``writer`` (empty: it can)."""
    r_schema, r_known, r_own = _normalise(json.loads(reader.canonical), reader.references)
    w_schema, w_known, w_own = _normalise(json.loads(writer.canonical), writer.references)
    resolver = _Resolver({**r_known, **r_own}, {**w_known, **w_own})
    return resolver.compare(r_schema, w_schema, "", 0)
