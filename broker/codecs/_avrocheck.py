"""Avro's integers held to the spec: an ``int`` in 32 bits, a ``long`` in 64.

fastavro reads a varint for as many bytes as have the continuation bit set and keeps the
low 64 bits of what they hold, so an ``int`` field decodes to any 64-bit value, and a varint
of eleven bytes or more to a wrapped number, where Avro's spec (and its Java reader) make
both invalid. :class:`~broker.codecs.avro.AvroCodec` therefore walks each body it decoded a
second time, touching only the integers: an ``int`` (fields, enum indexes, ``date`` and
``time-millis``) takes at most 5 bytes and 32 bits; every other varint (``long`` fields,
lengths, block counts and sizes, union indexes) at most 10 bytes and 64 bits.

The schema is compiled once into a program of 32-bit words (:func:`compile_program`) that
the C accelerator (``broker.codecs._lazy.check_avro``) runs without touching a Python
object; :func:`check` is the same walk in Python, used where the accelerator is not built
(behind a scan for runs of bytes where a long varint may be) and by the tests that hold the
two to each other.

Program layout: word 0 is the root node's offset; then one node per type (a named type
once, however often it is used), children as offsets counted from word 1::

    null, boolean, int, long, float, double, bytes/string:   [op]
    fixed:                                                   [op, size]
    enum:                                                    [op, symbols]
    record:                                                  [op, fields, child...]
    array, map:                                              [op, child, zero_width]
    union:                                                   [op, branches, child...]
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Final

from broker.codecs._accelerator import accelerator

__all__ = ["Checker", "check", "check_if_long", "checker", "compile_program"]

NULL, BOOLEAN, INT, LONG, FLOAT, DOUBLE, BYTES, FIXED, ENUM, RECORD, ARRAY, MAP, UNION = range(13)

_PRIMITIVES: Final = {
    "null": NULL,
    "boolean": BOOLEAN,
    "int": INT,
    "long": LONG,
    "float": FLOAT,
    "double": DOUBLE,
    "bytes": BYTES,
    "string": BYTES,
}
_WIDTH: Final = {BOOLEAN: 1, FLOAT: 4, DOUBLE: 8}
#: The largest value a program word holds (a ``fixed`` size, a count of fields or branches).
_MAX_WORD: Final = 2**31 - 1

#: ``(offset, reason)`` of the first bad integer, or ``None``.
Checker = Callable[[bytes, bytes, int], "tuple[int, str] | None"]


def compile_program(
    schema: Any, names: Mapping[str, Any], zero_width: Callable[[Any], bool]
) -> bytes:
    """The program for a parsed schema (``fastavro.parse_schema``), its named types by full
    name, and a test for item types that take no bytes (their arrays are not iterated)."""
    code: list[int] = []
    placed: dict[str, int] = {}

    def node(words: list[int]) -> int:
        offset = len(code)
        code.extend(words)
        return offset

    def emit(s: Any) -> int:
        if isinstance(s, str):
            if s in placed:
                return placed[s]
            op = _PRIMITIVES.get(s)
            if op is not None:
                placed[s] = node([op])
                return placed[s]
            return emit(names[s])
        if isinstance(s, list):
            at = node([UNION, len(s), *([0] * len(s))])
            for i, branch in enumerate(s):
                code[at + 2 + i] = emit(branch)
            return at
        kind = s["type"]
        if kind in {"record", "error"}:
            fields = s["fields"]
            at = placed[s["name"]] = node([RECORD, len(fields), *([0] * len(fields))])
            for i, field in enumerate(fields):
                code[at + 2 + i] = emit(field["type"])
            return at
        if kind == "enum":
            placed[s["name"]] = at = node([ENUM, len(s["symbols"])])
            return at
        if kind == "fixed":
            size = int(s["size"])
            if not 0 <= size <= _MAX_WORD:
                raise ValueError(f"fixed {s['name']!r} has size {size}, not 0 to {_MAX_WORD}")
            placed[s["name"]] = at = node([FIXED, size])
            return at
        if kind in {"array", "map"}:
            items = s["values"] if kind == "map" else s["items"]
            at = node([MAP if kind == "map" else ARRAY, 0, 0])
            code[at + 1] = emit(items)
            code[at + 2] = int(kind == "array" and zero_width(items))
            return at
        return emit(kind)  # a primitive with a logical type, e.g. {"type": "int", ...}

    root = emit(schema)
    return array("i", [root, *code]).tobytes()  # word 0: the root's offset


#: The largest ``max_depth`` either walk takes (the C walk recurses on the C stack).
MAX_DEPTH_BOUND: Final = 10_000


class _Bad(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        self.offset, self.reason = offset, reason


class _Walk:
    """The walk of :func:`check` (and of ``check_avro`` in ``_lazy.c``, line for line)."""

    def __init__(self, program: bytes, payload: bytes, max_depth: int) -> None:
        if not program or len(program) % 4:
            raise ValueError("the program is not a whole number of 32-bit words")
        if not 0 <= max_depth <= MAX_DEPTH_BOUND:
            raise ValueError(f"max_depth must be between 0 and {MAX_DEPTH_BOUND}")
        words = array("i")
        words.frombytes(program)
        self.code = words.tolist()  # word 0: the root's offset; nodes from word 1
        self.buf = payload
        self.pos = 0
        self.max_depth = max_depth

    def varint(self, is_int: bool) -> int:
        start = pos = self.pos
        buf, end = self.buf, len(self.buf)
        n = shift = 0
        while True:
            if pos >= end:
                raise _Bad(start, "the body ends inside a value")
            byte = buf[pos]
            pos += 1
            if pos - start == (5 if is_int else 10):  # the last byte there may be
                if byte & 0x80:
                    kind = "an int takes more than 5" if is_int else "a long takes more than 10"
                    raise _Bad(start, f"{kind} bytes")
                if not is_int and byte & 0x7E:
                    raise _Bad(start, "a long is outside the 64-bit range")
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        if is_int and n > 0xFFFFFFFF:
            raise _Bad(start, "an int is outside the 32-bit range")
        self.pos = pos
        return (n >> 1) ^ -(n & 1)

    def advance(self, count: int) -> None:
        if count < 0 or count > len(self.buf) - self.pos:
            raise _Bad(self.pos, "the body ends inside a value")
        self.pos += count

    def word(self, at: int) -> int:
        if not 0 <= at < len(self.code) - 1:
            raise _Bad(0, "the program is malformed")
        return self.code[at + 1]

    def node(self, at: int, depth: int) -> None:
        op, here = self.word(at), self.pos
        if op in _WIDTH:
            self.advance(_WIDTH[op])
        elif op in (INT, LONG):
            self.varint(op == INT)
        elif op == BYTES:
            self.advance(self.varint(False))
        elif op == FIXED:
            self.advance(self.word(at + 1))
        elif op in (ENUM, UNION):
            bound = self.word(at + 1)  # before the varint, as the C walk reads them
            index = self.varint(op == ENUM)
            if not 0 <= index < bound:
                kind = "an enum index" if op == ENUM else "a union branch"
                raise _Bad(here, f"{kind} is out of range")
            if op == UNION:
                branch = self.word(at + 2 + index)
                if self.word(branch) == UNION:  # a union in a union (fastavro reads them)
                    if depth >= self.max_depth:
                        raise _Bad(here, f"nested deeper than {self.max_depth} levels")
                    self.node(branch, depth + 1)  # a level: a program may loop on it
                else:
                    self.node(branch, depth)
        elif op in (RECORD, ARRAY, MAP):
            if depth >= self.max_depth:
                raise _Bad(here, f"nested deeper than {self.max_depth} levels")
            if op == RECORD:
                for i in range(self.word(at + 1)):
                    self.node(self.word(at + 2 + i), depth + 1)
            else:
                self.blocks(at, op == MAP, depth + 1)
        elif op != NULL:
            raise _Bad(0, "the program is malformed")

    def blocks(self, at: int, is_map: bool, depth: int) -> None:
        item, empty = self.word(at + 1), self.word(at + 2)
        while (count := self.varint(False)) != 0:
            if count < 0:
                count = -count
                self.varint(False)  # the block's size in bytes
            if empty:
                continue
            for _ in range(count):  # each item takes a byte at least: ends with the body
                if is_map:
                    self.advance(self.varint(False))
                self.node(item, depth)


def check(program: bytes, payload: bytes, max_depth: int) -> tuple[int, str] | None:
    """``(offset, reason)`` of the first integer in ``payload`` that the spec does not allow
    (or of where the body ends early, or nests deeper than ``max_depth``); ``None`` when
    every one is within bounds."""
    walk = _Walk(program, payload, max_depth)
    try:
        walk.node(walk.code[0], 0)
    except _Bad as bad:
        return bad.offset, bad.reason
    return None


#: Four bytes in a row with the continuation bit: where a varint of 5 bytes or more may be.
_LONG_VARINT: Final = re.compile(rb"[\x80-\xff]{4}")


@lru_cache(maxsize=1024)
def _has_index(program: bytes) -> bool:
    """Whether ``program`` has an enum or union node (or cannot be read: the walk says so).

    Their indexes are checked whatever the body holds: fastavro looks an index up in a
    Python list, so a negative one (a short varint) picks a symbol or branch from the end
    where the spec, and the C walk, refuse it."""
    if len(program) % 4:
        return True
    words = array("i")
    words.frombytes(program)
    at = 1  # nodes lie end to end from word 1, as compile_program places them
    while at < len(words):
        op = words[at]
        if op in (ENUM, UNION) or not NULL <= op <= UNION:
            return True
        if op == FIXED:
            at += 2
        elif op in (ARRAY, MAP):
            at += 3
        elif op == RECORD:
            if at + 1 >= len(words) or words[at + 1] < 0:
                return True
            at += 2 + words[at + 1]
        else:
            at += 1
    return False


def check_if_long(program: bytes, payload: bytes, max_depth: int) -> tuple[int, str] | None:
    """:func:`check`, skipped for a body where no varint can take 5 bytes or more (every
    integer then fits 28 bits) when the program has no enum or union index to bound: the
    Python walk costs more than fastavro's decode, and most small bodies have no such run
    of bytes."""
    if _LONG_VARINT.search(payload) is None and not _has_index(program):
        return None
    return check(program, payload, max_depth)


def checker() -> Checker:
    """The C walk where the accelerator may be used (:func:`accelerator`), else
    :func:`check_if_long`."""
    module = accelerator()
    walk: Checker = check_if_long if module is None else module.check_avro
    return walk
