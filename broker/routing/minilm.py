"""all-MiniLM-L6-v2 in NumPy: a real sentence-embedding model with no torch and no download.

:class:`MiniLMEmbedder` runs the six-layer BERT encoder of all-MiniLM-L6-v2 (384 hidden,
12 heads) with NumPy matrix products, mean-pools the last layer over the text's tokens
and normalises, as sentence-transformers does. The weights ship with the package
(``data/minilm_l6.npz``, int8 with a scale per output column, made by
``benchmarks/routing_quality/export_minilm.py``); the tokenizer is the static embedder's
WordPiece (BERT uncased), with ``[CLS]``/``[SEP]`` and unknown words as ``[UNK]``. A
sentence embedding comes out within a cosine of 0.998 of the model's own under
sentence-transformers.

It reads word order and context, which the static table cannot, at the price of a few
milliseconds per text on a CPU core. It is a costly embedder
(:func:`broker.routing.embedder.costly`): a router embeds each fetched batch in one call on
a thread of its own. Work per text is bounded: the first ``max_chars`` characters, the
model's 256 tokens. A batch runs in chunks of similar length, so short texts are not padded
to the longest.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from broker.routing.embedder import DEFAULT_THRESHOLD, EmbedderUnavailable, Matrix
from broker.routing.static_embedder import UNKNOWN, basic_tokens, read_routing_data, wordpiece

DATA = Path(__file__).resolve().parent / "data" / "minilm_l6.npz"
_CHUNK = 32  # texts per forward pass in a batch (sorted by length first)

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv: Floats
    qkv_bias: Floats
    out: Floats
    out_bias: Floats
    ln1: Floats
    up: Floats
    up_bias: Floats
    down: Floats
    down_bias: Floats
    ln2: Floats


@dataclass(frozen=True, slots=True)
class MiniLMWeights:
    """The model, dequantised to float32 (about 90 MB in memory)."""

    vocab: dict[str, int]
    word: Floats
    position: Floats
    token_type: Floats
    embed_ln: Floats
    layers: tuple[_Layer, ...]
    heads: int
    eps: float
    meta: dict[str, Any]


@functools.cache
def load_weights(path: Path = DATA) -> MiniLMWeights:
    """Read and dequantise the shipped weights, once per process (per path)."""
    vocab, meta, arrays = read_routing_data(path, "the MiniLM weights", "word")

    def columns(name: str) -> Floats:
        matrix: Floats = arrays[name].astype(np.float32) * arrays[f"{name}_scale"]
        return matrix

    try:
        layers = tuple(
            _Layer(
                qkv=columns(f"qkv{i}"),
                qkv_bias=arrays[f"qkv{i}_bias"],
                out=columns(f"out{i}"),
                out_bias=arrays[f"out{i}_bias"],
                ln1=arrays[f"ln1_{i}"],
                up=columns(f"up{i}"),
                up_bias=arrays[f"up{i}_bias"],
                down=columns(f"down{i}"),
                down_bias=arrays[f"down{i}_bias"],
                ln2=arrays[f"ln2_{i}"],
            )
            for i in range(int(meta["layers"]))
        )
        word = arrays["word"].astype(np.float32) * arrays["word_scale"][:, None]
    except (KeyError, ValueError, TypeError) as e:
        raise EmbedderUnavailable(f"cannot read the MiniLM weights {path}: {e}") from None
    return MiniLMWeights(
        vocab=vocab,
        word=word.astype(np.float32),
        position=arrays["position"],
        token_type=arrays["token_type"],
        embed_ln=arrays["embed_ln"],
        layers=layers,
        heads=int(meta["heads"]),
        eps=float(meta["layer_norm_eps"]),
        meta=meta,
    )


def _layer_norm(x: Floats, gain_bias: Floats, eps: float) -> Floats:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = np.square(centred).mean(axis=-1, keepdims=True)
    out: Floats = centred / np.sqrt(variance + eps) * gain_bias[0] + gain_bias[1]
    return out


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def _gelu(x: Floats) -> Floats:
    """GELU, in place, by its tanh form (BERT's exact form uses erf; the two differ by under
    1e-3 and the sentence embeddings by a cosine under 1e-4). Few passes, no temporaries
    but one: on a batch this was 40 % of the time with erf."""
    inner = np.square(x)
    inner *= np.float32(0.044715)
    inner += np.float32(1.0)
    inner *= x
    inner *= _GELU_C
    np.tanh(inner, out=inner)
    inner += np.float32(1.0)
    x *= inner
    x *= np.float32(0.5)
    return x


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions), in NumPy."""

    costly = True  # milliseconds per text (see broker.routing.embedder.costly)

    def __init__(self, path: Path = DATA, *, max_chars: int = 8192) -> None:
        self._weights = load_weights(path)
        self.dim = int(self._weights.word.shape[1])
        self.name = "minilm-l6"
        #: As sentence-transformers models: cosines of unrelated texts stay low.
        self.relevance_threshold = DEFAULT_THRESHOLD
        self.max_chars = max_chars
        self.max_tokens = len(self._weights.position)
        vocab = self._weights.vocab
        self._cls, self._sep, self._unk = vocab["[CLS]"], vocab["[SEP]"], vocab["[UNK]"]
        self._pieces: dict[str, list[int]] = {}

    def token_ids(self, text: str) -> list[int]:
        """``[CLS]``, the text's WordPiece ids (``[UNK]`` for unknown words), ``[SEP]``: at
        most the model's 256 in all."""
        vocab, memo, limit = self._weights.vocab, self._pieces, self.max_tokens - 2
        ids = [self._cls]
        for word in basic_tokens(text[: self.max_chars]):
            found = memo.get(word)
            if found is None:
                found = [self._unk if i == UNKNOWN else i for i in wordpiece(word, vocab)]
                if len(memo) >= 100_000:
                    memo.clear()
                memo[word] = found
            ids.extend(found)
            if len(ids) > limit:
                del ids[limit + 1 :]
                break
        ids.append(self._sep)
        return ids

    def embed(self, texts: Sequence[str]) -> Matrix:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        present = [i for i, text in enumerate(texts) if text.strip()]
        if not present:
            return out
        ids = {i: self.token_ids(texts[i]) for i in present}
        order = sorted(present, key=lambda i: len(ids[i]))
        for start in range(0, len(order), _CHUNK):
            chunk = order[start : start + _CHUNK]
            out[chunk] = self._forward([ids[i] for i in chunk])
        return out

    def _forward(self, sequences: list[list[int]]) -> Floats:
        """Unit sentence embeddings of token-id sequences (one padded forward pass)."""
        w = self._weights
        batch, length = len(sequences), max(map(len, sequences))
        ids = np.zeros((batch, length), dtype=np.int64)
        mask = np.zeros((batch, length), dtype=np.float32)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1.0
        # Rows are (text, position) pairs: each linear layer is one matrix product.
        x = (w.word[ids] + w.position[:length] + w.token_type).reshape(batch * length, -1)
        x = _layer_norm(x, w.embed_ln, w.eps)
        heads, hidden = w.heads, x.shape[-1]
        size = hidden // heads
        padding = ((mask - 1.0) * np.float32(1e9))[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(size))
        for layer in w.layers:
            qkv = (x @ layer.qkv + layer.qkv_bias).reshape(batch, length, 3, heads, size)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each: batch, heads, length, size
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + padding
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attended = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * length, hidden)
            x = _layer_norm(attended @ layer.out + layer.out_bias + x, layer.ln1, w.eps)
            up = _gelu(x @ layer.up + layer.up_bias)
            x = _layer_norm(up @ layer.down + layer.down_bias + x, layer.ln2, w.eps)
        tokens = x.reshape(batch, length, hidden)
        pooled = (tokens * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        out: Floats = (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
        return out
