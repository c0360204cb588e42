"""JSON Schema: validation against the meta-schema, and a conservative subset check.

:func:`parse` accepts any draft ``jsonschema`` knows (draft 7 when ``$schema`` is absent)
and checks that every ``$ref`` resolves, locally or to a reference. :func:`compatible`
asks whether every document the *writer* schema accepts is accepted by the *reader*;
where a keyword's effect cannot be proved it reports it rather than guess. It does at most
:data:`MAX_COMPARE_STEPS` comparisons and :data:`MAX_PATTERN_SECONDS` of pattern matching,
and raises :class:`SchemaTooComplexError` past either.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any
from urllib.parse import unquote, urljoin

import jsonschema
import jsonschema.validators
import regex

from broker.registry.schemas.types import (
    MAX_COMPARE_DEPTH,
    InvalidSchemaError,
    ParsedSchema,
    SchemaTooComplexError,
    SchemaType,
    canonical_json,
    load_json,
)

ALL_TYPES = frozenset({"null", "boolean", "object", "array", "number", "string", "integer"})
_ANNOTATIONS = frozenset({
    "$schema", "$id", "id", "$comment", "title", "description", "default", "examples",
    "readOnly", "writeOnly", "deprecated", "definitions", "$defs", "$anchor",
    "$dynamicAnchor", "$recursiveAnchor", "$vocabulary", "contentMediaType",
    "contentEncoding", "contentSchema",
})  # fmt: skip
_HANDLED = frozenset({
    "type", "enum", "const", "allOf", "anyOf", "oneOf", "$ref", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
    "minItems", "maxItems", "uniqueItems", "items", "prefixItems", "additionalItems",
    "required", "minProperties", "maxProperties", "properties", "additionalProperties",
    "patternProperties",
})  # fmt: skip
_REF_REPLACES_SCHEMA = frozenset({
    jsonschema.Draft3Validator, jsonschema.Draft4Validator, jsonschema.Draft6Validator,
    jsonschema.Draft7Validator,
})  # fmt: skip
"""Drafts in which a ``$ref`` stands for the whole schema it is in: its siblings are ignored
(draft 2019-09 made ``$ref`` a keyword like the others, applied beside them)."""

MAX_PATTERN_SECONDS = 0.5
"""The time one :func:`compatible` call may spend matching ``patternProperties`` against
property names, and ``pattern``s against a writer's enum values, in all. Ordinary patterns
take microseconds; one that backtracks catastrophically is refused
(:class:`SchemaTooComplexError`) instead of holding the worker."""

MAX_COMPARE_STEPS = 100_000
"""The work one :func:`compatible` call may do, in steps: a pair of sub-schemas compared, or an
item a comparison goes through one by one (an enum value, a message passed up, ...).

