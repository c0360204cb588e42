"""Protobuf schemas: compiling ``.proto`` text with protoc, and wire-level compatibility.

:func:`parse` writes the text (and its references, named by import path) into a temp
directory and runs protoc from ``grpcio-tools`` in-process: first its error-collecting
entry point for a clean one-line message, then ``--descriptor_set_out --include_imports``.
Compiled results are cached per text. :func:`compatible` compares the descriptors a
*reader* and a *writer* were compiled to, with the rules Confluent applies: field numbers
keep wire-compatible types (an enum is one of the varint integers), messages are not
removed, oneofs are not reshuffled, the package and first message (the schema's identity)
stay, proto2 ``required`` is frozen.
"""

from __future__ import annotations

import base64
import importlib.resources
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from grpc_tools import _protoc_compiler, protoc

from broker.registry.schemas.types import (
    MAX_COMPARE_DEPTH,
    MAX_NESTING,
    InvalidSchemaError,
    ParsedSchema,
    SchemaType,
    check_size,
)

_F = descriptor_pb2.FieldDescriptorProto
_WELL_KNOWN = str(importlib.resources.files("grpc_tools") / "_proto")
_PROTOC = threading.Lock()
_IMPORT_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*\Z")
#: Field types a field number may change between: the same wire encoding. An enum is a plain
#: varint, so it sits with the integers, and two enums of different names are alike (as in
#: Confluent's ``FieldSchemaDiff``, where both are its ``GENERAL_NUMBER`` scalar kind).
_WIRE_GROUPS: list[frozenset[int]] = [
    frozenset(
        {_F.TYPE_INT32, _F.TYPE_UINT32, _F.TYPE_INT64, _F.TYPE_UINT64, _F.TYPE_BOOL, _F.TYPE_ENUM}
    ),
    frozenset({_F.TYPE_SINT32, _F.TYPE_SINT64}),
    frozenset({_F.TYPE_FIXED32, _F.TYPE_SFIXED32}),
    frozenset({_F.TYPE_FIXED64, _F.TYPE_SFIXED64}),
    frozenset({_F.TYPE_STRING, _F.TYPE_BYTES}),
]
_LENGTH_DELIMITED = frozenset({_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE})
#: Field types compared by name, then field by field.
_MESSAGE_TYPES = frozenset({_F.TYPE_MESSAGE, _F.TYPE_GROUP})


def parse(text: str, references: Mapping[str, ParsedSchema]) -> ParsedSchema:
    """Compile ``.proto`` text; ``references`` maps import paths to the imported schemas."""
    check_size(text)
    _check_nesting(text)
    files = _reference_files(references)
    fds_bytes, name = _compile(text, files)
    fds = descriptor_pb2.FileDescriptorSet.FromString(fds_bytes)
    main = next(f for f in fds.file if f.name == name)
    main.ClearField("source_code_info")
    main.ClearField("name")
    canonical = base64.b64encode(main.SerializeToString(deterministic=True)).decode()
    return ParsedSchema(
        schema_type=SchemaType.PROTOBUF,
        text=text,
        canonical=canonical,
        file_descriptor_set=fds_bytes,
        file_name=name,
        references=dict(references),
    )


def _check_nesting(text: str) -> None:
    """Reject more than :data:`MAX_NESTING` nested ``{`` blocks (comments/strings skipped)."""
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            i = text.find("*/", i + 2)
            i = n if i < 0 else i + 1
        elif c in "\"'":
            i += 1
            while i < n and text[i] != c and text[i] != "\n":
                i += 2 if text[i] == "\\" else 1
        elif c == "{":
            depth += 1
            if depth > MAX_NESTING:
                raise InvalidSchemaError(f"schema nests deeper than {MAX_NESTING} levels")
        elif c == "}":
            depth -= 1
        i += 1


def _reference_files(references: Mapping[str, ParsedSchema]) -> tuple[tuple[str, str], ...]:
    """Every file the references bring (transitively), as sorted (import path, text) pairs.
    A reference reached again by another way is not walked again (a diamond stays linear)."""
    found: dict[str, str] = {}
    walked: set[int] = set()  # ids of references walked; each stays alive in ``references``
    stack = list(references.items())
    while stack:
        path, ref = stack.pop()
        if not _IMPORT_PATH.match(path) or ".." in path.split("/"):
            raise InvalidSchemaError(f"reference name {path!r} is not a relative import path")
        if found.setdefault(path, ref.text) != ref.text:
            raise InvalidSchemaError(f"reference {path!r} is given two different texts")
        if id(ref) not in walked:
            walked.add(id(ref))
            stack.extend(ref.references.items())
    return tuple(sorted(found.items()))


