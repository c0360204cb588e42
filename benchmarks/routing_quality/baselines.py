"""Reference baselines computed in-process, without the broker.

Both are *nearest description*: each agent is represented by its one-sentence manifest
``description`` only, each request by its words only (:meth:`Request.plain_text`: the
Broker-Text, else a textual body, else nothing; content type and modality are ignored),
and the agent with the highest cosine similarity wins.

- ``minilm``: sentence-transformers embeddings (e.g. all-MiniLM-L6-v2 from a local path).
  The reference the issue names; skipped when sentence-transformers is not installed.
- ``words``: TF-IDF bag of words. No model; it shows how much the requests share
  vocabulary with the descriptions (the requests avoid the agents' keywords on purpose).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.routing_quality.dataset import Dataset
from benchmarks.routing_quality.scoring import Outcome, Summary

_WORD = re.compile(r"\w+", re.UNICODE)
#: Common English function words, left out of the bag of words.
_STOP_WORDS = """
a about all an and are as at be but by can do for from get has have i in into is it its me my
no not of on or our so such than that the their them then there these they this to up us was we
what when which who why will with you your
"""
_STOP = frozenset(_STOP_WORDS.split())


def _words(text: str) -> Counter[str]:
    return Counter(w for w in _WORD.findall(text.lower()) if w not in _STOP)


class BaselineUnavailable(Exception):
    """The baseline cannot run here; the message says why and what to install."""


def _nearest(
    dataset: Dataset,
    name: str,
    agent_vectors: npt.NDArray[np.float64],
    request_vectors: npt.NDArray[np.float64],
) -> Summary:
    def unit(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        out: npt.NDArray[np.float64] = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
        return out

    scores = unit(request_vectors) @ unit(agent_vectors).T
    names = dataset.agent_names
    outcomes = []
    for request, row in zip(dataset.requests, scores, strict=True):
        order = np.argsort(-row, kind="stable")
        ranked = tuple(names[i] for i in order[:3]) if row.max() > 0 else ()
        chosen = ranked[0] if ranked else None
        outcomes.append(Outcome.of(request, chosen, ranked, cosine=round(float(row.max()), 4)))
    return Summary(name, outcomes)


def words(dataset: Dataset) -> Summary:
    """Nearest description by TF-IDF cosine (IDF over the agent descriptions)."""
    docs = [_words(str(a["description"])) for a in dataset.agents]
    vocabulary = sorted(set().union(*docs))
    index = {w: i for i, w in enumerate(vocabulary)}
    df = Counter(w for d in docs for w in d)
    idf = np.array([math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in vocabulary])

    def vector(counts: Counter[str]) -> npt.NDArray[np.float64]:
        v = np.zeros(len(vocabulary))
        for w, n in counts.items():
            if w in index:
                v[index[w]] = n
        weighted: npt.NDArray[np.float64] = v * idf
        return weighted

    agents = np.array([vector(d) for d in docs])
    requests = np.array([vector(_words(r.plain_text())) for r in dataset.requests])
    return _nearest(dataset, "baseline: nearest description, TF-IDF words", agents, requests)


def minilm(dataset: Dataset, model_path: str) -> Summary:
    """Nearest description by sentence-transformers cosine; raises BaselineUnavailable."""
    try:
        from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]
    except ImportError as e:
        raise BaselineUnavailable(
            "sentence-transformers is not installed (pip install 'agent-broker[embeddings]'); "
            f"skipped the MiniLM baseline ({e})"
        ) from None
    model: Any = SentenceTransformer(model_path, device="cpu")
    agents = np.asarray(
        model.encode([str(a["description"]) for a in dataset.agents]), dtype=np.float64
    )
    requests = np.asarray(
        model.encode([r.plain_text() for r in dataset.requests]), dtype=np.float64
    )
    return _nearest(
        dataset, f"baseline: nearest description, {model_path} on text alone", agents, requests
    )
