"""Avro schemas that used to crash or mislead the codec: a record that holds itself through
fields alone, a ``fixed`` too large for the checker's program, and (on the pure-Python path)
negative union branches and enum indexes.

Each decode that once segfaulted runs in a child process, so a regression fails the test
instead of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from array import array
from typing import Any

import fastavro
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.codecs import AvroCodec, DecodeError, _avrocheck
from broker.registry.schemas.decoders import Decoders
from broker.registry.schemas.types import ParsedSchema, SchemaType

pytestmark = pytest.mark.unit

try:
    from broker.codecs._lazy import check_avro as c_check
except ImportError:  # pragma: no cover - the accelerator is built wherever CI runs
    c_check = None

requires_c = pytest.mark.skipif(c_check is None, reason="broker.codecs._lazy is not built")
PATHS = [
    pytest.param("0", id="c", marks=requires_c),
    pytest.param("1", id="python"),
]


def itself(name: str) -> dict[str, Any]:
    """A record whose only field is the record itself: no finite value of it exists."""
    return {"type": "record", "name": name, "fields": [{"name": "next", "type": name}]}


# --- a record that holds itself through fields alone ----------------------------------

HOLDS_ITSELF = {
    "array of it": ({"type": "array", "items": itself("R")}, b"\x02\x00"),
    "array, long body": ({"type": "array", "items": itself("R")}, b"\x02" + b"\x00" * 500),
    "map of it": ({"type": "map", "values": itself("R")}, b"\x02\x02k\x00"),
    "union with it": (["null", itself("R")], b"\x02\x00"),
    "through another record": (
        {
            "type": "array",
            "items": {
                "type": "record",
                "name": "A",
                "fields": [
                    {
                        "name": "b",
                        "type": {
                            "type": "record",
                            "name": "B",
                            "fields": [{"name": "a", "type": "A"}],
                        },
                    }
                ],
            },
        },
        b"\x02\x00",
    ),
    "at the root": (itself("R"), b"\x00"),
}

_CHILD = """
import sys
from broker.codecs import AvroCodec, DecodeError
codec = AvroCodec(sys.argv[1])
try:
    codec.decode(bytes.fromhex(sys.argv[2]))
except DecodeError as e:
    print(e.reason)
else:
    print("decoded")