Unions multiply: every branch of a writer ``anyOf`` is tried against every branch of a
reader ``anyOf``, again under each property the two share, so a schema of a few kilobytes
can ask for billions of comparisons, and hold the worker as long. Ordinary schemas take tens
to hundreds of steps, and 150 object types referring to each other (110 KB) about 21,000; a
step takes 10 to 15 microseconds, so a check is refused after one to two seconds of CPU.
"""


def parse(text: str, references: Mapping[str, ParsedSchema]) -> ParsedSchema:
    """Validate JSON Schema text against its meta-schema and resolve its ``$ref``s."""
    schema = load_json(text)
    if not isinstance(schema, dict | bool):
        raise InvalidSchemaError("a JSON Schema must be an object or a boolean")
    try:
        validator = _validator_class(schema)
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise InvalidSchemaError(f"invalid JSON Schema at /{where}: {e.message}") from None
    except InvalidSchemaError:
        raise
    except Exception as e:
        raise InvalidSchemaError(f"invalid JSON Schema: {e}") from None
    doc = _Doc.of(schema, references)
    for ref in _refs(schema):
        if doc.resolve(ref) is None:
            raise InvalidSchemaError(f"$ref {ref!r} does not resolve")
    return ParsedSchema(
        schema_type=SchemaType.JSON,
        text=text,
        canonical=canonical_json(schema),
        parsed=schema,
        references=dict(references),
    )


def _validator_class(schema: Any) -> Any:
    if isinstance(schema, dict) and "$schema" in schema:
        if not isinstance(schema["$schema"], str):
            raise InvalidSchemaError("'$schema' must be a string")
        found = jsonschema.validators.validator_for(schema, default=None)
        if found is None:
            raise InvalidSchemaError(f"unknown $schema {schema['$schema']!r}")
        return found
    return jsonschema.Draft7Validator


def _refs(node: Any) -> Iterator[str]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                yield item["$ref"]
            stack.extend(v for k, v in item.items() if k not in ("enum", "const"))
        elif isinstance(item, list):
            stack.extend(item)


@dataclass(frozen=True)
class _Doc:
    """A schema document and its references: where ``$ref``s are looked up. Build one with
    :meth:`of`."""

    root: Any
    #: Each reference as a document, built once: a ``$ref`` to it costs no canonical form.
    docs: Mapping[str, _Doc] = field(repr=False, compare=False)
    #: A digest of the document and its references: equal keys, the same document.
    key: str
    #: Whether the keywords beside a ``$ref`` apply too (draft 2019-09 on) or are ignored.
    ref_siblings: bool

    @classmethod
    def of(
        cls, root: Any, references: Mapping[str, ParsedSchema], built: dict[int, _Doc] | None = None
    ) -> _Doc:
        """The document ``root`` with its references; ``built`` holds the documents made so
        far by id of their parsed schema, so a reference reached again (a diamond) is one
        document, made once."""
        built = {} if built is None else built
        docs: dict[str, _Doc] = {}
        for name, ref in references.items():
            if (doc := built.get(id(ref))) is None:
                doc = built[id(ref)] = cls.of(ref.parsed, ref.references, built)
            docs[name] = doc
        refs = sorted((name, doc.key) for name, doc in docs.items())
        key = hashlib.sha256(canonical_json([root, refs]).encode("utf-8", "surrogatepass"))
        siblings = _validator_class(root) not in _REF_REPLACES_SCHEMA
        return cls(root, docs, key.hexdigest(), siblings)

    def resolve(self, ref: str) -> tuple[Any, _Doc] | None:
        base, _, fragment = ref.partition("#")
        doc: _Doc = self
        if base:
            own_id = self.root.get("$id", "") if isinstance(self.root, dict) else ""
            target = self.docs.get(base) or self.docs.get(urljoin(own_id, base))
            if target is not None:
                doc = target
            elif base not in (own_id, urljoin(own_id, base)) or not own_id:
                return None
        node = doc.root
        if fragment and not fragment.startswith("/"):
            return _anchor(doc.root, fragment, doc)
        for raw in fragment.split("/")[1:]:
            token = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif (
                isinstance(node, list)
                and token.isascii()
                and token.isdigit()
                and int(token) < len(node)
            ):
                node = node[int(token)]
            else:
                return None
        return (node, doc) if isinstance(node, dict | bool) else None


def _keys(node: Any) -> Iterator[str]:
    """Every object key in a JSON value, at any depth."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield from item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _anchor(root: Any, name: str, doc: _Doc) -> tuple[Any, _Doc] | None:
    stack = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("$anchor") == name or item.get("$id") == f"#{name}":
                return item, doc
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _without(schema: dict[str, Any], keyword: str) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k != keyword}


def _branch(w: dict[str, Any], union: str, branch: Any) -> Any:
    """One branch of the writer's ``union`` with the union's sibling keywords."""
    rest = _without(w, union)
    if not isinstance(branch, dict):
        return rest if branch else False
    return _merge(rest, branch) if rest else branch


def _shape(value: Any) -> object:
    """``value`` for :meth:`_Checker._intern`: a scalar, or a list of them, by value (equal
    ones parsed twice are different objects); any other node by identity."""
    if value is None or isinstance(value, str | int | float):
        return (type(value).__name__, value)
    if isinstance(value, list) and all(
        v is None or isinstance(v, str | int | float) for v in value
    ):
        return ("scalars", *(_shape(v) for v in value))
    return id(value)


