"""Avro binary bodies, decoded with fastavro's ``schemaless_reader`` and the writer's schema.

The schema is parsed once, when the codec is built (callers keep one codec per schema id).
At the same time its *shape* is worked out, because two kinds of schema let a small body
make fastavro misbehave:

* **zero-width items** -- ``array<null>``, arrays of empty records or of ``fixed`` size 0:
  each item reads no bytes, so a block count of ``2**60`` makes fastavro append items
  until memory runs out;
* **recursive or very deep schemas** -- a linked list nested a few thousand levels deep
  overflows the C stack inside fastavro (a segfault, not a ``RecursionError``; 5 000
  levels crash it here). fastavro has no depth limit of its own, so this codec stops at
  :data:`AVRO_MAX_DEPTH` (100, as upb does for Protobuf) whatever ``max_depth`` says.

And one logical type: fastavro turns a ``decimal`` into a :class:`~decimal.Decimal` from
all its bytes, whatever ``precision`` says, in time quadratic in their number (a 200 kB
value takes seconds). Importing this module replaces fastavro's ``bytes-decimal`` and
``fixed-decimal`` readers (process-wide: they are a global table that its C reader looks
up) with one that first refuses a value with more significant bytes than ``precision``
digits need, and never allows more than :data:`AVRO_MAX_DECIMAL_DIGITS`; sign-extension
padding (a ``fixed`` wider than its precision needs) is allowed. Values that fit are read
by fastavro's own reader, unchanged.

And integers: fastavro reads a varint for as long as its bytes say it goes on and keeps 64
bits of it, so an ``int`` decodes to values past 32 bits and an eleven-byte varint to a
wrapped number. After each decode :mod:`broker.codecs._avrocheck` walks the body's integers
(in C, ~0.1 us for a small event) and refuses any the spec does not allow.

Only for those schemas is the body pre-scanned (:class:`_Scanner`, pure Python, bounded
by the limits) before fastavro reads it. For every other schema each item takes at least
one byte, so a hostile count fails at the end of the body and nesting is bounded by the
schema; the decoded value is walked only when the body is long enough to hold a collection
over ``max_collection_len``. Trailing bytes after the datum are an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from io import BytesIO
from typing import Any, Final, TypeAlias

import fastavro
import orjson
from fastavro.read import LOGICAL_READERS, SchemaResolutionError

from broker.codecs._avrocheck import checker, compile_program
from broker.codecs.base import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    check_tree,
    describe,
    too_large,
)

__all__ = ["AVRO_MAX_DECIMAL_DIGITS", "AVRO_MAX_DEPTH", "AvroCodec", "AvroSchema"]

#: A writer schema as the registry holds it: JSON text, or its parsed JSON value.
AvroSchema: TypeAlias = str | Mapping[str, Any] | list[Any]

_ERRORS = (
    SchemaResolutionError,
    EOFError,
    StopIteration,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    RecursionError,
    MemoryError,
)
_NAMED = frozenset({"record", "error", "enum", "fixed"})
#: Bytes each primitive takes at least.
_MIN_WIDTH: Final = {
    "null": 0,
    "boolean": 1,
    "int": 1,
    "long": 1,
    "float": 4,
    "double": 8,
    "bytes": 1,
    "string": 1,
}
_MAX_VARINT_BYTES = 10
#: The deepest records, arrays and maps nest here, at most: fastavro reads recursively in C
#: and has no limit, and the pre-scan recurses in Python (up to four frames a level).
AVRO_MAX_DEPTH: Final = 100
#: The most digits a ``decimal`` may have, whatever its schema's ``precision``: PostgreSQL's
#: ``numeric(p)`` limit, the largest any common system declares (416 bytes at most).
AVRO_MAX_DECIMAL_DIGITS: Final = 1000


#: Bytes a two's-complement integer of ``p`` decimal digits takes at most, by ``p``.
_DECIMAL_BYTES: Final[tuple[int, ...]] = tuple(
    ((10**digits - 1).bit_length() + 8) // 8 for digits in range(AVRO_MAX_DECIMAL_DIGITS + 1)
)


def _significant_bytes(data: bytes) -> int:
    """Length of ``data`` (big-endian two's complement) without redundant sign extension."""
    pad = b"\xff" if data and data[0] & 0x80 else b"\x00"
    rest = data.lstrip(pad)
    if not rest:
        return 1
    return len(rest) + ((rest[0] ^ pad[0]) >> 7)


_fastavro_decimal: Final = LOGICAL_READERS["bytes-decimal"]


def _read_decimal(
    data: bytes,
    writer_schema: dict[str, Any] | None = None,
    reader_schema: dict[str, Any] | None = None,
) -> Decimal:
    """fastavro's decimal reader, bounded by the precision before any big-integer work."""
    if len(data) > 1:  # one byte fits any precision
        precision = writer_schema.get("precision") if writer_schema else None
        digits: int = AVRO_MAX_DECIMAL_DIGITS
        if type(precision) is int and 0 < precision < digits:
            digits = precision
        limit = _DECIMAL_BYTES[digits]
        if len(data) > limit and (size := _significant_bytes(data)) > limit:
            raise ValueError(
                f"decimal value is {size} bytes, over the {limit} that {digits} digits need"
            )
    value: Decimal = _fastavro_decimal(data, writer_schema, reader_schema)
    return value


LOGICAL_READERS["bytes-decimal"] = LOGICAL_READERS["fixed-decimal"] = _read_decimal


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a schema allows: whether it needs the pre-scan, and its static nesting depth."""

    zero_width_items: bool
    recursive: bool
    depth: int


class _ShapeFinder:
    """Works out :class:`_Shape` from a parsed schema; also collects its named types."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {}
        self.zero_width_items = False
        self.recursive = False
        self._open: set[str] = set()
        self._done: dict[str, tuple[int, int]] = {}

    def visit(self, schema: Any) -> tuple[int, int]:
        """``(min_width, depth)`` of ``schema``: fewest bytes a value takes, containers nested."""
        if isinstance(schema, str):
            if schema in _MIN_WIDTH:
                return _MIN_WIDTH[schema], 0
            if schema in self._open:
                # Reached through record fields alone (a union, array or map on the way
                # takes a byte): no finite value exists, so this is never zero-width --
                # counted as such, arrays of it would not be walked, and fastavro would
                # follow the reference without end.
                self.recursive = True
                return 1, 0
            return self._done.get(schema) or self.visit(self.names[schema])
        if isinstance(schema, list):
            branches = [self.visit(branch) for branch in schema]
            return 1 + min((w for w, _ in branches), default=0), max(
                (d for _, d in branches), default=0
            )
        kind = schema["type"]
        if kind in _NAMED:
            self.names[schema["name"]] = schema
        if kind in {"record", "error"}:
            self._open.add(schema["name"])
            fields = [self.visit(field["type"]) for field in schema["fields"]]
            self._open.discard(schema["name"])
            shape = sum(w for w, _ in fields), 1 + max((d for _, d in fields), default=0)
            self._done[schema["name"]] = shape
            return shape
        if kind == "enum":
            return 1, 0
        if kind == "fixed":
            return int(schema["size"]), 0
        if kind == "array":
            width, depth = self.visit(schema["items"])
            self.zero_width_items = self.zero_width_items or width == 0
            return 1, 1 + depth
        if kind == "map":
            return 1, 1 + self.visit(schema["values"])[1]
        return self.visit(kind)


class _Scanner:
    """Walks a body against its schema without building values, enforcing the limits.

    Used only for schemas with zero-width items or recursion; items that take no bytes are
    counted, never iterated, so a block count costs O(1) however large it is.
    """

    def __init__(
        self,
        payload: bytes,
        names: dict[str, Any],
        limits: DecodeLimits,
        zero_width: dict[int, bool],
        max_depth: int,
    ) -> None:
        self._buf = payload
        self._max_depth = max_depth
        self._zero_width = zero_width
        self._pos = 0
        self._names = names
        self._limits = limits
        self._items = 0

    def run(self, schema: Any) -> None:
        self._skip(schema, 0)

    def _fail(self, reason: str) -> DecodeError:
        return DecodeError("avro", reason)

    def _advance(self, count: int) -> None:
        if count < 0 or self._pos + count > len(self._buf):
            raise self._fail("unexpected end of payload")
        self._pos += count

    def _long(self) -> int:
        result = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            if self._pos >= len(self._buf):
                raise self._fail("unexpected end of payload")
            byte = self._buf[self._pos]
            self._pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (result >> 1) ^ -(result & 1)
            shift += 7
        raise self._fail("varint longer than 10 bytes")

    def _skip(self, schema: Any, depth: int) -> None:
        if isinstance(schema, str):
            if schema in {"int", "long", "boolean"}:
                self._long() if schema != "boolean" else self._advance(1)
            elif schema in {"bytes", "string"}:
                self._advance(self._long())
            elif schema in {"float", "double"}:
                self._advance(_MIN_WIDTH[schema])
            elif schema != "null":
                self._skip(self._names[schema], depth)
            return
        if isinstance(schema, list):
            index = self._long()
            if not 0 <= index < len(schema):
                raise self._fail(f"union branch {index} out of range")
            self._skip(schema[index], depth)
            return
        kind = schema["type"]
        if kind in {"record", "error", "array", "map"} and depth >= self._max_depth:
            raise self._fail(f"nested deeper than {self._max_depth} levels")
        if kind in {"record", "error"}:
            for field in schema["fields"]:
                self._skip(field["type"], depth + 1)
        elif kind == "enum":
            index = self._long()
            if not 0 <= index < len(schema["symbols"]):
                raise self._fail(f"enum index {index} out of range")
        elif kind == "fixed":
            self._advance(int(schema["size"]))
        elif kind in {"array", "map"}:
            self._blocks(schema, depth + 1)
        else:
            self._skip(kind, depth)

    def _blocks(self, schema: Any, depth: int) -> None:
        limits = self._limits
        is_map = schema["type"] == "map"
        items = schema["values"] if is_map else schema["items"]
        empty = False
        if not is_map:
            cached = self._zero_width.get(id(items))
            if cached is None:
                cached = self._zero_width[id(items)] = _is_zero_width(items, self._names)
            empty = cached
        length = 0
        while (count := self._long()) != 0:
            if count < 0:
                count = -count
                self._long()  # the block's size in bytes
            length += count
            self._items += count
            if length > limits.max_collection_len:
                raise self._fail(f"a collection has over {limits.max_collection_len} items")
            if self._items > limits.max_total_items:
                raise self._fail(f"more than {limits.max_total_items} items in all")
            if empty:
                continue
            for _ in range(count):
                if is_map:
                    self._advance(self._long())
                self._skip(items, depth)


def _is_zero_width(schema: Any, names: dict[str, Any]) -> bool:
    finder = _ShapeFinder()
    finder.names.update(names)
    return finder.visit(schema)[0] == 0


def _load(schema: AvroSchema) -> Any:
    if not isinstance(schema, str):
        return schema
    try:
        return orjson.loads(schema)
    except orjson.JSONDecodeError:
        return schema  # a bare primitive or named type, like ``string``


_CHECKER: Final = checker()


class AvroCodec:
    """Decodes Avro binary written with one schema (the writer's; no schema resolution)."""

    name = "avro"
    __slots__ = (
        "_check",
        "_limits",
        "_max_bytes",
        "_max_depth",
        "_names",
        "_prescan",
        "_program",
        "_schema",
        "_walk_above",
        "_zero_width",
    )

    def __init__(self, schema: AvroSchema, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        # Any failure here is the schema's (fastavro raises many kinds for a bad one, and
        # a ``fixed`` too large for the program's words is refused while compiling it).
        try:
            self._schema: Any = fastavro.parse_schema(_load(schema))
            finder = _ShapeFinder()
            width_depth = finder.visit(self._schema)
            names = finder.names
            # Checks the integers fastavro read (it keeps any 64 bits of any varint).
            self._program = compile_program(
                self._schema, names, lambda items: _is_zero_width(items, names)
            )
        except Exception as exc:
            raise DecodeError("avro", f"invalid schema: {describe(exc)}") from exc
        shape = _Shape(finder.zero_width_items, finder.recursive, width_depth[1])
        self._limits = limits
        self._names = names
        self._zero_width: dict[int, bool] = {}
        self._max_bytes = limits.max_payload_bytes
        self._max_depth = min(limits.max_depth, AVRO_MAX_DEPTH)
        self._prescan = shape.zero_width_items or shape.recursive or shape.depth > self._max_depth
        self._walk_above = min(limits.max_collection_len, limits.max_total_items)
        self._check = _CHECKER

    @property
    def limits(self) -> DecodeLimits:
        """The bounds this codec enforces."""
        return self._limits

    @property
    def prescans(self) -> bool:
        """Whether this schema needs the bounded pre-scan (zero-width items, recursion)."""
        return self._prescan

    def decode(self, payload: bytes) -> Any:
        """Read one datum; raise :class:`DecodeError` if it is invalid or over a limit."""
        size = len(payload)
        if size > self._max_bytes:
            raise too_large("avro", size, self._max_bytes)
        if self._prescan:
            scanner = _Scanner(
                payload, self._names, self._limits, self._zero_width, self._max_depth
            )
            try:
                scanner.run(self._schema)
            except RecursionError as exc:  # only if called with little stack left
                raise DecodeError("avro", describe(exc)) from exc
        stream = BytesIO(payload)
        try:
            value = fastavro.schemaless_reader(stream, self._schema, None)
        except _ERRORS as exc:
            raise DecodeError("avro", describe(exc)) from exc
        if stream.tell() != size:
            raise DecodeError("avro", f"{size - stream.tell()} trailing bytes after the datum")
        bad = self._check(self._program, payload, self._max_depth)
        if bad is not None:
            raise DecodeError("avro", f"{bad[1]} (at byte {bad[0]})")
        if size > self._walk_above:
            check_tree("avro", value, self._limits)
        return value
