"""Routing features: modality from type, magic bytes and sniffing; bounded; hostile headers."""

from __future__ import annotations

import base64
import math
import struct
import zlib
from urllib.parse import quote

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.registry.manifest import Modality
from broker.routing.features import (
    MAX_TEXT_CHARS,
    InvalidRoutingHeader,
    encode_embedding,
    entropy,
    extract,
    key_words,
    parse_embedding,
    pdf_text,
    sniff_magic,
)

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(64))
WAV = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + bytes(24)
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
MP4 = b"\x00\x00\x00\x18ftypisom" + bytes(16)
M4A = b"\x00\x00\x00\x18ftypM4A " + bytes(16)
WEBM = b"\x1a\x45\xdf\xa3" + bytes(16)
MP3 = b"ID3\x04\x00\x00" + bytes(16)
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("payload", "magic", "modality"),
    [
        (PNG, "png", Modality.IMAGE),
        (JPEG, "jpeg", Modality.IMAGE),
        (b"GIF89a" + bytes(10), "gif", Modality.IMAGE),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp", Modality.IMAGE),
        (WAV, "wav", Modality.AUDIO),
        (MP3, "mp3", Modality.AUDIO),
        (b"\xff\xfb\x90\x64" + bytes(12), "mp3", Modality.AUDIO),
        (b"OggS\x00\x02" + bytes(10), "ogg", Modality.AUDIO),
        (b"fLaC\x00\x00\x00\x22" + bytes(8), "flac", Modality.AUDIO),
        (M4A, "m4a", Modality.AUDIO),
        (MP4, "mp4", Modality.VIDEO),
        (WEBM, "webm", Modality.VIDEO),
        (PDF, "pdf", Modality.DOCUMENT),
        (b"PK\x03\x04" + bytes(26), "zip", Modality.DOCUMENT),
    ],
)
def test_untyped_binary_payloads_are_classified_by_magic_bytes(
    payload: bytes, magic: str, modality: Modality
) -> None:
    features = extract(payload, {"Content-Type": "application/octet-stream"})
    assert features.magic == magic
    assert features.modality is modality
    assert features.content_type == "application/octet-stream"
    assert features.text is None
    assert features.size == len(payload)


def test_the_declared_content_type_wins_over_magic_bytes() -> None:
    features = extract(PNG, {"content-type": "application/pdf"})
    assert features.modality is Modality.DOCUMENT
    assert features.magic == "png"  # still reported, for audit


def test_typed_media_is_classified_by_its_type_without_a_signature() -> None:
    assert extract(b"raw samples", {"Content-Type": "audio/L16"}).modality is Modality.AUDIO
    assert extract(b"\x00\x01", {"Content-Type": "video/x-custom"}).modality is Modality.VIDEO
    docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    assert extract(b"PK\x03\x04", {"Content-Type": docx}).modality is Modality.DOCUMENT


def test_json_payload_counts_fields_and_depth_and_gives_its_keys_and_strings_as_text() -> None:
    body = orjson.dumps(
        {"question": "Translate this letter", "meta": {"lang": "fr", "n": 3}, "tags": ["a", 1]}
    )
    features = extract(body, {"Content-Type": "application/json; charset=utf-8"})
    assert features.content_type == "application/json"
    assert features.modality is Modality.STRUCTURED
    assert features.json_fields == 5  # question, meta, tags, lang, n
    assert features.json_depth == 2
    assert features.text == "question meta lang n tags Translate this letter fr a"
    assert features.numeric_share == pytest.approx(2 / 5)  # 3, 1 of "Transl..", fr, a, 3, 1


def test_untyped_json_is_sniffed_as_structured() -> None:
    features = extract(b'  {"text": "hello world"}', {})
    assert features.modality is Modality.STRUCTURED
    assert features.json_fields == 1
    assert features.text == "text hello world"


def test_plain_text_is_the_text_to_embed() -> None:
    features = extract("Résumé of the meeting".encode(), {"Content-Type": "text/plain"})
    assert features.modality is Modality.TEXT
    assert features.text == "Résumé of the meeting"
    assert features.json_fields is None


def test_text_honours_its_declared_charset() -> None:
    features = extract("café".encode("latin-1"), {"Content-Type": "text/plain; charset=latin-1"})
    assert features.text == "café"


@pytest.mark.parametrize("charset", ["base64", "no-such-charset", '"utf-8"', "zlib"])
def test_a_bogus_charset_falls_back_to_utf8(charset: str) -> None:
    features = extract(b"hello", {"Content-Type": f"text/plain; charset={charset}"})
    assert features.text == "hello"


@pytest.mark.parametrize("charset", ["idna", "punycode"])
def test_a_charset_that_cannot_replace_bad_bytes_falls_back_to_utf8(charset: str) -> None:
    """idna and punycode raise on bytes they do not take, whatever the error handler: that
    was a 500 from POST /v1/route."""
    features = extract(b"caf\xc3\xa9 \xff", {"Content-Type": f"text/plain; charset={charset}"})
    assert features.text == "caf\u00e9 \ufffd"