@lru_cache(maxsize=512)
def _compile(text: str, files: tuple[tuple[str, str], ...]) -> tuple[bytes, str]:
    """Run protoc; the serialized FileDescriptorSet (with imports) and the main file's name."""
    taken = {path for path, _ in files}
    name = next(n for i in range(len(taken) + 1) if (n := f"schema{i or ''}.proto") not in taken)
    with _PROTOC, tempfile.TemporaryDirectory(prefix="schema-proto-") as tmp:
        root = Path(tmp)
        try:
            for path, source in (*files, (name, text)):
                target = root / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(source, encoding="utf-8")
        except (UnicodeError, OSError) as e:
            raise InvalidSchemaError(f"cannot write schema for protoc: {e}") from None
        includes = [str(root).encode(), _WELL_KNOWN.encode()]
        try:
            _protoc_compiler.get_protos(name.encode(), includes)
        except _protoc_compiler.ProtocErrors as e:
            raise InvalidSchemaError(_protoc_message(e)) from None
        out = root / "out.desc"
        argv = ["protoc", f"-I{root}", f"-I{_WELL_KNOWN}", "--include_imports"]
        argv += [f"--descriptor_set_out={out}", str(root / name)]
        if protoc.main(argv) != 0 or not out.exists():
            raise InvalidSchemaError("protoc could not compile the schema")
        return out.read_bytes(), name


def _protoc_message(error: Any) -> str:
    try:
        first = error.errors()[0]
        where = _text(first.filename)
        if first.line >= 0:
            where += f":{first.line + 1}:{first.column + 1}"
        return f"protoc: {where}: {_text(first.message)}"
    except (AttributeError, IndexError, TypeError):
        return f"protoc: {error}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@lru_cache(maxsize=128)
def _index(fds_bytes: bytes) -> dict[str, Any]:
    """Full name (``.pkg.Msg.Inner``) → message or enum descriptor proto, over all files."""
    found: dict[str, Any] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(fds_bytes).file:
        stack = [(f".{file.package}" if file.package else "", m) for m in file.message_type]
        found.update({f"{file.package and '.' + file.package}.{e.name}": e for e in file.enum_type})
        while stack:
            prefix, message = stack.pop()
            full = f"{prefix}.{message.name}"
            found[full] = message
            found.update({f"{full}.{e.name}": e for e in message.enum_type})
            stack.extend((full, m) for m in message.nested_type)
    return found


def _main_file(schema: ParsedSchema) -> Any:
    fds = descriptor_pb2.FileDescriptorSet.FromString(schema.file_descriptor_set)
    return next(f for f in fds.file if f.name == schema.file_name)


def _messages(file: Any) -> Iterator[tuple[str, Any]]:
    """(name relative to the package, message) for every message of a file, nested too."""
    stack = [(m.name, m) for m in file.message_type]
    while stack:
        name, message = stack.pop()
        yield name, message
        stack.extend((f"{name}.{m.name}", m) for m in message.nested_type)


def _type_name(kind: int) -> str:
    return str(_F.Type.Name(kind)).removeprefix("TYPE_").lower()


def _oneof(message: Any, field: Any) -> str | None:
    if not field.HasField("oneof_index") or field.proto3_optional:
        return None
    return str(message.oneof_decl[field.oneof_index].name)