"""


@pytest.mark.parametrize("pure", PATHS)
@pytest.mark.parametrize(("schema", "body"), HOLDS_ITSELF.values(), ids=HOLDS_ITSELF.keys())
def test_a_record_that_holds_itself_is_a_decode_error_not_a_crash(
    pure: str, schema: Any, body: bytes
) -> None:
    """fastavro follows such a record without end, in C: the pre-scan must walk its items
    (they are not zero-width) and stop at the depth bound first."""
    env = {**os.environ, "BROKER_PURE_PYTHON": pure}
    args = [sys.executable, "-c", _CHILD, orjson.dumps(schema).decode(), body.hex()]
    child = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 0, f"the decode crashed (rc={child.returncode}): {child.stderr}"
    assert child.stdout.strip() == "nested deeper than 100 levels"


def test_an_array_of_a_record_that_holds_itself_is_walked_by_the_checker() -> None:
    codec = AvroCodec({"type": "array", "items": itself("R")})
    assert codec.prescans
    words = array("i", codec._program)  # type: ignore[attr-defined]
    # word 0: the root, the array node [ARRAY, item, zero_width]; then R's [RECORD, 1, R]
    assert words.tolist() == [0, _avrocheck.ARRAY, 3, 0, _avrocheck.RECORD, 1, 3]


# --- a fixed too large for the checker ------------------------------------------------


@pytest.mark.parametrize("size", [2**31, 3_000_000_000, 2**64, -1])
def test_a_fixed_size_outside_32_bits_is_an_invalid_schema_not_an_overflow(size: int) -> None:
    with pytest.raises(DecodeError, match=rf"invalid schema: fixed 'F' has size {size}"):
        AvroCodec({"type": "fixed", "name": "F", "size": size})


def test_the_largest_fixed_size_builds_and_a_short_body_is_a_decode_error() -> None:
    codec = AvroCodec({"type": "fixed", "name": "F", "size": 2**31 - 1})
    with pytest.raises(DecodeError):
        codec.decode(b"abc")


class _OneSchema:
    """Stands in for the registry: every id is ``parsed``."""

    def __init__(self, parsed: ParsedSchema) -> None:
        self.parsed = parsed

    async def schema(self, tenant: Any, schema_id: int) -> tuple[None, ParsedSchema]:
        return None, self.parsed


async def test_a_fixed_too_large_is_a_per_record_decode_error_for_the_decoders() -> None:
    """Replay turns a DecodeError into the record's decode_error; anything else is a 500
    for the whole page."""
    schema = {"type": "fixed", "name": "F", "size": 3_000_000_000}
    parsed = ParsedSchema(
        SchemaType.AVRO, orjson.dumps(schema).decode(), "", parsed=fastavro.parse_schema(schema)
    )
    decoders = Decoders(_OneSchema(parsed))  # type: ignore[arg-type]
    for _ in range(2):  # built once, the error kept
        with pytest.raises(DecodeError, match="invalid schema: fixed 'F' has size 3000000000"):
            await decoders.codec("acme", "application/avro", 7)  # type: ignore[arg-type]


# --- negative union branches and enum indexes -----------------------------------------

UNION = ["null", "int", "string"]
ENUM = {"type": "enum", "name": "E", "symbols": ["A", "B"]}


def codec_on(path: str, schema: Any, monkeypatch: pytest.MonkeyPatch) -> AvroCodec:
    """``schema``'s codec with the integer check of ``path`` (``"1"``: pure Python)."""
    monkeypatch.setenv("BROKER_PURE_PYTHON", path)
    codec = AvroCodec(schema)
    monkeypatch.setattr(codec, "_check", _avrocheck.checker())
    return codec


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("schema", "body", "reason"),
    [
        (UNION, b"\x03\x04", "a union branch is out of range"),  # branch -2: "int" from the end
        (UNION, b"\x01\x02a", "a union branch is out of range"),  # -1: "string"
        (ENUM, b"\x03", "an enum index is out of range"),  # index -2: "A"
        (ENUM, b"\x01", "an enum index is out of range"),
        (
            {"type": "array", "items": ENUM},
            b"\x02\x01\x00",
            "an enum index is out of range",
        ),
    ],
    ids=["union -2", "union -1", "enum -2", "enum -1", "enum -1 in an array"],
)
def test_a_negative_index_is_refused_on_both_paths(
    path: str, schema: Any, body: bytes, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fastavro looks the index up in a Python list, so -1 picks the last branch or
    symbol; the check must run whatever bytes the body holds."""
    with pytest.raises(DecodeError, match=reason):
        codec_on(path, schema, monkeypatch).decode(body)


def test_a_program_without_indexes_still_skips_the_python_walk() -> None:
    program = AvroCodec({"type": "array", "items": "int"})._program  # type: ignore[attr-defined]
    assert _avrocheck.check_if_long(program, b"\x01", 100) is None  # fastavro says why
    assert _avrocheck.check(program, b"\x01", 100) is not None


INDEXED = [
    UNION,
    ENUM,
    {
        "type": "record",
        "name": "Rec",
        "fields": [
            {"name": "n", "type": "long"},
            {"name": "e", "type": ENUM},
            {"name": "u", "type": {"type": "array", "items": ["null", "string", "E"]}},
        ],
    },
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=st.sampled_from(INDEXED), body=st.binary(max_size=24))
def test_the_python_fallback_answers_as_the_full_walk_for_enums_and_unions(
    schema: Any, body: bytes
) -> None:
    program = AvroCodec(schema)._program  # type: ignore[attr-defined]
    assert _avrocheck.check_if_long(program, body, 100) == _avrocheck.check(program, body, 100)


def outcome(codec: AvroCodec, body: bytes) -> tuple[str, Any]:
    try:
        return "value", codec.decode(body)
    except DecodeError as e:
        return "error", e.reason


@requires_c
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=st.sampled_from(INDEXED), body=st.binary(max_size=24))
def test_both_paths_decode_enums_and_unions_alike(schema: Any, body: bytes) -> None:
    c_codec, py_codec = AvroCodec(schema), AvroCodec(schema)
    c_codec._check = c_check  # type: ignore[attr-defined]
    py_codec._check = _avrocheck.check_if_long  # type: ignore[attr-defined]
    assert outcome(py_codec, body) == outcome(c_codec, body)
