"""Protobuf compilation with in-process protoc, and Confluent's wire-level rules."""

from __future__ import annotations

import contextlib

import pytest
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.registry.schemas import protobuf
from broker.registry.schemas.types import (
    InvalidSchemaError,
    ParsedSchema,
    SchemaType,
    parse_schema,
)

pytestmark = pytest.mark.unit


def parse(body: str, references: dict[str, ParsedSchema] | None = None) -> ParsedSchema:
    return parse_schema(
        SchemaType.PROTOBUF, f'syntax = "proto3";\npackage acme;\n{body}', references
    )


def check(reader: str, writer: str) -> list[str]:
    return protobuf.compatible(parse(reader), parse(writer))


BASE = "message User { int64 id = 1; string name = 2; }"


def test_protobuf_descriptor_set_includes_imports() -> None:
    parsed = parse('import "google/protobuf/timestamp.proto";\n'
                   "message User { google.protobuf.Timestamp at = 1; }")  # fmt: skip
    files = descriptor_pb2.FileDescriptorSet.FromString(parsed.file_descriptor_set).file
    assert [f.name for f in files] == ["google/protobuf/timestamp.proto", parsed.file_name]


def test_protobuf_canonical_ignores_whitespace_and_comments() -> None:
    a = parse(BASE)
    b = parse("// a user\nmessage   User {\n  int64 id = 1;  /* key */\n  string name = 2;\n}\n")
    assert a.canonical == b.canonical
    assert a.canonical != parse("message User { int64 id = 1; }").canonical


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('syntax = "proto3"; message A { strin x = 1; }', '"strin" is not defined'),
        ("not a proto", "protoc:"),
        ('syntax = "proto3"; import "missing.proto";', "missing.proto"),
        ('syntax = "proto3"; message A { int32 x = 1; int32 y = 1; }', "protoc:"),
        ("message A {" * 70, "nests deeper"),
    ],
)
def test_protobuf_invalid_schema_is_rejected_with_a_message(text: str, fragment: str) -> None:
    with pytest.raises(InvalidSchemaError, match=fragment):
        parse_schema(SchemaType.PROTOBUF, text)


def test_protobuf_reference_is_written_under_its_import_path() -> None:
    other = parse("message Address { string city = 1; }")
    user = parse('import "geo/address.proto";\nmessage User { Address home = 1; }',
                 {"geo/address.proto": other})  # fmt: skip
    assert user.file_name not in ("geo/address.proto",)
    assert protobuf.compatible(user, user) == []
    with pytest.raises(InvalidSchemaError, match="relative import path"):
        parse('import "x.proto";', {"../x.proto": other})


def test_protobuf_compiled_descriptors_are_cached_per_text() -> None:
    parse(BASE)
    before = protobuf._compile.cache_info().hits
    parse(BASE)
    assert protobuf._compile.cache_info().hits == before + 1


def test_protobuf_plain_field_added_or_removed_is_compatible() -> None:
    added = "message User { int64 id = 1; string name = 2; bool admin = 3; }"
    assert check(added, BASE) == []
    assert check(BASE, added) == []


def test_protobuf_field_renamed_keeping_number_and_type_is_compatible() -> None:
    assert check("message User { int64 key = 1; string name = 2; }", BASE) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [("int32", "int64"), ("uint32", "bool"), ("sint32", "sint64"), ("fixed32", "sfixed32"),
     ("fixed64", "sfixed64"), ("string", "bytes")],
)  # fmt: skip
def test_protobuf_field_type_within_a_wire_group_is_compatible(old: str, new: str) -> None:
    assert check(f"message M {{ {new} v = 1; }}", f"message M {{ {old} v = 1; }}") == []


@pytest.mark.parametrize(
    ("old", "new"),
    [("int32", "sint32"), ("int64", "fixed64"), ("string", "int32"), ("double", "float")],
)
def test_protobuf_field_number_reused_with_incompatible_type_breaks(old: str, new: str) -> None:
    problems = check(f"message M {{ {new} v = 1; }}", f"message M {{ {old} v = 1; }}")
    assert problems == [f"M.v(1): type changed from {old} to {new}"]


def test_protobuf_message_field_types_are_compared_recursively() -> None:
    old = "message A { B b = 1; } message B { int32 x = 1; }"
    assert check("message A { B b = 1; } message B { int64 x = 1; }", old) == []
    problems = check("message A { B b = 1; } message B { string x = 1; }", old)
    assert any("x(1)" in m for m in problems)
    assert any("type changed" in m for m in check("message A { C b = 1; } message C {}", old))


def test_protobuf_removed_message_type_is_incompatible() -> None:
    old = "message A { int32 x = 1; } message B { int32 y = 1; }"
    assert check("message A { int32 x = 1; }", old) == ["message 'B' removed"]