_UNIONED = frozenset({"required", "properties", "patternProperties"})
"""Keywords :func:`_merge` takes from both schemas: every name either one lists."""

_DEPENDS: dict[str, str] = {
    "additionalItems": "items",
    "items": "prefixItems",
    "then": "if",
    "else": "if",
    "minContains": "contains",
    "maxContains": "contains",
    "exclusiveMinimum": "minimum",
    "exclusiveMaximum": "maximum",
}
"""Keywords whose effect depends on a sibling of the same schema (``additionalItems`` acts
only beside a list of ``items``; a draft-4 boolean ``exclusiveMaximum`` only beside
``maximum``)."""


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A schema accepting at least what both accept: every keyword of ``a``, those of ``b``
    that ``a`` lacks, and the names both list in ``required``, ``properties`` and
    ``patternProperties``. A keyword of ``a`` or ``b`` whose effect depends on a sibling
    (:data:`_DEPENDS`) is left out when that sibling is not its own schema's, and an
    ``unevaluated*`` keyword when any other of its schema's is: away from its siblings it
    could refuse values that both schemas accept."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = sorted({*out[key], *value})
        elif key in _UNIONED and isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = {**value, **out[key]}

    def foreign(key: str, source: dict[str, Any]) -> bool:
        sibling = _DEPENDS.get(key)
        if sibling is None or (key.startswith("exclusive") and not isinstance(out[key], bool)):
            return False
        return out.get(sibling) is not source.get(sibling)

    changed = True
    while changed:  # one dropped keyword can leave another without its sibling
        changed = False
        for key in list(out):
            if foreign(key, a if key in a else b):
                del out[key]
                changed = True
    for key in ("unevaluatedProperties", "unevaluatedItems"):
        source = a if key in a else b
        if key in out and any(out.get(k) is not v for k, v in source.items() if k not in _UNIONED):
            del out[key]
    return out