def test_untyped_utf8_text_is_sniffed_as_text() -> None:
    features = extract(b"please summarise this", {})
    assert features.content_type == "application/octet-stream"
    assert features.modality is Modality.TEXT
    assert features.text == "please summarise this"


def test_an_empty_payload_is_text_without_text() -> None:
    features = extract(b"", {})
    assert features.modality is Modality.TEXT
    assert features.text is None
    assert features.size == 0
    assert features.entropy == 0.0
    assert features.magic is None


def test_opaque_binary_without_a_signature_is_sensor_data() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    features = extract(b"\x01\x02" + noise, {})
    assert features.modality is Modality.SENSOR
    assert features.text is None
    assert 7.5 < features.entropy <= 8.0


def test_schema_id_comes_from_the_stored_header_or_the_wire_prefix() -> None:
    framed = b"\x00" + (42).to_bytes(4, "big") + b'{"a": "b"}'
    wire = extract(framed, {"Content-Type": "application/json"})
    assert wire.schema_id == 42
    assert wire.json_fields == 1  # the prefix is skipped before parsing
    assert extract(b"{}", {"Broker-Schema-Id": "7"}).schema_id == 7
    assert extract(b"{}", {"Broker-Schema-Id": "x7"}).schema_id is None  # tolerated
    # A binary type's leading zero byte is not a schema frame.
    assert extract(framed, {"Content-Type": "image/png"}).schema_id is None


def test_routing_headers_are_read_case_insensitively() -> None:
    vector = np.array([3.0, 4.0], dtype=np.float32)
    features = extract(
        b"",
        {
            "BROKER-INTENT": " OCR ",
            "broker-text": quote("café au lait"),
            "Broker-Embedding": encode_embedding(vector),
            "X-Env": "canary",
        },
    )
    assert features.intent == "ocr"
    assert features.text == "café au lait"
    assert features.env == "canary"
    assert features.embedding is not None
    np.testing.assert_allclose(features.embedding, [0.6, 0.8], rtol=1e-6)
    assert features.embedding.dtype == np.float32


def test_broker_text_wins_over_the_payload_text() -> None:
    features = extract(b"ignored", {"Content-Type": "text/plain", "Broker-Text": "used%20here"})
    assert features.text == "used here"


@pytest.mark.parametrize(
    ("headers", "complaint"),
    [
        ({"Broker-Embedding": "not base64!!"}, "not base64"),
        ({"Broker-Embedding": base64.b64encode(b"\x00\x00\x80").decode()}, "multiple of 4"),
        ({"Broker-Embedding": ""}, "multiple of 4"),
        ({"Broker-Embedding": encode_embedding([1.0, math.nan])}, "NaN"),
        ({"Broker-Embedding": encode_embedding([math.inf, 1.0])}, "NaN or infinite"),
        ({"Broker-Embedding": encode_embedding([0.0, 0.0])}, "zero vector"),
        ({"Broker-Embedding": encode_embedding(np.ones(5000))}, "too long"),
        ({"Broker-Embedding": "A" * 10_000_000}, "too long"),
        ({"Broker-Text": "%ff%fe"}, "UTF-8"),
        ({"Broker-Text": "a" * 70_000}, "longer than"),
        ({"Broker-Intent": "no spaces allowed"}, "not a capability action"),
        ({"Broker-Intent": "x" * 65}, "not a capability action"),
        ({"Broker-Embedding-Model": "all MiniLM"}, "not a model name"),
        ({"Broker-Embedding-Model": "m" * 201}, "not a model name"),
        ({"Broker-Embedding-Model": "modèle"}, "not a model name"),
    ],
)
def test_hostile_routing_headers_get_a_clear_422(headers: dict[str, str], complaint: str) -> None:
    with pytest.raises(InvalidRoutingHeader) as caught:
        extract(b"hello", headers)
    assert caught.value.status == 422
    assert caught.value.error_code == "invalid_routing_header"
    assert complaint in caught.value.message


def test_embedding_dimension_limit_is_4096() -> None:
    assert parse_embedding(encode_embedding(np.ones(4096))).shape == (4096,)


def test_an_embedding_near_the_float32_limit_is_still_normalised() -> None:
    parsed = parse_embedding(encode_embedding([3e38, 3e38]))
    np.testing.assert_allclose(parsed, [math.sqrt(0.5)] * 2, rtol=1e-6)


def test_a_huge_text_payload_is_read_only_up_to_the_text_bound() -> None:
    payload = b"word " * 4_000_000  # 20 MB
    features = extract(payload, {"Content-Type": "text/plain"})
    assert features.text is not None
    assert len(features.text) <= MAX_TEXT_CHARS
    assert features.size == len(payload)


def test_a_large_json_payload_is_not_parsed_but_still_gives_text() -> None:
    body = orjson.dumps({"prompt": "describe the image", "blob": ["x" * 100] * 5000})
    features = extract(body, {"Content-Type": "application/json"})
    assert features.json_fields is None  # over the parse bound
    assert features.text is not None
    assert features.text.startswith("describe the image")
    assert len(features.text) <= MAX_TEXT_CHARS


