"""The static MiniLM embedder: BERT's own word pieces, unit rows from the shipped table, word
meaning without a model; the ``static+hashing`` blend; and which embedder is the default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.routing.embedder import (
    DEFAULT_SPEC,
    BlendedEmbedder,
    Embedder,
    EmbedderUnavailable,
    HashingEmbedder,
    load_embedder,
)
from broker.routing.minilm import MiniLMEmbedder
from broker.routing.static_embedder import (
    DATA,
    UNKNOWN,
    StaticEmbedder,
    basic_tokens,
    load_table,
    wordpiece,
)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
STATIC = StaticEmbedder()
WORDS = {row: word for word, row in load_table().vocab.items()}
TEXTS = [
    "Please put this letter into German",
    "",
    "Ünïcödé façade naïve — ligatures ﬁne",
    "ticket #4521: VPN drops every 5 minutes",
]
# (text, related text, unrelated text): related pairs share meaning, not words.
PARAPHRASES = [
    ("a cat sits on the mat", "a kitten is lying on a rug", "quarterly stock market report"),
    (
        "my laptop will not turn on after the update",
        "computer fails to boot since installing patches",
        "recipe for a chocolate cake",
    ),
    ("the car needs new tyres", "my automobile requires fresh tires", "a ripe banana is yellow"),
    (
        "Answers questions about employee holidays and paid leave",
        "how many vacation days do I have left",
        "The pump's vibration reading jumped overnight",
    ),
]


def pieces(text: str) -> list[str]:
    """The WordPiece tokens of ``text`` as strings (``[UNK]`` for an unknown word)."""
    vocab = load_table().vocab
    out: list[str] = []
    for word in basic_tokens(text):
        out.extend("[UNK]" if i == UNKNOWN else WORDS[i] for i in wordpiece(word, vocab))
    return out


# --- the tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # as the model's own tokenizer.json (Hugging Face tokenizers) splits them
        ("Hello, world!", ["hello", ",", "world", "!"]),
        (
            "don't stop-believing... (ok?)",
            ["don", "'", "t", "stop", "-", "believing", ".", ".", ".", "(", "ok", "?", ")"],
        ),
        ("naïve café Résumé", ["naive", "cafe", "resume"]),
        ("Ünïcödé façade", ["unicode", "facade"]),
        (
            "supercalifragilisticexpialidocious",
            [
                *("super", "##cal", "##if", "##rag", "##ilis", "##tic"),
                *("##ex", "##pia", "##lid", "##oc", "##ious"),
            ],
        ),
        ("C3PO R2-D2", ["c", "##3", "##po", "r", "##2", "-", "d", "##2"]),
        ("€100 and £20", ["€", "##100", "and", "£2", "##0"]),
        ("x\x00y\x01z\tq\nr", ["x", "##y", "##z", "q", "r"]),  # control characters dropped
        ("東京で", ["東", "京", "て"]),  # each ideograph a word; the kana's voicing mark stripped
        ("emoji 😀 here", ["em", "##oj", "##i", "[UNK]", "here"]),
        ("a" * 101, ["[UNK]"]),  # over 100 characters
        ("", []),
        (" \t\n ", []),
    ],
)
def test_text_splits_into_the_models_own_word_pieces(text: str, expected: list[str]) -> None:
    assert pieces(text) == expected


def test_stop_words_and_unknown_words_add_nothing() -> None:
    assert STATIC.token_ids("😀 🚀") == []
    assert STATIC.token_ids("hello 😀") == STATIC.token_ids("hello")
    assert STATIC.token_ids("The cat and the mat") == STATIC.token_ids("cat mat")
    rows = STATIC.embed(["😀 🚀", "", "a" * 500, "what is it"])
    assert not rows.any()


def test_work_on_a_huge_text_is_bounded() -> None:
    """Only the first ``max_chars`` characters are split and at most ``max_tokens`` kept."""
    words = STATIC.token_ids("invoice " * 200_000)
    assert len(words) == STATIC.max_tokens == 512
    small = StaticEmbedder(max_tokens=3, max_chars=20)
    assert len(small.token_ids("one two three four five six")) == 3
    assert small.token_ids(" " * 20 + "cat") == []  # "cat" lies past the first 20 characters
    assert not STATIC.embed(["y" * 10_000_000]).any()  # its first 8192 characters: one word


# --- vectors ----------------------------------------------------------------------------------


def test_static_embedder_gives_unit_float32_rows_of_its_dimension() -> None:
    assert isinstance(STATIC, Embedder)
    assert (STATIC.name, STATIC.dim) == ("static-minilm-128", 128)
    rows = STATIC.embed(TEXTS)
    assert rows.shape == (4, 128)
    assert rows.dtype == np.float32
    norms = np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(norms[[0, 2, 3]], 1.0, rtol=1e-5)
    assert norms[1] == 0.0


def test_the_word_memo_does_not_change_vectors() -> None:
    forgetful = StaticEmbedder(memo=2)
    for text in TEXTS * 3:
        assert np.array_equal(forgetful.embed([text]), STATIC.embed([text]))


@pytest.mark.parametrize(("text", "related", "unrelated"), PARAPHRASES)
def test_paraphrases_are_closer_than_unrelated_text(
    text: str, related: str, unrelated: str
) -> None:
    """Meaning without shared words: the static table knows what hashing cannot."""
    anchor, near, far = STATIC.embed([text, related, unrelated])
    assert float(anchor @ near) > float(anchor @ far) + 0.25
    anchor, near, far = load_embedder(None).embed([text, related, unrelated])
    assert float(anchor @ near) > float(anchor @ far) + 0.2


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_unit_or_zero_row(text: str) -> None:
    row = STATIC.embed([text])[0]
    norm = float(np.linalg.norm(row))
    assert norm == 0.0 or abs(norm - 1.0) < 1e-5
    assert (norm == 0.0) == (not STATIC.token_ids(text))
    assert len(STATIC.token_ids(text)) <= STATIC.max_tokens


def test_a_missing_or_broken_table_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(EmbedderUnavailable, match="cannot read the static embedding table"):
        StaticEmbedder(tmp_path / "missing.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(EmbedderUnavailable, match="cannot read the static embedding table"):
        StaticEmbedder(broken)


def test_the_table_ships_with_its_provenance() -> None:
    meta = load_table().meta
    assert meta["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["license"] == "Apache-2.0"
    assert DATA.stat().st_size < 4 * 2**20


# --- the blend and the default ----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["static+hashing", " Static+Hashing "])
def test_the_static_hashing_spec_blends_the_static_table_with_hashing(spec: str) -> None:
    embedder = load_embedder(spec)
    assert isinstance(embedder, BlendedEmbedder)
    (static, static_share), (hashing, hashing_share) = embedder.parts
    assert isinstance(static, StaticEmbedder)
    assert isinstance(hashing, HashingEmbedder)
    assert (static_share, hashing_share) == pytest.approx((0.9, 0.1))
    assert embedder.dim == 128 + 384


@pytest.mark.parametrize("spec", [None, "", "  "])
def test_the_default_embedder_is_minilm_in_numpy(spec: str | None) -> None:
    assert DEFAULT_SPEC == "minilm"
    assert isinstance(load_embedder(spec), MiniLMEmbedder)


def test_a_blends_cosine_is_the_share_weighted_mean_of_its_parts() -> None:
    blend = load_embedder("static+hashing:0.3")
    assert isinstance(blend, BlendedEmbedder)
    a, b = "reset my VPN password please", "my VPN login stopped working"
    rows = blend.embed([a, b])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    static = STATIC.embed([a, b])
    hashing = HashingEmbedder().embed([a, b])
    expected = 0.7 * float(static[0] @ static[1]) + 0.3 * float(hashing[0] @ hashing[1])
    assert float(rows[0] @ rows[1]) == pytest.approx(expected, abs=1e-5)


def test_a_part_with_no_words_leaves_the_other_to_decide() -> None:
    """Punctuation only: hashing sees no word, the blend's row is the static one; one
    over-long word: the static table knows none of it, the row is the hashing one."""
    blend = load_embedder("static+hashing")
    marks, long_word = blend.embed(["?!", "z" * 150])
    np.testing.assert_allclose(np.linalg.norm([marks, long_word], axis=1), 1.0, rtol=1e-5)
    assert not marks[128:].any()
    np.testing.assert_allclose(marks[:128], STATIC.embed(["?!"])[0], atol=1e-6)
    assert not long_word[:128].any()
    np.testing.assert_allclose(long_word[128:], HashingEmbedder().embed(["z" * 150])[0], atol=1e-6)
    assert not blend.embed(["", "the of and"]).any()  # nothing, or stop words only


def test_static_and_hashing_specs_stay_selectable() -> None:
    static = load_embedder("static")
    assert isinstance(static, StaticEmbedder)
    hashing = load_embedder("hashing")
    assert isinstance(hashing, HashingEmbedder)
    assert hashing.dim == 384
    assert hashing.embed(["hello world"]).shape == (1, 384)


def test_a_blend_needs_positive_shares() -> None:
    with pytest.raises(EmbedderUnavailable, match="positive, finite shares"):
        BlendedEmbedder([(STATIC, 1.0), (HashingEmbedder(), 0.0)])
    with pytest.raises(EmbedderUnavailable, match="positive, finite shares"):
        BlendedEmbedder([])


def test_the_default_embedder_needs_no_torch_and_no_network() -> None:
    """A fresh interpreter builds the default embedder and embeds text without importing
    torch, sentence-transformers or any HTTP client."""
    script = (
        "import sys; from broker.routing.embedder import load_embedder; "
        "load_embedder(None).embed(['hello world']); "
        "heavy = {'torch', 'sentence_transformers', 'transformers', 'huggingface_hub'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_the_policy_threshold_follows_the_embedder_unless_the_policy_sets_one() -> None:
    """The static table's cosines run higher than hashing's, so its calibrated threshold is
    higher; a policy that names a threshold keeps it whatever the embedder."""
    from broker.routing.embedder import (
        DEFAULT_THRESHOLD,
        STATIC_THRESHOLD,
        HashingEmbedder,
        load_embedder,
    )
    from broker.routing.policy import Policy
    from broker.routing.scoring import Scorer

    assert Scorer(load_embedder("static+hashing")).policy.threshold == STATIC_THRESHOLD
    assert Scorer(load_embedder("static")).policy.threshold == STATIC_THRESHOLD
    assert Scorer(load_embedder(None)).policy.threshold == DEFAULT_THRESHOLD  # minilm
    assert Scorer(HashingEmbedder()).policy.threshold == DEFAULT_THRESHOLD
    assert Scorer(load_embedder(None), Policy(threshold=0.05)).policy.threshold == 0.05