def test_protobuf_package_or_first_message_change_is_incompatible() -> None:
    moved = parse_schema(SchemaType.PROTOBUF, f'syntax = "proto3"; package other; {BASE}')
    assert any("package" in m for m in protobuf.compatible(moved, parse(BASE)))
    renamed = "message Person { int64 id = 1; string name = 2; } message User {}"
    assert any("first message" in m for m in check(renamed, BASE))


def test_protobuf_field_moved_out_of_a_oneof_is_incompatible() -> None:
    old = "message M { oneof kind { string a = 1; int32 b = 2; } }"
    new = "message M { string a = 1; oneof kind { int32 b = 2; } }"
    assert any("out of oneof" in m for m in check(new, old))


def test_protobuf_single_field_moved_into_a_new_oneof_is_compatible() -> None:
    old = "message M { string a = 1; int32 b = 2; }"
    new = "message M { oneof kind { string a = 1; bool c = 3; } int32 b = 2; }"
    assert check(new, old) == []


def test_protobuf_several_fields_moved_into_a_oneof_is_incompatible() -> None:
    old = "message M { string a = 1; int32 b = 2; }"
    new = "message M { oneof kind { string a = 1; int32 b = 2; } }"
    assert any("moved into oneof" in m for m in check(new, old))


def test_protobuf_field_moved_into_an_existing_oneof_is_incompatible() -> None:
    old = "message M { string a = 1; oneof kind { int32 b = 2; } }"
    new = "message M { oneof kind { string a = 1; int32 b = 2; } }"
    assert any("moved into oneof" in m for m in check(new, old))


def test_protobuf_proto3_optional_is_not_a_oneof() -> None:
    assert check("message M { optional string a = 1; }", "message M { string a = 1; }") == []


def test_protobuf_proto2_required_changes_are_incompatible() -> None:
    def p2(body: str) -> ParsedSchema:
        return parse_schema(SchemaType.PROTOBUF, f'syntax = "proto2"; {body}')

    optional = p2("message M { optional int32 a = 1; }")
    required = p2("message M { required int32 a = 1; }")
    extra = p2("message M { optional int32 a = 1; required int32 b = 2; }")
    assert any("required" in m for m in protobuf.compatible(required, optional))
    assert any("required field added" in m for m in protobuf.compatible(extra, optional))
    assert any("required field removed" in m for m in protobuf.compatible(optional, extra))


def test_protobuf_repeated_numeric_label_change_is_incompatible() -> None:
    assert check("message M { repeated int32 a = 1; }", "message M { int32 a = 1; }") != []
    assert check("message M { repeated string a = 1; }", "message M { string a = 1; }") == []


def test_protobuf_map_value_type_change_is_detected() -> None:
    old = "message M { map<string, int32> m = 1; }"
    assert check("message M { map<string, int64> m = 1; }", old) == []
    assert check("message M { map<string, string> m = 1; }", old) != []


def test_protobuf_recursive_message_terminates() -> None:
    tree = "message Node { int32 v = 1; repeated Node children = 2; }"
    assert check(tree, tree) == []


# --- properties ------------------------------------------------------------------------

_scalars = st.sampled_from(["int32", "int64", "uint32", "sint64", "fixed32", "bool", "string",
                            "bytes", "double", "float"])  # fmt: skip


@st.composite
def _protos(draw: st.DrawFn) -> str:
    messages = []
    for index in range(draw(st.integers(1, 3))):
        kinds = draw(st.lists(_scalars, max_size=5))
        fields = [f"{k} f{n} = {n};" for n, k in enumerate(kinds, start=1)]
        if index and draw(st.booleans()):
            fields.append(f"M0 parent = {len(kinds) + 1};")
        if len(fields) >= 2 and draw(st.booleans()):
            fields = [f"oneof choice {{ {fields[0]} {fields[1]} }}", *fields[2:]]
        messages.append(f"message M{index} {{ {' '.join(fields)} }}")
    return "\n".join(messages)


@settings(max_examples=40, deadline=None)
@given(_protos())
def test_protobuf_every_schema_is_compatible_with_itself(body: str) -> None:
    parsed = parse(body)
    assert protobuf.compatible(parsed, parsed) == []


@settings(max_examples=40, deadline=None)
@given(_protos(), st.sampled_from(["  ", "\n", "\n// note\n", " /* c */ "]))
def test_protobuf_canonical_is_independent_of_whitespace_and_comments(body: str, gap: str) -> None:
    assert parse(body.replace(" ", gap)).canonical == parse(body).canonical


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=120), st.builds(
    lambda a, b: f'syntax = "proto3"; message {a} {{ {b} }}',
    st.text(max_size=10),
    st.text(max_size=30),
)))  # fmt: skip
def test_protobuf_parse_of_arbitrary_text_raises_only_invalid_schema_error(text: str) -> None:
    with contextlib.suppress(InvalidSchemaError):
        parse_schema(SchemaType.PROTOBUF, text)
