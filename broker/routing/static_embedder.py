"""A static token table distilled from all-MiniLM-L6-v2: word meaning with no model to run.

:class:`StaticEmbedder` splits a text into the model's own WordPiece tokens (BERT uncased:
lower case, accents stripped, punctuation split off, greedy longest-match-first pieces with
``##`` continuations) and returns the normalised sum of their rows in a table shipped with
the package (``data/minilm_static.npz``, made by ``benchmarks/routing_quality/distill.py``:
each token's MiniLM output, PCA to 128 dimensions, Zipf-weighted, int8). It is plain Python
and NumPy: no torch, no download, the same vector in every process. English stop words are
left out, as in the hashing embedder. Unlike hashing it knows that "kitten" is near "cat";
it cannot tell word order or context.

The table is read once per process (:func:`load_table`). Work per text is bounded: the first
``max_chars`` characters, the first ``max_tokens`` tokens.
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from broker.routing.embedder import (
    STATIC_THRESHOLD,
    STOP_WORDS,
    EmbedderUnavailable,
    Matrix,
    squared_norm,
)

DATA = Path(__file__).resolve().parent / "data" / "minilm_static.npz"
UNKNOWN = -1  # a word with no WordPiece split (BERT's [UNK]): it adds nothing
_MAX_WORD_CHARS = 100  # longer words are [UNK], as in BERT

# BERT's basic tokenizer on ASCII text: runs of letters and digits, and each punctuation
# mark (every printable ASCII character that is neither) on its own.
_ASCII_PIECES = re.compile(r"[a-z0-9]+|[!-/:-@\[-`{-~]")
_ASCII_CONTROL = dict.fromkeys([*range(9), 11, 12, *range(14, 32), 127])
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(code: int) -> bool:
    return any(low <= code <= high for low, high in _CJK)


def _split_unicode(text: str) -> list[str]:
    """BERT's basic tokenizer for any text: drop control characters, strip accents (NFD,
    combining marks dropped), split on white space, and split off punctuation and CJK
    ideographs as tokens of their own."""
    out: list[str] = []
    word: list[str] = []
    for char in unicodedata.normalize("NFD", text.lower()):
        category = unicodedata.category(char)
        if category == "Mn" or char in "\x00\ufffd":
            continue
        if char in " \t\n\r" or category == "Zs":
            alone = False
        elif category in ("Cc", "Cf"):
            continue
        elif category.startswith("P") or (not char.isalnum() and char.isascii()):
            alone = True  # punctuation: BERT's P* categories and all ASCII symbols
        elif _is_cjk(ord(char)):
            alone = True  # each CJK ideograph is a word of its own
        else:
            word.append(char)
            continue
        if word:
            out.append("".join(word))
            word = []
        if alone:
            out.append(char)
    if word:
        out.append("".join(word))
    return out


def basic_tokens(text: str) -> list[str]:
    """The words and punctuation marks BERT's uncased basic tokenizer makes of ``text``."""
    if text.isascii():
        if not text.isprintable():
            text = text.translate(_ASCII_CONTROL)
        return _ASCII_PIECES.findall(text.lower())
    return _split_unicode(text)


def wordpiece(word: str, vocab: dict[str, int]) -> list[int]:
    """Greedy longest-match-first WordPiece ids of one word (``##`` marks a continuation);
    ``[UNKNOWN]`` (BERT's ``[UNK]``) when some part matches nothing or it is over 100
    characters long."""
    if len(word) > _MAX_WORD_CHARS:
        return [UNKNOWN]
    found = vocab.get(word)
    if found is not None:
        return [found]
    ids: list[int] = []
    start = 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            found = vocab.get(piece)
            if found is not None:
                break
            end -= 1
        if found is None:
            return [UNKNOWN]
        ids.append(found)
        start = end
    return ids


@dataclass(frozen=True, slots=True)
class StaticTable:
    """The shipped table: WordPiece token -> row, and the rows (float32, weights folded in)."""

    vocab: dict[str, int]
    rows: Matrix
    meta: dict[str, Any]


Arrays = dict[str, npt.NDArray[Any]]


def read_routing_data(path: Path, what: str, rows: str) -> tuple[dict[str, int], Any, Arrays]:
    """A shipped routing ``.npz``: its vocabulary (``vocab``, UTF-8, a token a line: token ->
    row), its ``meta`` (UTF-8 JSON) and every other array. ``rows`` names the array with a
    row per token; anything unreadable or inconsistent is :class:`EmbedderUnavailable`,
    naming ``what`` was read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        words = arrays.pop("vocab").tobytes().decode().split("\n")
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        count = len(arrays[rows])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise EmbedderUnavailable(f"cannot read {what} {path}: {e}") from None
    if len(words) != count:
        raise EmbedderUnavailable(f"{what} {path} has {len(words)} tokens and {count} rows")
    return {w: i for i, w in enumerate(words)}, meta, arrays


@functools.cache
def load_table(path: Path = DATA) -> StaticTable:
    """Read the table once per process (per path)."""
    vocab, meta, arrays = read_routing_data(path, "the static embedding table", "vectors")
    try:
        rows = arrays["vectors"].astype(np.float32) * arrays["scales"][:, None]
    except (KeyError, ValueError) as e:
        raise EmbedderUnavailable(f"cannot read the static embedding table {path}: {e}") from None
    return StaticTable(vocab, rows.astype(np.float32), meta)


class StaticEmbedder:
    """Sum of the shipped table's rows for a text's WordPiece tokens, L2-normalised.

    English stop words (the hashing embedder's list) are left out, and the rows carry a Zipf
    weight by token rank, so frequent tokens (commas, "also") count less. Word splits are
    memoised (up to ``memo`` distinct words, then the memo starts over).
    """

    def __init__(
        self,
        path: Path = DATA,
        *,
        max_tokens: int = 512,
        max_chars: int = 8192,
        memo: int = 100_000,
    ) -> None:
        self._table = load_table(path)
        self.dim = int(self._table.rows.shape[1])
        self.name = f"static-minilm-{self.dim}"
        #: A routing candidate's least relevance with this embedder (see STATIC_THRESHOLD).
        self.relevance_threshold = STATIC_THRESHOLD
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self._memo = memo
        self._pieces: dict[str, list[int]] = {}

    def token_ids(self, text: str) -> list[int]:
        """The table rows of ``text``'s WordPiece tokens (stop words and unknown words left
        out), at most ``max_tokens`` of them from the first ``max_chars`` characters."""
        memo = self._pieces
        vocab = self._table.vocab
        ids: list[int] = []
        for word in basic_tokens(text[: self.max_chars]):
            found = memo.get(word)
            if found is None:
                if word in STOP_WORDS:
                    found = []
                else:
                    found = [i for i in wordpiece(word, vocab) if i != UNKNOWN]
                if len(memo) >= self._memo:
                    memo.clear()
                memo[word] = found
            ids.extend(found)
            if len(ids) >= self.max_tokens:
                return ids[: self.max_tokens]
        return ids

    def embed_one(self, text: str) -> Matrix:
        """The unit vector of one text (a zero vector when it has no known token)."""
        ids = self.token_ids(text)
        if not ids:
            return np.zeros(self.dim, dtype=np.float32)
        summed: Matrix = self._table.rows[ids].sum(axis=0)
        squared = squared_norm(summed)
        if squared > 0.0:
            summed *= np.float32(1.0 / math.sqrt(squared))
        return summed

    def embed(self, texts: Sequence[str]) -> Matrix:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.embed_one(text)
        return out


__all__ = ["DATA", "StaticEmbedder", "StaticTable", "basic_tokens", "load_table", "wordpiece"]