def _types(schema: dict[str, Any]) -> frozenset[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    return frozenset([kind] if isinstance(kind, str) else kind)


def _lower(schema: dict[str, Any]) -> tuple[Fraction, bool] | None:
    return _bound(schema, "minimum", "exclusiveMinimum", max)


def _upper(schema: dict[str, Any]) -> tuple[Fraction, bool] | None:
    return _bound(schema, "maximum", "exclusiveMaximum", min)


def _bound(
    schema: dict[str, Any], inclusive: str, exclusive: str, pick: Callable[..., Fraction]
) -> tuple[Fraction, bool] | None:
    found: list[tuple[Fraction, bool]] = []
    if isinstance(schema.get(inclusive), int | float):
        found.append((Fraction(str(schema[inclusive])), schema.get(exclusive) is True))
    if isinstance(schema.get(exclusive), int | float) and not isinstance(schema[exclusive], bool):
        found.append((Fraction(str(schema[exclusive])), True))
    if not found:
        return None
    best = pick(v for v, _ in found)
    return best, any(e for v, e in found if v == best)


def _array_shape(schema: dict[str, Any]) -> tuple[list[Any], Any]:
    if "prefixItems" in schema:
        return list(schema["prefixItems"]), schema.get("items", True)
    if isinstance(schema.get("items"), list):
        return list(schema["items"]), schema.get("additionalItems", True)
    return [], schema.get("items", True)


def _property(schema: dict[str, Any], name: str, search: Callable[[str, str], bool]) -> Any:
    if name in schema.get("properties", {}):
        return schema["properties"][name]
    matches = [s for p, s in schema.get("patternProperties", {}).items() if search(p, name)]
    if matches:
        return matches[0] if len(matches) == 1 else {"allOf": matches}
    return schema.get("additionalProperties", True)


class _Checker:
    """Proves ``reader ⊇ writer`` keyword by keyword; reports what it cannot prove.

    Each (reader, writer) pair is compared once (``seen``, by identity). A pair met again
    while it is being compared holds if a value's items or properties lie between (a
    recursive ``$ref``; values are finite) and is reported otherwise. The schemas the walk
    builds (a writer union branch with the union's siblings, a merged ``allOf``, a ``$ref``
    with siblings) are built once and interned, so a sub-problem reached again by another
    way is the same pair. All of it counts against :data:`MAX_COMPARE_STEPS`.
    """

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], list[str]] = {}
        self.derived: dict[tuple[object, ...], tuple[object, Any]] = {}
        self.keep: list[Any] = []  # keeps compared nodes alive so their ids stay unique
        self.open: dict[tuple[int, int], int] = {}  # pairs being compared: their nesting
        self.nesting = 0  # how many items or properties down the walk is
        self.depth = 0
        self.steps = 0
        self.budget = MAX_COMPARE_STEPS
        self.pattern_seconds = MAX_PATTERN_SECONDS  # matching time left
        self.matching_at = ""  # where the writer's enum values are being matched

    def spend(self, steps: int, path: str) -> None:
        """Count ``steps`` against the budget; :class:`SchemaTooComplexError` past it. A step
        is a pair of sub-schemas compared, or one item a comparison goes through one by one:
        a message passed up, an enum value, a required name, a pattern, an unknown keyword."""
        self.steps += steps
        if self.steps > self.budget:
            raise SchemaTooComplexError(
                "schema is too complex to check for compatibility: the check takes more than "
                f"{self.budget} steps (stopped at {path or '/'})"
            )

    def search(
        self, pattern: str, name: str, path: str, *, keyword: str = "patternProperties"
    ) -> bool:
        """Whether ``pattern`` matches ``name`` (a property name, or a string among a writer's
        enum values), within the matching time left:
        a pattern can backtrack for hours on a name of forty characters (``^(a|aa)+$``), and
        Python's ``re`` cannot be stopped, so the ``regex`` module (the same syntax) runs it."""
        started = time.perf_counter()
        try:
            return regex.search(pattern, name, timeout=self.pattern_seconds) is not None
        except (TimeoutError, regex.error):
            raise SchemaTooComplexError(
                f"schema is too complex to check for compatibility: matching its {keyword} "
                f"{pattern[:100]!r} against {name[:100]!r} "
                f"takes more than {MAX_PATTERN_SECONDS} s in all (stopped at {path or '/'})"
            ) from None
        finally:
            self.pattern_seconds = max(0.0, self.pattern_seconds - time.perf_counter() + started)

    def compare(
        self, r: Any, rdoc: _Doc, w: Any, wdoc: _Doc, path: str, *, nested: bool = False
    ) -> list[str]:
        """Why ``r`` rejects values ``w`` accepts; ``nested`` for the schemas of a value's
        items or properties. A pair met again inside itself holds if it is met a value deeper
        (values are finite), and is reported if met at the same value: a schema that is a
        branch of its own ``anyOf`` proves nothing."""
        self.spend(1, path)
        self.nesting += nested
        key = (id(r), id(w))
        if self.depth > MAX_COMPARE_DEPTH:
            result = [f"{path or '/'}: schema nests too deeply to check"]
        elif self.open.get(key) == self.nesting:
            result = [f"{path or '/'}: schema refers to itself without nesting; cannot check"]
        elif key not in self.seen:
            self.keep.append((r, w))
            self.seen[key] = []  # assumed while inside, where a value nests (recursive $refs)
            self.open[key] = self.nesting
            self.depth += 1
            try:
                self.seen[key] = list(dict.fromkeys(self._compare(r, rdoc, w, wdoc, path)))
            finally:
                self.depth -= 1
                del self.open[key]
            result = self.seen[key]
        else:
            result = self.seen[key]
        self.nesting -= nested
        self.spend(len(result), path)  # each message is copied into the caller's list
        return result

    def _derive(self, key: tuple[object, ...], source: object, make: Callable[[], Any]) -> Any:
        """``make()``, built once per ``key`` (the ids of the nodes it is built from);
        ``source`` is kept alive so that those ids are not reused."""
        if key not in self.derived:
            self.derived[key] = (source, make())
        return self.derived[key][1]

    def _intern(self, schema: Any) -> Any:
        """One object for a derived schema and every schema like it (the same keywords, with
        the same scalar values or the same nodes): deriving again from a derived schema, as
        a union branch that refers back to its union does, meets a schema already compared."""
        if not isinstance(schema, dict):
            return schema
        key = ("schema", *sorted((k, _shape(v)) for k, v in schema.items()))
        return self._derive(key, schema, lambda: schema)

    def _deref(self, node: Any, doc: _Doc) -> tuple[Any, _Doc]:
        """:func:`_deref`, once per node, and once per reference and siblings in a document."""
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
            return node, doc
        found: tuple[Any, _Doc] = self._derive(
            ("$ref", id(node)), node, partial(self._resolve, node, doc)
        )
        return found

    def _resolve(self, node: dict[str, Any], doc: _Doc) -> tuple[Any, _Doc]:
        siblings = sorted((k, _shape(v)) for k, v in node.items() if k not in _ANNOTATIONS)
        key = ("resolved", id(doc.root), *siblings)
        found: tuple[Any, _Doc] = self._derive(key, (node, doc.root), partial(_deref, node, doc))
        return found

    def _json(self, value: Any) -> str:
        """:func:`canonical_json`, once per node: the reader's keywords are compared with each
        writer schema it meets, and a large one would be serialized again each time."""
        found: str = self._derive(("json", id(value)), value, partial(canonical_json, value))
        return found

    def _same(self, rdoc: _Doc, wdoc: _Doc) -> bool:
        """Whether the two documents are one; their keys are whole documents, compared once."""
        same: bool = self._derive(
            ("same", id(rdoc), id(wdoc)), (rdoc, wdoc), lambda: rdoc.key == wdoc.key
        )
        return same

    def _has_ref(self, schema: Any) -> bool:
        found: bool = self._derive(
            ("has $ref", id(schema)), schema, lambda: next(_refs(schema), None) is not None
        )
        return found

    def _property(self, schema: dict[str, Any], name: str, path: str) -> Any:
        def find() -> Any:
            self.spend(len(schema.get("patternProperties", {})), path)
            return _property(schema, name, partial(self.search, path=path))

        return self._derive(("property", id(schema), name), schema, find)

    def _compare(self, r: Any, rdoc: _Doc, w: Any, wdoc: _Doc, path: str) -> list[str]:
        where = path or "/"
        r, rdoc = self._deref(r, rdoc)
        w, wdoc = self._deref(w, wdoc)
        if r is True or r == {} or w is False:
            return []
        if r is False:
            return [f"{where}: the reader accepts no value here but the writer does"]
        w = {} if w is True else w
        if r == w and self._same(rdoc, wdoc):
            return []
        for union in ("anyOf", "oneOf"):
            if isinstance(w.get(union), list):
                out: list[str] = []
                tried: set[int] = set()
                for i, branch in enumerate(w[union]):
                    b, bdoc = self._deref(branch, wdoc)
                    if id(b) in tried:  # the same schema again: same answer, said once
                        continue
                    tried.add(id(b))
                    make = partial(self._intern_branch, w, union, b)
                    wb = self._derive(("branch", union, id(w), id(b)), (w, b), make)
                    out += self.compare(r, rdoc, wb, bdoc, f"{path}/{union}/{i}")
                return out
        if isinstance(w.get("allOf"), list):
            merged = self._derive(("merged", id(w)), w, partial(self._all_of, w, wdoc))
            return [] if merged is False else self.compare(r, rdoc, merged, wdoc, path)
        return self._reader(r, rdoc, w, wdoc, path)

    def _intern_branch(self, w: dict[str, Any], union: str, branch: Any) -> Any:
        return self._intern(_branch(w, union, branch))

    def _all_of(self, w: dict[str, Any], wdoc: _Doc) -> Any:
        """The writer's ``allOf`` merged into one schema; ``False`` when a branch is."""
        merged = _without(w, "allOf")
        for branch in w["allOf"]:
            b, _ = self._deref(branch, wdoc)
            if b is False:
                return False
            merged = _merge(merged, b) if isinstance(b, dict) else merged
        return self._intern(merged)

    def _reader(self, r: Any, rdoc: _Doc, w: Any, wdoc: _Doc, path: str) -> list[str]:
        where = path or "/"
        if isinstance(r.get("allOf"), list):
            rest = self._derive(("rest", "allOf", id(r)), r, partial(_without, r, "allOf"))
            out = self.compare(rest, rdoc, w, wdoc, path)
            for i, branch in enumerate(r["allOf"]):
                out += self.compare(branch, rdoc, w, wdoc, f"{path}/allOf/{i}")
            return out
        for union in ("anyOf", "oneOf"):
            if isinstance(r.get(union), list):
                rest = self._derive(("rest", union, id(r)), r, partial(_without, r, union))
                out = self.compare(rest, rdoc, w, wdoc, path)
                fits = [b for b in r[union] if not self.compare(b, rdoc, w, wdoc, path)]
                if not fits:
                    out.append(f"{where}: no {union} branch of the reader accepts the writer")
                elif union == "oneOf" and not _exclusive(r[union], fits[0], w, rdoc):
                    out.append(f"{where}: cannot prove that one oneOf branch alone accepts it")
                return out
        if "enum" in w or "const" in w:
            return self._values(r, rdoc, w, where)
        return self._keywords(r, rdoc, w, wdoc, path)

    def _values(self, r: Any, rdoc: _Doc, w: Any, where: str) -> list[str]:
        values = w["enum"] if "enum" in w else [w["const"]]
        if not isinstance(values, list):
            return [f"{where}: writer enum is not a list"]
        if self._has_ref(r):
            return [f"{where}: cannot check writer enum values against a reader with $ref"]
        if self._has_unevaluated(r):
            return [f"{where}: cannot check writer enum values against a reader with unevaluated*"]
        self.spend(len(values), where)
        self.matching_at = where
        validator = self._validator(_validator_class(rdoc.root))(r)
        try:
            bad = [v for v in values if not validator.is_valid(v)]
        except SchemaTooComplexError:
            raise
        except Exception:  # jsonschema's own slips (draft 7 ``items: true``, ``additionalItems``)
            return [f"{where}: cannot check writer enum values against the reader"]
        return [f"{where}: the reader rejects writer value(s) {bad}"] if bad else []

    def _has_unevaluated(self, schema: Any) -> bool:
        def find() -> bool:
            return any(k in ("unevaluatedProperties", "unevaluatedItems") for k in _keys(schema))

        found: bool = self._derive(("has unevaluated", id(schema)), schema, find)
        return found

    def _validator(self, cls: Any) -> Any:
        """``cls`` with its regular-expression keywords matched by :meth:`search`, within the
        matching time left: ``jsonschema`` matches them with ``re``, which a pattern such as
        ``^(a|aa)+$`` holds for hours on a writer's enum value of fifty characters. Made
        once per class (it takes most of a millisecond)."""
        found: Any = self._derive(("validator", id(cls)), cls, partial(self._bounded, cls))
        return found

    def _bounded(self, cls: Any) -> Any:
        def search(regex: str, name: str, keyword: str = "patternProperties") -> bool:
            return self.search(regex, name, self.matching_at, keyword=keyword)

        def pattern(validator: Any, regex: str, instance: Any, schema: Any) -> Iterator[Any]:
            if validator.is_type(instance, "string") and not search(regex, instance, "pattern"):
                yield jsonschema.ValidationError(f"{instance!r} does not match {regex!r}")

        def pattern_properties(
            validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
        ) -> Iterator[Any]:
            if validator.is_type(instance, "object"):
                for regex, sub in patterns.items():
                    for name, value in instance.items():
                        if search(regex, name):
                            yield from validator.descend(value, sub, path=name, schema_path=regex)

        def additional_properties(
            validator: Any, extra: Any, instance: Any, schema: Any
        ) -> Iterator[Any]:
            if not validator.is_type(instance, "object"):
                return
            known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
            names = [n for n in instance if n not in known and not any(
                search(regex, n) for regex in patterns
            )]  # fmt: skip
            if validator.is_type(extra, "object"):
                for name in names:
                    yield from validator.descend(instance[name], extra, path=name)
            elif extra is False and names:
                yield jsonschema.ValidationError(f"additional properties {sorted(names)}")

        keywords = {
            "pattern": pattern,
            "patternProperties": pattern_properties,
            "additionalProperties": additional_properties,
        }
        return jsonschema.validators.extend(cls, keywords)

    def _keywords(self, r: Any, rdoc: _Doc, w: Any, wdoc: _Doc, path: str) -> list[str]:
        where = path or "/"
        out: list[str] = []
        r_types, w_types = _types(r), _types(w)
        if r_types is not None:
            if w_types is None:
                out.append(f"{where}: the reader only accepts type {sorted(r_types)}")
            else:
                for t in sorted(w_types - r_types):
                    if not (t == "integer" and "number" in r_types):
                        out.append(f"{where}: the reader does not accept type {t!r}")
        may = ALL_TYPES if w_types is None else w_types
        for keyword in ("enum", "const"):
            if keyword in r:
                out.append(f"{where}: the reader restricts values with {keyword!r}")
        if may & {"number", "integer"}:
            out += _numbers(r, w, where, may)
        if "string" in may:
            out += _range(r, w, "minLength", "maxLength", where)
            out += [
                f"{where}: the reader's {k!r} differs from the writer's"
                for k in ("pattern", "format")
                if k in r and r[k] != w.get(k)
            ]
        if "array" in may:
            out += self._array(r, rdoc, w, wdoc, path)
        if "object" in may:
            out += self._object(r, rdoc, w, wdoc, path)
        unknown = sorted(set(r) - _HANDLED - _ANNOTATIONS - {"pattern", "format"})
        self.spend(len(unknown), path)
        for keyword in unknown:
            if self._json(r[keyword]) != self._json(w.get(keyword)):
                out.append(f"{where}: cannot prove the reader's {keyword!r} accepts the writer")
        return out

    def _array(self, r: Any, rdoc: _Doc, w: Any, wdoc: _Doc, path: str) -> list[str]:
        where = path or "/"
        out = _range(r, w, "minItems", "maxItems", where)
        if r.get("uniqueItems") is True and w.get("uniqueItems") is not True:
            out.append(f"{where}: the reader requires unique items, the writer does not")
        r_prefix, r_rest = _array_shape(r)
        w_prefix, w_rest = _array_shape(w)
        for i in range(max(len(r_prefix), len(w_prefix))):
            rs = r_prefix[i] if i < len(r_prefix) else r_rest
            ws = w_prefix[i] if i < len(w_prefix) else w_rest
            out += self.compare(rs, rdoc, ws, wdoc, f"{path}/items/{i}", nested=True)
        out += self.compare(r_rest, rdoc, w_rest, wdoc, f"{path}/items", nested=True)
        return out

    def _object(self, r: Any, rdoc: _Doc, w: Any, wdoc: _Doc, path: str) -> list[str]:
        where = path or "/"
        out = _range(r, w, "minProperties", "maxProperties", where)
        r_required, w_required = r.get("required", []), w.get("required", [])
        r_patterns, w_patterns = r.get("patternProperties", {}), w.get("patternProperties", {})
        self.spend(len(r_required) + len(w_required) + len(r_patterns), path)
        for name in sorted(set(r_required) - set(w_required)):
            out.append(f"{where}: property {name!r} is required by the reader, not the writer")
        names = sorted({*r.get("properties", {}), *w.get("properties", {})})
        for name in names:
            sub = f"{path}/properties/{name}"
            rs, ws = self._property(r, name, sub), self._property(w, name, sub)
            found = self.compare(rs, rdoc, ws, wdoc, sub, nested=True)
            if found and name not in w.get("properties", {}):
                found = [f"{sub}: property added to the reader, but the writer's open "
                         "content model allows other values for it"]  # fmt: skip
            elif found and name not in r.get("properties", {}):
                found = [f"{sub}: property removed, and the reader's content model rejects it"]
            out += found
        if any(self._json(s) != self._json(w_patterns.get(p)) for p, s in r_patterns.items()):
            out.append(f"{where}: cannot prove the reader's patternProperties accept the writer")
        r_extra = r.get("additionalProperties", True)
        for pattern, schema in w_patterns.items():
            if pattern not in r_patterns:
                sub = f"{path}/patternProperties/{pattern}"
                out += self.compare(r_extra, rdoc, schema, wdoc, sub, nested=True)
        w_extra = w.get("additionalProperties", True)
        sub = f"{path}/additionalProperties"
        found = self.compare(r_extra, rdoc, w_extra, wdoc, sub, nested=True)
        if found and w_extra is True:
            found = [f"{sub}: the reader's content model is closed, the writer's is open"]
        return out + found