class _Differ:
    """Compares a reader's messages with a writer's, remembering pairs already compared."""

    def __init__(self, reader: ParsedSchema, writer: ParsedSchema) -> None:
        self.reader_types = _index(reader.file_descriptor_set)
        self.writer_types = _index(writer.file_descriptor_set)
        self.seen: set[tuple[int, int]] = set()
        self.depth = 0

    def message(self, r: Any, w: Any, where: str) -> list[str]:
        key = (id(r), id(w))
        if key in self.seen:
            return []
        if self.depth > MAX_COMPARE_DEPTH:
            return [f"{where}: messages nest too deeply to check"]
        self.seen.add(key)
        self.depth += 1
        try:
            return self._message(r, w, where)
        finally:
            self.depth -= 1

    def _message(self, r: Any, w: Any, where: str) -> list[str]:
        out: list[str] = []
        r_fields = {f.number: f for f in r.field}
        w_fields = {f.number: f for f in w.field}
        # A oneof gone whole (its name and every member) leaves nothing half set; one that
        # lost only some members leaves the reader with none set where the writer set one.
        r_oneofs = {_oneof(r, f) for f in r.field} - {None}
        members: dict[str, list[int]] = {}
        for f in w.field:
            if (group := _oneof(w, f)) is not None:
                members.setdefault(group, []).append(f.number)
        deleted = {
            group
            for group, numbers in members.items()
            if group not in r_oneofs and not any(n in r_fields for n in numbers)
        }
        for number, wf in sorted(w_fields.items()):
            rf = r_fields.get(number)
            at = f"{where}.{wf.name}({number})"
            if rf is None:
                if wf.label == _F.LABEL_REQUIRED:
                    out.append(f"{at}: required field removed")
                elif (group := _oneof(w, wf)) is not None and group not in deleted:
                    out.append(f"{at}: field removed from oneof {group!r}")
                continue
            out += self.field(rf, wf, at)
            if _oneof(w, wf) is not None and _oneof(r, rf) is None:
                out.append(f"{at}: field moved out of oneof {_oneof(w, wf)!r}")
        for number, rf in sorted(r_fields.items()):
            if number not in w_fields and rf.label == _F.LABEL_REQUIRED:
                out.append(f"{where}.{rf.name}({number}): required field added")
        for index, decl in enumerate(r.oneof_decl):
            existing = [w_fields[f.number] for f in r.field if f.number in w_fields and (
                f.HasField("oneof_index") and f.oneof_index == index and not f.proto3_optional
            )]  # fmt: skip
            plain = [f.name for f in existing if _oneof(w, f) is None]
            grouped = {_oneof(w, f) for f in existing} - {None}
            if len(plain) > 1:
                out.append(f"{where}: existing fields {plain} moved into oneof {decl.name!r}")
            elif (plain and grouped) or len(grouped) > 1:
                out.append(f"{where}: existing fields moved into oneof {decl.name!r}")
        return out

    def field(self, rf: Any, wf: Any, at: str) -> list[str]:
        out: list[str] = []
        if (rf.label == _F.LABEL_REQUIRED) != (wf.label == _F.LABEL_REQUIRED):
            out.append(f"{at}: required label changed")
        repeated = (rf.label == _F.LABEL_REPEATED) != (wf.label == _F.LABEL_REPEATED)
        if repeated and not (rf.type in _LENGTH_DELIMITED and wf.type in _LENGTH_DELIMITED):
            out.append(f"{at}: changed between repeated and singular")
        if rf.type != wf.type and not any({rf.type, wf.type} <= g for g in _WIRE_GROUPS):
            r_kind, w_kind = _type_name(rf.type), _type_name(wf.type)
            return [*out, f"{at}: type changed from {w_kind} to {r_kind}"]
        if rf.type in _MESSAGE_TYPES:
            if rf.type_name.rpartition(".")[2] != wf.type_name.rpartition(".")[2]:
                return [*out, f"{at}: type changed from {wf.type_name} to {rf.type_name}"]
            r_msg = self.reader_types.get(rf.type_name)
            w_msg = self.writer_types.get(wf.type_name)
            if r_msg is not None and w_msg is not None:
                out += self.message(r_msg, w_msg, f"{at}<{rf.type_name.lstrip('.')}>")
        return out


def compatible(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    """Why ``reader`` cannot read data written with ``writer`` (empty: it can)."""
    r_file, w_file = _main_file(reader), _main_file(writer)
    out: list[str] = []
    if r_file.package != w_file.package:
        out.append(f"package changed from {w_file.package!r} to {r_file.package!r}")
    if w_file.message_type and (
        not r_file.message_type or r_file.message_type[0].name != w_file.message_type[0].name
    ):
        first = r_file.message_type[0].name if r_file.message_type else None
        out.append(f"first message changed from {w_file.message_type[0].name!r} to {first!r}")
    r_names = {name for name, _ in _messages(r_file)}
    r_short = {name.rpartition(".")[2] for name in r_names}
    differ = _Differ(reader, writer)
    r_prefix = f".{r_file.package}" if r_file.package else ""
    w_prefix = f".{w_file.package}" if w_file.package else ""
    for name in sorted(name for name, _ in _messages(w_file)):
        if name in r_names:
            r_message = differ.reader_types[f"{r_prefix}.{name}"]
            w_message = differ.writer_types[f"{w_prefix}.{name}"]
            out += differ.message(r_message, w_message, name)
        elif name.rpartition(".")[2] not in r_short:
            out.append(f"message {name!r} removed")
    return out
