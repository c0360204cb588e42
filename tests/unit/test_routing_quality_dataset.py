"""The routing-quality evaluation's dataset (benchmarks/routing_quality): sound, varied, real.

Checks the properties issue 10 asks of the set: valid manifests, labels that name agents,
enough requests of every modality, binary payloads that are real files, text phrased without
the label agent's own keywords; and the scoring and decision parsing of the runner. The
dev set (``dev_requests.yaml``, for tuning) is held to the same checks, and shares no
request with the held-out evaluation.
"""

from __future__ import annotations

import io
import re
import struct
import wave
import zlib
from collections import Counter
from urllib.parse import unquote

import orjson
import pytest

from benchmarks.routing_quality import payloads
from benchmarks.routing_quality.dataset import (
    HERE,
    Dataset,
    Modality,
    Request,
    load,
    problems,
)
from benchmarks.routing_quality.run import _stored_decision, _top3
from benchmarks.routing_quality.scoring import Outcome, Summary
from broker.registry.manifest import validate_manifest

pytestmark = pytest.mark.unit

#: Words that give the label away, per agent: a text request must not use its label's.
GIVEAWAYS = {
    "invoice-extractor": ("invoice", "receipt", "extract"),
    "photo-ocr": ("ocr", "optical"),
    "speech-transcriber": ("transcri", "speech"),
    "meeting-summarizer": ("summar", "meeting", "action item"),
    "code-reviewer": ("review",),
    "sql-analyst": ("sql", "query", "warehouse"),
    "translator": ("translat",),
    "support-triage": ("triage", "ticket"),
    "image-captioner": ("caption", "alt text"),
    "content-moderator": ("moderat",),
    "sensor-anomaly": ("anomal", "sensor", "telemetry"),
    "contract-reviewer": ("contract", "legal"),
    "calendar-scheduler": ("schedul", "calendar", "meeting"),
    "expense-auditor": ("expense", "audit"),
}


DEV_FILE = HERE / "dev_requests.yaml"


@pytest.fixture(scope="module", params=["evaluation", "dev"])
def dataset(request: pytest.FixtureRequest) -> Dataset:
    return load() if request.param == "evaluation" else load(requests_file=DEV_FILE)


def test_the_dev_set_is_larger_than_and_shares_no_request_with_the_evaluation() -> None:
    evaluation, dev = load(), load(requests_file=DEV_FILE)
    assert len(dev.requests) >= 150
    assert not {r.id for r in dev.requests} & {r.id for r in evaluation.requests}
    held_out = {(r.plain_text().strip().lower(), r.body) for r in evaluation.requests}
    assert not {(r.plain_text().strip().lower(), r.body) for r in dev.requests} & held_out
    assert not {r.plain_text().strip().lower() for r in dev.requests if r.plain_text()} & {
        r.plain_text().strip().lower() for r in evaluation.requests
    }


def _accepting(dataset: Dataset, prefix: str) -> set[str]:
    return {
        str(agent["name"])
        for agent in dataset.agents
        for capability in agent["capabilities"]
        if any(t.startswith(prefix) for t in capability.get("content_types", []))
    }


def test_dataset_has_no_problems(dataset: Dataset) -> None:
    """The dataset's own check (what run.py --check prints) finds nothing."""
    assert problems(dataset) == []


def test_every_agent_is_a_valid_manifest_with_a_one_sentence_description(
    dataset: Dataset,
) -> None:
    assert len(dataset.agents) >= 12
    for agent in dataset.agents:
        manifest = validate_manifest(agent)
        assert manifest.description.endswith(".")
        assert ". " not in manifest.description, manifest.name
        for capability in manifest.capabilities:
            assert capability.description, (manifest.name, capability.action)
            assert capability.content_types or capability.modalities
            assert len(capability.examples) >= 1, (manifest.name, capability.action)


def test_agents_overlap_on_images_audio_and_documents(dataset: Dataset) -> None:
    assert len(_accepting(dataset, "image/")) >= 3
    assert len(_accepting(dataset, "audio/")) >= 2
    assert len(_accepting(dataset, "application/pdf")) >= 3
    assert len(_accepting(dataset, "application/json")) >= 3


