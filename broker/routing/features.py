"""Feature extraction: what routing needs to know about one message, read cheaply.

:func:`extract` runs once per routed message. Every step is bounded: magic bytes look at the
first 16 bytes, entropy and text sniffing at the first 4 KiB, JSON is parsed only up to
:data:`MAX_JSON_PARSE` bytes and walked with a node budget, text is cut at
:data:`MAX_TEXT_CHARS` characters.

The modality comes from the ``Content-Type`` first (``image/*`` is an image, ``application/
json`` is structured, ``application/pdf`` a document...), then from magic bytes when the type
says nothing (``application/octet-stream`` or absent), then from sniffing: UTF-8 text that
parses as JSON is structured, other text is text, an empty payload is text. Bytes that are
neither a known format nor text are classed as ``sensor`` data, the one modality for opaque
binary readings.

The text to match is ``Broker-Text``, else the payload's own: a text body; a JSON body's
distinct keys as words, then its string values (``numeric_share`` tells telemetry from
records); a PDF's title and the strings its pages draw (:func:`pdf_text`, bounded).

Routing headers (looked up case-insensitively):

``Broker-Intent``     the capability action wanted (``ocr``); lower-cased
``Broker-Text``       text to embed, percent-encoded UTF-8 (wins over the payload's text)
``Broker-Embedding``  base64 of little-endian float32: the query vector itself
``Broker-Schema-Id``  the stored schema id (else the Confluent wire prefix)
``x-env``             the environment (``canary``)

A malformed routing header raises :class:`InvalidRoutingHeader` (422).
"""

from __future__ import annotations

import binascii
import codecs
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import numpy as np
import numpy.typing as npt
import orjson

from broker import b64
from broker.envelope import (
    DEFAULT_CONTENT_TYPE,
    NO_WIRE_PREFIX,
    WIRE_PREFIX,
    media_type,
    wire_schema_id,
)
from broker.errors import Unprocessable
from broker.registry.manifest import MODEL_NAME_PATTERN, Modality

H_INTENT = "broker-intent"
H_TEXT = "broker-text"
H_EMBEDDING = "broker-embedding"
H_EMBEDDING_MODEL = "broker-embedding-model"
H_SCHEMA_ID = "broker-schema-id"
H_ENV = "x-env"
H_CONTENT_TYPE = "content-type"

MAX_TEXT_CHARS = 4000
MAX_EMBEDDING_DIM = 4096
MAX_JSON_PARSE = 256 * 1024  # larger JSON is not parsed: text comes from a prefix scan
MAX_JSON_NODES = 20_000
SAMPLE_BYTES = 4096
MAX_PDF_SCAN = 256 * 1024  # PDF bytes searched for text
MAX_PDF_INFLATE = 256 * 1024  # bytes inflated from compressed PDF content streams, in all
_MAX_KEYS = 200  # distinct JSON keys kept as words
_MAX_TEXT_HEADER = 64 * 1024
_MAX_EMBEDDING_HEADER = (MAX_EMBEDDING_DIM * 4 + 2) // 3 * 4 + 8
_INTENT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_JSON_STRING = re.compile(rb'"((?:[^"\\]|\\.){1,2000})"\s*(:?)')
#: Bytes that do not occur in text: C0 controls other than tab, newlines and form feed; DEL.
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\x0c") + b"\x7f"


class InvalidRoutingHeader(Unprocessable):
    """A routing header (Broker-Embedding, Broker-Embedding-Model, Broker-Text, Broker-Intent)
    that cannot be used."""

    error_code = "invalid_routing_header"


Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Features:
    """What routing knows about one message."""

    content_type: str
    modality: Modality
    size: int
    magic: str | None
    json_fields: int | None
    json_depth: int | None
    schema_id: int | None
    entropy: float
    intent: str | None
    text: str | None
    embedding: Vector | None
    env: str | None
    #: Share of a JSON body's leaves that are numbers (``None``: not parsed JSON). Telemetry
    #: is mostly numbers; a business record or a message mostly strings.
    numeric_share: float | None = None
    #: The model that made ``embedding``, as the client named it (``Broker-Embedding-Model``).
    embedding_model: str | None = None