def _deref(node: Any, doc: _Doc) -> tuple[Any, _Doc]:
    """Follow ``$ref`` until a plain schema. Its siblings are kept as an ``allOf`` from
    draft 2019-09 on; before it (draft 7 is the default) validators ignore them, and so
    does this."""
    for _ in range(MAX_COMPARE_DEPTH):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
            return node, doc
        target = doc.resolve(node["$ref"])
        if target is None:
            return False, doc
        rest = {k: v for k, v in node.items() if k != "$ref" and k not in _ANNOTATIONS}
        if rest and doc.ref_siblings:
            return {"allOf": [target[0], rest]}, target[1]
        node, doc = target
    return False, doc


def _exclusive(branches: list[Any], fit: Any, w: dict[str, Any], doc: _Doc) -> bool:
    """Whether every oneOf branch but ``fit`` is disjoint from ``w`` by type alone."""
    w_types = _types(w)
    if w_types is None:
        return False
    wide = w_types | ({"integer"} if "number" in w_types else set())
    for branch in branches:
        b, _ = _deref(branch, doc)
        if b is fit or b is False:
            continue
        b_types = _types(b) if isinstance(b, dict) else None
        if b_types is None:
            return False
        if b_types & wide or ("number" in b_types and "integer" in w_types):
            return False
    return True