def test_deeply_nested_json_does_not_break_extraction() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    features = extract(body, {"Content-Type": "application/json"})
    assert features.modality is Modality.STRUCTURED
    assert features.json_depth is None  # orjson refuses it: not counted


def test_entropy_is_bits_per_byte() -> None:
    assert entropy(b"") == 0.0
    assert entropy(b"aaaa") == 0.0
    assert entropy(b"ab" * 100) == pytest.approx(1.0)
    assert entropy(bytes(range(256))) == pytest.approx(8.0)


def test_sniff_magic_needs_whole_signatures() -> None:
    assert sniff_magic(b"\x89PN") is None
    assert sniff_magic(b"RIFF\x00\x00\x00\x00XXXX") is None


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=2048),
    content_type=st.sampled_from(
        ["", "application/json", "text/plain", "image/png", "application/octet-stream", "x/y"]
    ),
)
def test_any_payload_extracts_without_error_and_within_bounds(
    payload: bytes, content_type: str
) -> None:
    features = extract(payload, {"Content-Type": content_type} if content_type else {})
    assert 0.0 <= features.entropy <= 8.0
    assert features.text is None or 0 < len(features.text) <= MAX_TEXT_CHARS
    assert features.size == len(payload)
    assert isinstance(features.modality, Modality)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64)
)
def test_embeddings_round_trip_as_unit_vectors(values: list[float]) -> None:
    """Any finite non-zero vector, even near the float32 limits, comes back L2-normalised."""
    vector = np.array(values, dtype=np.float32)
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    header = encode_embedding(vector)
    if norm == 0.0:
        with pytest.raises(InvalidRoutingHeader):
            parse_embedding(header)
        return
    parsed = parse_embedding(header)
    assert parsed.shape == vector.shape
    assert abs(float(np.linalg.norm(parsed)) - 1.0) < 1e-3


def _pdf(content: bytes, *, flate: bool = False, title: bytes | None = None) -> bytes:
    stream = zlib.compress(content) if flate else content
    filters = b" /Filter /FlateDecode" if flate else b""
    info = b"" if title is None else b"6 0 obj\n<< /Title (" + title + b") >>\nendobj\n"
    return (
        b"%%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n4 0 obj\n<< /Length %d%s >>\nstream\n"
        % (len(stream), filters)
        + stream
        + b"\nendstream\nendobj\n"
        + info
        + b"%%EOF\n"
    )


def test_a_pdf_gives_the_text_its_pages_show() -> None:
    content = (
        b"BT /F1 11 Tf 56 780 Td (Total due: EUR 12) Tj T* [(Pay) -250 (able \\(net\\))] TJ ET"
    )
    for flate in (False, True):
        features = extract(_pdf(content, flate=flate, title=b"Invoice 7"), {})
        assert features.modality is Modality.DOCUMENT
        assert features.text == "Invoice 7 Total due: EUR 12 Pay able (net)"


def test_pdf_text_reading_is_bounded_and_tolerates_garbage() -> None:
    broken = b"%PDF-1.4\n<< /Filter /FlateDecode /Length 9 >>\nstream\nnot-zlib!\nendstream\n"
    assert pdf_text(broken) is None
    assert pdf_text(b"%PDF-1.4\n<< /Length 5 >>\nstream\nBT (x") is None  # no endstream
    inflated = pdf_text(_pdf(b"BT " + b"(word) Tj " * 200_000 + b"ET", flate=True))
    assert inflated is not None
    assert len(inflated) <= MAX_TEXT_CHARS


@pytest.mark.parametrize(
    ("key", "words"),
    [("temperature_c", "temperature c"), ("vibrationMmS", "vibration Mm S"), ("a-b.c", "a b c")],
)
def test_json_keys_are_read_as_words(key: str, words: str) -> None:
    assert key_words(key) == words


def test_numeric_share_tells_telemetry_from_records() -> None:
    readings = extract(orjson.dumps({"id": "pump-3", "rpm": [1200, 1210, 1190.5]}), JSON)
    record = extract(orjson.dumps({"name": "Ann", "city": "Oslo", "age": 41}), JSON)
    assert readings.numeric_share == pytest.approx(0.75)
    assert record.numeric_share == pytest.approx(1 / 3)
    assert extract(b"plain", {"Content-Type": "text/plain"}).numeric_share is None


def test_json_nested_as_deep_as_the_parser_allows_is_scanned_without_recursion() -> None:
    """orjson parses 1,000 levels; the scan used to recurse once per level and raised
    RecursionError, which took the router down on every restart (the message came back)."""
    body = b'{"a":' * 1000 + b'"deep"' + b"}" * 1000
    features = extract(body, {"content-type": "application/json"})
    assert features.text is not None
    assert "deep" in features.text


def test_broker_embedding_model_is_read_as_given_and_blank_means_none() -> None:
    sent = {"Broker-Embedding": encode_embedding(np.ones(4))}
    named = extract(b"", {**sent, "Broker-Embedding-Model": " BAAI/bge-small-en-v1.5 "})
    assert named.embedding_model == "BAAI/bge-small-en-v1.5"
    assert extract(b"", {**sent, "Broker-Embedding-Model": "  "}).embedding_model is None
    assert extract(b"", sent).embedding_model is None