def test_manifest_examples_are_not_copies_of_requests(dataset: Dataset) -> None:
    examples = {
        e.strip().lower()
        for agent in dataset.agents
        for capability in agent["capabilities"]
        for e in capability.get("examples", [])
    }
    texts = {r.plain_text().strip().lower() for r in dataset.requests}
    assert not examples & texts


def test_every_label_names_an_agent_and_every_agent_is_someones_label(dataset: Dataset) -> None:
    names = set(dataset.agent_names)
    labels = Counter(r.label for r in dataset.requests)
    assert set(labels) <= names
    assert {n: labels[n] for n in names if labels[n] < 3} == {}


def test_at_least_sixty_requests_with_a_mix_of_modalities(dataset: Dataset) -> None:
    requests = dataset.requests
    assert len(requests) >= 60
    mix = Counter(r.modality for r in requests)
    for modality in (Modality.IMAGE, Modality.AUDIO, Modality.DOCUMENT, Modality.SENSOR):
        assert mix[modality] >= 6, modality
    assert mix[Modality.TEXT] >= 25
    bare = [r for r in requests if r.payload_kind and not r.text]
    assert {r.modality for r in bare} >= {Modality.IMAGE, Modality.AUDIO}
    assert sum(1 for r in requests if r.intent) >= 3
    assert sum(1 for r in requests if r.hard) >= 5
    assert all(r.note for r in requests if r.hard)


def test_text_requests_avoid_their_label_agents_keywords(dataset: Dataset) -> None:
    """What people wrote (text bodies, Broker-Text); JSON field names are a schema, not words."""
    leaks = {}
    for request in dataset.requests:
        body = request.body.decode() if request.content_type.startswith("text/") else ""
        words = f"{request.text or ''} {body}".lower()
        hits = [w for w in GIVEAWAYS[request.label] if w in words]
        if hits:
            leaks[request.id] = hits
    assert leaks == {}


def test_broker_text_is_sent_percent_encoded(dataset: Dataset) -> None:
    for request in dataset.requests:
        headers = request.headers()
        assert headers["content-type"] == request.content_type
        if request.text:
            assert headers["broker-text"].isascii()
            assert unquote(headers["broker-text"]) == request.text
        else:
            assert "broker-text" not in headers


def test_json_requests_are_json_and_sensor_ones_carry_numbers(dataset: Dataset) -> None:
    for request in dataset.requests:
        if request.content_type == "application/json":
            orjson.loads(request.body)
        if request.modality is Modality.SENSOR:
            assert re.search(rb"\d+\.\d", request.body), request.id


# --------------------------------------------------------------------------- payloads


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data.startswith(payloads.PNG_MAGIC)
    chunks, at = [], len(payloads.PNG_MAGIC)
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        at += 12 + length
    return chunks


def test_png_payload_has_valid_chunks_and_pixel_data() -> None:
    chunks = _png_chunks(payloads.png(40, 24, seed=3))
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, colour) == (40, 24, 8, 2)
    assert len(zlib.decompress(chunks[1][1])) == height * (1 + width * 3)


def _jpeg_markers(data: bytes) -> list[tuple[int, bytes]]:
    assert data.startswith(payloads.JPEG_MAGIC)
    assert data.endswith(b"\xff\xd9")
    markers, at = [], 2
    while True:
        assert data[at] == 0xFF
        marker = data[at + 1]
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        markers.append((marker, data[at + 4 : at + 2 + length]))
        at += 2 + length
        if marker == 0xDA:  # entropy-coded data up to EOI: only stuffed 0xFF bytes inside
            scan = data[at:-2]
            assert all(scan[i + 1] == 0 for i in range(len(scan) - 1) if scan[i] == 0xFF)
            return markers


def test_jpeg_payload_is_a_jfif_baseline_with_tables_frame_and_scan() -> None:
    markers = _jpeg_markers(payloads.jpeg(48, 32, seed=4))
    kinds = [m for m, _ in markers]
    assert kinds == [0xE0, 0xDB, 0xC0, 0xC4, 0xC4, 0xDA]
    assert markers[0][1].startswith(b"JFIF\x00")
    precision, height, width, components = struct.unpack(">BHHB", markers[2][1][:6])
    assert (precision, height, width, components) == (8, 32, 48, 3)
    for _, table in (markers[3], markers[4]):  # Huffman counts add up to the symbols given
        assert sum(table[1:17]) == len(table) - 17