# --- magic bytes --------------------------------------------------------------------------

_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"%PDF-", "pdf"),
    (b"OggS", "ogg"),
    (b"fLaC", "flac"),
    (b"ID3", "mp3"),
    (b"\x1a\x45\xdf\xa3", "webm"),
    (b"PK\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BM", "bmp"),
    (b"{\\rtf", "rtf"),
)
_RIFF = {b"WAVE": "wav", b"WEBP": "webp", b"AVI ": "avi"}
_FTYP_AUDIO = {b"M4A ", b"M4B ", b"M4P "}
_FTYP_IMAGE = {b"heic", b"heix", b"avif", b"mif1", b"msf1"}

MAGIC_MODALITY: dict[str, Modality] = {
    "png": Modality.IMAGE,
    "jpeg": Modality.IMAGE,
    "gif": Modality.IMAGE,
    "webp": Modality.IMAGE,
    "bmp": Modality.IMAGE,
    "tiff": Modality.IMAGE,
    "heif": Modality.IMAGE,
    "wav": Modality.AUDIO,
    "mp3": Modality.AUDIO,
    "ogg": Modality.AUDIO,
    "flac": Modality.AUDIO,
    "m4a": Modality.AUDIO,
    "mp4": Modality.VIDEO,
    "webm": Modality.VIDEO,
    "avi": Modality.VIDEO,
    "pdf": Modality.DOCUMENT,
    "zip": Modality.DOCUMENT,  # also docx, xlsx, odt, epub
    "rtf": Modality.DOCUMENT,
}
#: The media type a magic format implies, for capabilities that list content types.
MAGIC_MEDIA_TYPE: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "heif": "image/heif",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "m4a": "audio/mp4",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "avi": "video/x-msvideo",
    "pdf": "application/pdf",
    "zip": "application/zip",
    "gzip": "application/gzip",
    "rtf": "application/rtf",
}


def sniff_magic(payload: bytes) -> str | None:
    """The format named by the payload's first bytes, or ``None``."""
    head = payload[:16]
    if len(head) >= 12:
        if head.startswith(b"RIFF"):
            return _RIFF.get(head[8:12])
        if head[4:8] == b"ftyp":
            brand = head[8:12]
            if brand in _FTYP_AUDIO:
                return "m4a"
            return "heif" if brand in _FTYP_IMAGE else "mp4"
    for prefix, name in _PREFIXES:
        if head.startswith(prefix):
            return name
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
        return "mp3"  # an MPEG audio frame sync without an ID3 tag
    return None


# --- media types --------------------------------------------------------------------------

_DOCUMENT_TYPES = frozenset(
    {
        "application/pdf",
        "application/msword",
        "application/rtf",
        "application/epub+zip",
        "application/vnd.ms-excel",
        "application/vnd.ms-powerpoint",
    }
)
_STRUCTURED_TYPES = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/avro",
        "avro/binary",
        "application/protobuf",
        "application/x-protobuf",
        "application/vnd.google.protobuf",
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack",
        "application/cbor",
        "application/xml",
        "application/yaml",
    }
)
_OPAQUE_TYPES = frozenset({"", DEFAULT_CONTENT_TYPE, "binary/octet-stream"})


def is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def modality_of_media_type(content_type: str) -> Modality | None:
    """The modality a bare media type names, or ``None`` when it says nothing."""
    kind, _, sub = content_type.partition("/")
    if kind in ("text", "image", "audio", "video"):
        return Modality(kind)
    if content_type in _DOCUMENT_TYPES or sub.startswith(
        ("vnd.openxmlformats-officedocument.", "vnd.oasis.opendocument.")
    ):
        return Modality.DOCUMENT
    if content_type in _STRUCTURED_TYPES or sub.endswith(("+json", "+xml", "+avro", "+protobuf")):
        return Modality.STRUCTURED
    return None


