"""The NumPy port of all-MiniLM-L6-v2: the model's own embeddings, without torch (that a
fresh process embeds with it and imports no torch is checked, as for every default, in
test_routing_static_embedder.py).

The reference rows (tests/unit/data/minilm_reference.npz) are the model's output under
sentence-transformers, written by ``benchmarks/routing_quality/export_minilm.py
--reference`` in a venv with torch; the port must stay within int8 rounding of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.routing.embedder import EmbedderUnavailable, costly, load_embedder
from broker.routing.minilm import DATA, MiniLMEmbedder

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def reference() -> tuple[list[str], np.ndarray]:
    with np.load(REFERENCE, allow_pickle=False) as data:
        return data["texts"].tobytes().decode().split("\n"), data["rows"]


def test_it_gives_the_models_own_sentence_embeddings(minilm: MiniLMEmbedder) -> None:
    texts, expected = reference()
    rows = minilm.embed(texts)
    cosines = np.sum(rows * expected, axis=1)
    assert cosines.min() > 0.998, cosines  # int8 weights; float32 gives 1.0 to 6 places


def test_a_batch_gives_each_text_what_it_gets_alone(minilm: MiniLMEmbedder) -> None:
    """Texts of different lengths share padded passes; padding must change nothing."""
    texts, _ = reference()
    texts = [*texts, "", "  ", *texts[:3]]
    together = minilm.embed(texts)
    alone = np.vstack([minilm.embed([text]) for text in texts])
    assert np.allclose(together, alone, atol=2e-5)


def test_rows_are_unit_float32_and_blank_text_gives_zero(minilm: MiniLMEmbedder) -> None:
    rows = minilm.embed(["the invoice total", "", " \n ", "what is due on this bill"])
    assert rows.dtype == np.float32
    assert rows.shape == (4, 384)
    assert not rows[1].any()
    assert not rows[2].any()
    assert np.linalg.norm(rows[[0, 3]], axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_it_reads_meaning_and_word_order(minilm: MiniLMEmbedder) -> None:
    a, b, c = minilm.embed(
        ["my card was charged twice", "I was billed two times", "the cat sleeps on the sofa"]
    )
    assert float(a @ b) > float(a @ c) + 0.3
    dog, man = minilm.embed(["the dog bit the man", "the man bit the dog"])
    assert float(dog @ man) < 0.999  # a bag of words could not tell these apart


def test_work_per_text_is_bounded(minilm: MiniLMEmbedder) -> None:
    ids = minilm.token_ids("word " * 10_000)
    assert len(ids) == minilm.max_tokens == 256
    assert ids[0] != ids[-1]  # [CLS] ... [SEP]
    assert minilm.token_ids("x" * 1_000_000)[1] == minilm.token_ids("x" * 101)[1]  # [UNK]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_text_embeds_to_a_unit_or_zero_row(text: str) -> None:
    row = MiniLMEmbedder().embed([text])[0]
    assert np.isfinite(row).all()
    if text.strip():
        assert float(np.linalg.norm(row)) == pytest.approx(1.0, abs=1e-4)
    else:
        assert not row.any()


def test_it_is_a_costly_built_in_spec() -> None:
    embedder = load_embedder("minilm")
    assert isinstance(embedder, MiniLMEmbedder)
    assert costly(embedder)
    assert embedder.name == "minilm-l6"
    with pytest.raises(EmbedderUnavailable, match="takes no argument"):
        load_embedder("minilm:big")


def test_unreadable_weights_are_refused_clearly(tmp_path: Path) -> None:
    broken = tmp_path / "broken.npz"
    broken.write_bytes(DATA.read_bytes()[:1000])
    with pytest.raises(EmbedderUnavailable, match="cannot read the MiniLM weights"):
        MiniLMEmbedder(broken)