def test_wav_payload_is_pcm_the_standard_library_reads() -> None:
    data = payloads.wav(0.5, seed=2, rate=8000)
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        frames = w.readframes(w.getnframes())
    assert w.getnframes() == 4000
    assert max(abs(s) for s in struct.unpack(f"<{len(frames) // 2}h", frames)) > 1000


def test_pdf_payload_has_a_cross_reference_table_that_points_at_its_objects() -> None:
    data = payloads.pdf(["INVOICE (copy)", "Total: 12.50 EUR"], title="t")
    assert data.startswith(b"%PDF-1.4\n")
    assert data.rstrip().endswith(b"%%EOF")
    startxref = int(data.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    assert data[startxref:].startswith(b"xref\n")
    lines = data[startxref:].split(b"\n")
    count = int(lines[1].split()[1])
    for number, entry in enumerate(lines[3 : 3 + count - 1], start=1):
        offset = int(entry[:10])
        assert data[offset:].startswith(b"%d 0 obj\n" % number)
    assert b"(INVOICE \\(copy\\)) Tj" in data


def test_generated_payloads_are_deterministic_and_match_their_content_type(
    dataset: Dataset,
) -> None:
    spec = {"kind": "jpeg", "width": 16, "height": 8, "seed": 7}
    assert payloads.build(spec) == payloads.build(spec)
    assert payloads.build(spec) != payloads.build({**spec, "seed": 8})
    for request in dataset.requests:
        if request.payload_kind:
            assert request.content_type == payloads.CONTENT_TYPES[request.payload_kind]
            assert request.body.startswith(payloads.MAGIC[request.payload_kind])
    with pytest.raises(ValueError, match="payload kind"):
        payloads.build({"kind": "gif"})


# --------------------------------------------------------------------------- scoring


def _request(rid: str, label: str, modality: Modality, *, hard: bool = False) -> Request:
    return Request(rid, label, modality, "text/plain", b"x", hard=hard)


def test_summary_counts_accuracy_per_modality_and_confusion_pairs() -> None:
    a, b = _request("1", "ocr", Modality.IMAGE), _request("2", "ocr", Modality.IMAGE, hard=True)
    c, d = _request("3", "asr", Modality.AUDIO), _request("4", "ocr", Modality.TEXT)
    summary = Summary(
        "s",
        [
            Outcome.of(a, "ocr", ("ocr", "cap")),
            Outcome.of(b, "cap", ("cap", "ocr")),
            Outcome.of(c, None),
            Outcome.of(d, "cap", ("cap", "asr")),
        ],
    )
    assert summary.overall.accuracy == 0.25
    assert summary.top3 is not None
    assert summary.top3.correct == 2
    assert {m: x.correct for m, x in summary.by_modality().items()} == {
        "audio": 0,
        "image": 1,
        "text": 0,
    }
    assert summary.hard().n == 1
    assert summary.confusion() == [("ocr", "cap", 2), ("asr", "(none)", 1)]
    assert "  confusion pairs (label -> chosen: count):" in summary.lines()
    assert orjson.loads(orjson.dumps(summary.to_dict()))["top1"]["correct"] == 1


def test_stored_route_decided_record_gives_the_message_seq_and_agent() -> None:
    route = {"agent": "ocr", "reason": "scored", "message_seq": 12, "attempt": 1, "mirror": False}
    record = {
        "subject": "route.default.ocr",
        "headers": {"Broker-Event": "RouteDecided", "Broker-Route": orjson.dumps(route).decode()},
    }
    assert _stored_decision(record) == (12, route)
    assert _stored_decision({"headers": {"Broker-Event": "Other"}}) is None


def test_top3_ranks_distinct_agents_by_score() -> None:
    decision = {
        "candidates": [
            {"agent": "a", "capability": "x", "score": 0.2},
            {"agent": "b", "capability": "y", "score": 0.9},
            {"agent": "b", "capability": "z", "score": 0.8},
            {"agent": "c", "capability": "x", "score": 0.5},
            {"agent": "d", "capability": "x", "score": 0.1},
        ]
    }
    assert _top3(decision) == ("b", "c", "a")
    assert _top3(None) == ()