# --- headers ------------------------------------------------------------------------------


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def parse_embedding(value: str) -> Vector:
    """A ``Broker-Embedding`` value: base64 of little-endian float32, L2-normalised."""
    if len(value) > _MAX_EMBEDDING_HEADER:
        raise InvalidRoutingHeader(
            f"Broker-Embedding is too long: at most {MAX_EMBEDDING_DIM} float32 values"
        )
    try:
        raw = b64.decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRoutingHeader(
            "Broker-Embedding is not base64 (standard alphabet, padded)"
        ) from None
    if not raw or len(raw) % 4:
        raise InvalidRoutingHeader(
            f"Broker-Embedding decodes to {len(raw)} bytes: expected a non-empty multiple of 4 "
            "(little-endian float32)"
        )
    dim = len(raw) // 4
    if dim > MAX_EMBEDDING_DIM:
        raise InvalidRoutingHeader(
            f"Broker-Embedding has {dim} dimensions; at most {MAX_EMBEDDING_DIM}"
        )
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if not np.isfinite(vector).all():
        raise InvalidRoutingHeader("Broker-Embedding contains NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise InvalidRoutingHeader("Broker-Embedding is a zero vector")
    unit: Vector = (vector / norm).astype(np.float32)
    return unit


def encode_embedding(vector: npt.ArrayLike) -> str:
    """The ``Broker-Embedding`` header value for a vector (the inverse of parsing)."""
    return b64.encode(np.asarray(vector, dtype="<f4").tobytes())


def _parse_text(value: str) -> str | None:
    if len(value) > _MAX_TEXT_HEADER:
        raise InvalidRoutingHeader(
            f"Broker-Text is longer than {_MAX_TEXT_HEADER} characters (percent-encoded)"
        )
    try:
        text = unquote(value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidRoutingHeader("Broker-Text is not percent-encoded UTF-8") from None
    text = text.strip()[:MAX_TEXT_CHARS]
    return text or None


def _parse_model(value: str) -> str | None:
    model = value.strip()
    if not model:
        return None
    if not _MODEL_NAME.fullmatch(model):
        raise InvalidRoutingHeader(
            "Broker-Embedding-Model is not a model name (1-200 printable ASCII characters, no "
            "spaces)"
        )
    return model


def _parse_intent(value: str) -> str | None:
    intent = value.strip().lower()
    if not intent:
        return None
    if not _INTENT.fullmatch(intent):
        raise InvalidRoutingHeader(
            f"Broker-Intent {value[:70]!r} is not a capability action "
            "(1-64 of a-z 0-9 _ . -, starting with a letter or digit)"
        )
    return intent


def _schema_id(value: str | None) -> int | None:
    """The stored schema id; tolerant (``None``) of a header the broker did not write."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 10:
        return None
    return int(value)


# --- payload ------------------------------------------------------------------------------


def entropy(sample: bytes) -> float:
    """Shannon entropy of ``sample`` in bits per byte (0 for an empty sample)."""
    if not sample:
        return 0.0
    counts = np.bincount(np.frombuffer(sample, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(sample)
    return float(-(p * np.log2(p)).sum())


def _looks_like_text(sample: bytes) -> bool:
    """UTF-8 (allowing a character cut at the end of the sample) without control bytes."""
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(sample) - 3 or e.reason != "unexpected end of data":
            return False
    return len(sample.translate(None, _CONTROL_BYTES)) == len(sample)


def _charset(content_type_header: str) -> str:
    for param in content_type_header.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            name = value.strip().strip('"')
            try:
                return codecs.lookup(name).name
            except (LookupError, ValueError):  # ValueError: a NUL in the name
                return "utf-8"
    return "utf-8"


def _decode_text(payload: bytes, charset: str) -> str | None:
    head = payload[: MAX_TEXT_CHARS * 4]
    try:
        text = head.decode(charset, errors="replace")
    except (LookupError, ValueError):  # not a text encoding (base64), or one that has no
        text = head.decode("utf-8", errors="replace")  # "replace" (idna, punycode)
    text = text.strip()[:MAX_TEXT_CHARS]
    return text or None


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def key_words(key: str) -> str:
    """A JSON key as words: ``temperatureC``, ``temperature_c`` and ``temperature-c`` all
    give ``temperature c``."""
    return _CAMEL.sub(" ", key).replace("_", " ").replace("-", " ").replace(".", " ")


@dataclass(slots=True)
class _JsonScan:
    fields: int = 0
    depth: int = 0
    nodes: int = 0
    chars: int = 0
    strings: int = 0
    numbers: int = 0
    keys: dict[str, None] = field(default_factory=dict)  # distinct keys, first seen first

    def walk(self, value: Any, level: int, texts: list[str]) -> None:
        """Count keys, depth and leaf kinds, collect string values and distinct keys, depth
        first, keys in document order; stops at the node budget. Iterative: a document
        nested as deep as the JSON parser allows (1,024) needs no Python stack."""
        stack: list[tuple[Any, int, str | None]] = [(value, level, None)]
        while stack:
            value, level, key = stack.pop()
            if key is not None and len(self.keys) < _MAX_KEYS:
                self.keys[key] = None
            self.nodes += 1
            if self.nodes > MAX_JSON_NODES:
                return
            if isinstance(value, str):
                self.strings += 1
                if self.chars < MAX_TEXT_CHARS and value.strip():
                    texts.append(value)
                    self.chars += len(value) + 1
            elif isinstance(value, bool):
                pass
            elif isinstance(value, (int, float)):
                self.numbers += 1
            elif isinstance(value, dict):
                self.depth = max(self.depth, level + 1)
                self.fields += len(value)
                stack.extend((item, level + 1, k) for k, item in reversed(value.items()))
            elif isinstance(value, list):
                self.depth = max(self.depth, level + 1)
                stack.extend((item, level + 1, None) for item in reversed(value))


def _json_features(
    body: bytes,
) -> tuple[int | None, int | None, str | None, float | None] | None:
    """``(fields, depth, text, numeric share)`` of a JSON body, or ``None`` when it is not
    JSON. The text is the distinct keys as words (field names say what a record is), then
    the string values."""
    if len(body) > MAX_JSON_PARSE:
        # Too large to parse per message: collect string values (not keys) from a prefix.
        texts: list[str] = []
        size = 0
        for match in _JSON_STRING.finditer(body, 0, MAX_TEXT_CHARS * 8):
            if match.group(2):
                continue
            value = match.group(1).decode("utf-8", errors="replace")
            texts.append(value)
            size += len(value) + 1
            if size >= MAX_TEXT_CHARS:
                break
        return None, None, " ".join(texts)[:MAX_TEXT_CHARS] or None, None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    scan = _JsonScan()
    collected: list[str] = []
    scan.walk(value, 0, collected)
    names = " ".join(key_words(k) for k in scan.keys)
    text = " ".join([names, *collected])[:MAX_TEXT_CHARS].strip()
    leaves = scan.strings + scan.numbers
    share = scan.numbers / leaves if leaves else None
    return scan.fields, scan.depth, text or None, share


# --- PDF text -------------------------------------------------------------------------------

_PDF_STREAM = re.compile(rb"<<((?:[^<>]|<<[^<>]*>>){0,2000})>>\s*stream\r?\n")
_PDF_SHOW = re.compile(rb"\((?:[^()\\]|\\.){0,2000}\)\s*(?:Tj|'|\")|\[(?:[^\[\]]){0,4000}\]\s*TJ")
_PDF_LITERAL = re.compile(rb"\(((?:[^()\\]|\\.){0,2000})\)")
_PDF_TITLE = re.compile(rb"/(?:Title|Subject|Keywords)\s*\(((?:[^()\\]|\\.){0,500})\)")
_PDF_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"", b"f": b""}
_PDF_ESCAPE = re.compile(rb"\\([0-7]{1,3}|.)", re.DOTALL)


def _pdf_unescape(raw: bytes) -> str:
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code[:1].isdigit():
            return bytes([int(code, 8) & 0xFF])
        return _PDF_ESCAPES.get(code, code)

    return _PDF_ESCAPE.sub(one, raw).decode("cp1252", errors="replace")


def _pdf_shown(content: bytes, out: list[str], budget: int) -> int:
    """Append the strings shown by ``Tj``/``TJ``/``'``/``"`` in a content stream."""
    for show in _PDF_SHOW.finditer(content):
        for literal in _PDF_LITERAL.finditer(show.group(0)):
            piece = _pdf_unescape(literal.group(1))
            out.append(piece)
            budget -= len(piece) + 1
            if budget <= 0:
                return budget
    return budget


def pdf_text(payload: bytes) -> str | None:
    """The text a PDF shows, read cheaply: literal strings drawn by the text operators of its
    content streams (plain or ``FlateDecode``, inflated up to :data:`MAX_PDF_INFLATE` bytes in
    all), after the document's title, subject and keywords; searched in the first
    :data:`MAX_PDF_SCAN` bytes. Hex strings, font encodings and object streams are not
    decoded: a PDF whose text is only there gives ``None`` (or less text)."""
    head = payload[:MAX_PDF_SCAN]
    out = [_pdf_unescape(m.group(1)) for m in _PDF_TITLE.finditer(head)]
    budget = MAX_TEXT_CHARS
    inflate_left = MAX_PDF_INFLATE
    for match in _PDF_STREAM.finditer(head):
        dictionary, start = match.group(1), match.end()
        end = head.find(b"endstream", start)
        if end < 0:
            break
        data = head[start:end]
        if b"/Filter" in dictionary:
            if b"/FlateDecode" not in dictionary or inflate_left <= 0:
                continue
            try:
                data = zlib.decompressobj().decompress(data, inflate_left)
            except zlib.error:
                continue
            inflate_left -= len(data)
        if b"BT" not in data:
            continue
        budget = _pdf_shown(data, out, budget)
        if budget <= 0:
            break
    text = " ".join(" ".join(out).split())[:MAX_TEXT_CHARS]
    return text or None


def extract(payload: bytes, headers: Mapping[str, str]) -> Features:
    """The routing features of one message (see the module docstring for each rule)."""
    h = _lowered(headers)
    raw_type = h.get(H_CONTENT_TYPE, "")
    content_type = media_type(raw_type) or DEFAULT_CONTENT_TYPE
    sample = payload[:SAMPLE_BYTES]

    schema_id = _schema_id(h.get(H_SCHEMA_ID))
    body = payload
    wire_id = wire_schema_id(content_type, payload)
    if h.get(WIRE_PREFIX.lower()) == NO_WIRE_PREFIX:  # a raw body that starts with 0x00
        wire_id = None
    if wire_id is not None:
        schema_id = wire_id if schema_id is None else schema_id
        body = payload[5:]

    magic = None if wire_id is not None else sniff_magic(payload)
    modality = modality_of_media_type(content_type)
    opaque = content_type in _OPAQUE_TYPES
    json_fields: int | None = None
    json_depth: int | None = None
    numeric_share: float | None = None
    text: str | None = None

    json_like = body[:64].lstrip()[:1] in (b"{", b"[")
    if is_json_type(content_type) or (
        opaque and magic is None and json_like and _looks_like_text(sample)
    ):
        found = _json_features(body)
        if found is not None:
            json_fields, json_depth, text, numeric_share = found
            modality = modality or Modality.STRUCTURED
    if modality is None and magic is not None:
        modality = MAGIC_MODALITY.get(magic)
    if modality is None:
        modality = Modality.TEXT if _looks_like_text(sample) else Modality.SENSOR
    if modality is Modality.TEXT:
        text = _decode_text(payload, _charset(raw_type))
    elif magic == "pdf" or (modality is Modality.DOCUMENT and content_type == "application/pdf"):
        text = pdf_text(payload)

    header_text = h.get(H_TEXT)
    if header_text is not None:
        text = _parse_text(header_text)
    embedding_header = h.get(H_EMBEDDING)
    model_header = h.get(H_EMBEDDING_MODEL)
    intent_header = h.get(H_INTENT)
    env = h.get(H_ENV)
    return Features(
        content_type=content_type,
        modality=modality,
        size=len(payload),
        magic=magic,
        json_fields=json_fields,
        json_depth=json_depth,
        schema_id=schema_id,
        entropy=entropy(sample),
        intent=None if intent_header is None else _parse_intent(intent_header),
        text=text,
        embedding=None if embedding_header is None else parse_embedding(embedding_header),
        env=None if env is None else (env.strip()[:64] or None),
        numeric_share=numeric_share,
        embedding_model=None if model_header is None else _parse_model(model_header),
    )