def _range(r: dict[str, Any], w: dict[str, Any], low: str, high: str, where: str) -> list[str]:
    out: list[str] = []
    if low in r and r[low] > w.get(low, 0):
        out.append(f"{where}: the reader's {low} {r[low]} is above the writer's {w.get(low, 0)}")
    if high in r and (high not in w or r[high] < w[high]):
        out.append(f"{where}: the reader's {high} {r[high]} is below the writer's {w.get(high)}")
    return out


def _numbers(r: dict[str, Any], w: dict[str, Any], where: str, may: frozenset[str]) -> list[str]:
    out: list[str] = []
    for name, bound, tighter in (("minimum", _lower, 1), ("maximum", _upper, -1)):
        rb, wb = bound(r), bound(w)
        if rb is None:
            continue
        if wb is None:
            out.append(f"{where}: the reader has a {name} and the writer has none")
        elif (wb[0] - rb[0]) * tighter < 0 or (wb[0] == rb[0] and rb[1] and not wb[1]):
            out.append(f"{where}: the reader's {name} is tighter than the writer's")
    step = r.get("multipleOf")
    if isinstance(step, int | float) and not (step == 1 and may <= {"integer"}):
        w_step = w.get("multipleOf")
        ok = isinstance(w_step, int | float) and (
            (Fraction(str(w_step)) / Fraction(str(step))).denominator == 1
        )
        if not ok:
            out.append(f"{where}: the reader's multipleOf {step} does not divide the writer's")
    return out


def compatible(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    """Why ``reader`` rejects documents that ``writer`` accepts (empty: it accepts them all);
    :class:`SchemaTooComplexError` when that is more work than :data:`MAX_COMPARE_STEPS`, or
    a chain of ``$ref``s deeper than the interpreter's stack."""
    built: dict[int, _Doc] = {}
    rdoc = _Doc.of(reader.parsed, reader.references, built)
    wdoc = _Doc.of(writer.parsed, writer.references, built)
    try:
        return _Checker().compare(reader.parsed, rdoc, writer.parsed, wdoc, "")
    except RecursionError:
        raise SchemaTooComplexError(
            "schema is too complex to check for compatibility: its references nest too deeply"
        ) from None
