"""A costly embedder (a neural model) embeds a router's batch at once, off the event loop.

The embedder here is the hashing embedder that says it is costly and keeps a log of its
calls: which texts, on which thread, how many at once. (The sentence-transformers tests
in test_routing_embedder.py run a real model where the extra is installed.)
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence

import numpy as np

from broker.routing import CatalogCache, HashingEmbedder, Scorer
from broker.routing.embedder import BlendedEmbedder, Matrix, costly, load_embedder
from broker.routing.features import H_TEXT, extract
from broker.routing.scoring import MAX_AHEAD
from tests.unit.test_routing_scoring import ASSISTANTS, NAMES, TEXT, T, idle, snapshot

TEXTS = [
    "please translate this letter into German",
    "can you summarise the attached quarterly report",
    "is it going to rain in Berlin tomorrow",
]


class CostlyEmbedder:
    """The hashing embedder, declared costly, with a log of its calls."""

    costly = True

    def __init__(self, delay: float = 0.0) -> None:
        self._inner = HashingEmbedder()
        self.name = "costly-hashing"
        self.dim = self._inner.dim
        self.delay = delay
        self.calls: list[tuple[list[str], int]] = []  # (texts, thread id)
        self.running = 0
        self.most_at_once = 0
        self._count = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Matrix:
        with self._count:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.calls.append((list(texts), threading.get_ident()))
            if self.delay:
                time.sleep(self.delay)
            return self._inner.embed(texts)
        finally:
            with self._count:
                self.running -= 1

    def query_calls(self) -> list[list[str]]:
        """The calls that embedded message texts (not the agents' descriptions)."""
        return [texts for texts, _ in self.calls if set(texts) & set(TEXTS)]


def decide(scorer: Scorer, text: str) -> tuple[str | None, list[str]]:
    decision = scorer.decide(
        snapshot(*ASSISTANTS), T, text.encode(), TEXT, idle(*NAMES), rng=random.Random(7)
    )
    return decision.agent, [c.agent for c in decision.candidates]


def test_only_a_neural_model_is_costly() -> None:
    assert costly(CostlyEmbedder())
    assert costly(load_embedder(None))  # the built-in default, all-MiniLM-L6-v2 in NumPy
    assert not costly(load_embedder("static+hashing"))
    assert not costly(HashingEmbedder())
    assert costly(BlendedEmbedder([(HashingEmbedder(), 0.5), (CostlyEmbedder(), 0.5)]))
    assert not Scorer(HashingEmbedder()).costly


async def test_a_batch_is_embedded_in_one_call_off_the_loop_and_decides_the_same() -> None:
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder)
    batch = [*TEXTS, TEXTS[0]]  # a text twice is embedded once
    texts = [t for t in (scorer.text_to_embed(x.encode(), TEXT) for x in batch) if t]
    assert texts == batch

    await scorer.embed_ahead(texts)

    assert embedder.calls == [(TEXTS, embedder.calls[0][1])]
    assert embedder.calls[0][1] != threading.get_ident()  # a worker thread, not the loop
    decisions = [decide(scorer, text) for text in batch]
    assert embedder.query_calls() == [TEXTS]  # the decisions embedded nothing more
    plain = Scorer(HashingEmbedder())
    assert decisions == [decide(plain, text) for text in batch]
    assert [agent for agent, _ in decisions] == [
        "translator",
        "summarizer",
        "weather",
        "translator",
    ]
    # Embedded already: nothing left to embed for these messages.
    assert scorer.text_to_embed(TEXTS[1].encode(), TEXT) is None


def test_what_is_not_embedded_ahead_is_embedded_when_decided() -> None:
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder)
    assert decide(scorer, TEXTS[2])[0] == "weather"
    assert embedder.query_calls() == [[TEXTS[2]]]


def test_only_messages_with_text_to_embed_are_collected() -> None:
    scorer = Scorer(CostlyEmbedder())
    vector = ",".join(["0.1"] * scorer.embedder.dim)
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    assert scorer.text_to_embed(b"hello there", {"broker-embedding": vector}) is None
    assert scorer.text_to_embed(png, {"content-type": "image/png"}) is None
    assert scorer.text_to_embed(b"", TEXT) is None
    assert scorer.text_to_embed(b"x", {H_TEXT: "%FF"}) is None  # refused: decide explains
    assert scorer.text_to_embed(png, {H_TEXT: "read%20this"}) == "read this"
    assert Scorer(HashingEmbedder()).text_to_embed(b"hello there", TEXT) is None


async def test_the_event_loop_keeps_running_while_a_batch_is_embedded() -> None:
    scorer = Scorer(CostlyEmbedder(delay=0.5))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await scorer.embed_ahead(TEXTS)
    ticker.cancel()
    assert ticks >= 10  # one embed call blocked for 0.5 s, the loop did not


async def test_the_model_is_only_ever_called_from_one_thread_of_its_own() -> None:
    embedder = CostlyEmbedder(delay=0.05)
    scorer = Scorer(embedder)
    ahead = asyncio.create_task(scorer.embed_ahead(TEXTS))
    await asyncio.sleep(0.01)  # the worker thread is inside embed now
    decide(scorer, "translate the menu to Spanish")  # the loop embeds a text of its own
    await ahead
    assert embedder.most_at_once == 1
    assert len(embedder.query_calls()) == 1
    # Every call, the loop's too, ran on the model's one thread (torch slows down when a
    # second thread uses the same model).
    assert len({thread for _, thread in embedder.calls}) == 1
    assert embedder.calls[0][1] != threading.get_ident()


async def test_the_texts_kept_ahead_are_bounded_and_the_oldest_go_first() -> None:
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder)
    many = [f"message number {i}" for i in range(MAX_AHEAD + 10)]
    await scorer.embed_ahead(many)  # a batch is kept whole, however large
    assert scorer.text_to_embed(many[0].encode(), TEXT) is None
    await scorer.embed_ahead(["one more", "and another"])
    assert scorer.text_to_embed(b"one more", TEXT) is None
    for text in many[:12]:  # the oldest went, down to the bound
        assert scorer.text_to_embed(text.encode(), TEXT) == text
    for text in many[12:]:
        assert scorer.text_to_embed(text.encode(), TEXT) is None


async def test_agents_changed_since_the_catalog_was_built_are_embedded_ahead() -> None:
    """A router also embeds the agents a decision would embed (a new tenant, a registry
    change) ahead, so the catalog is built from rows it has and the loop never waits."""
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder)
    registry = snapshot(*ASSISTANTS)
    agent_texts = scorer.agent_texts_to_embed(registry, T)
    assert len(agent_texts) >= len(ASSISTANTS)  # a row per capability, one per example
    await scorer.embed_ahead([*agent_texts, TEXTS[0]])
    assert len(embedder.calls) == 1

    assert decide(scorer, TEXTS[0])[0] == "translator"
    assert len(embedder.calls) == 1  # catalog and query came from the rows embedded ahead
    assert scorer.agent_texts_to_embed(registry, T) == []  # built: nothing changed since
    assert Scorer(HashingEmbedder()).agent_texts_to_embed(registry, T) == []


async def test_prepare_embeds_a_batchs_texts_and_its_tenants_agents_in_one_call() -> None:
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder)
    registry = snapshot(*ASSISTANTS)
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    batch = [(T, text.encode(), TEXT) for text in TEXTS]
    batch += [(T, TEXTS[0].encode(), TEXT), (T, png, {"content-type": "image/png"})]
    await scorer.prepare(registry, batch)
    assert len(embedder.calls) == 1
    embedded = embedder.calls[0][0]
    assert embedded[: len(TEXTS)] == TEXTS  # each text once, then the agents
    assert set(scorer.agent_texts_to_embed(registry, T)) <= set(embedded)
    for tenant, payload, headers in batch:
        scorer.decide(registry, tenant, payload, headers, idle(*NAMES), rng=random.Random(7))
    assert len(embedder.calls) == 1  # every decision found its rows
    await scorer.prepare(registry, batch)
    assert len(embedder.calls) == 1  # nothing new to embed
    await Scorer(HashingEmbedder()).prepare(registry, batch)  # not costly: nothing to do


async def test_a_text_being_embedded_ahead_is_waited_for_not_embedded_twice() -> None:
    """A retry or a catalog build asks for a text the batch step is embedding right now."""
    embedder = CostlyEmbedder(delay=0.2)
    scorer = Scorer(embedder)
    ahead = asyncio.create_task(scorer.embed_ahead(TEXTS))
    await asyncio.sleep(0.05)  # the batch is on the model's thread
    assert scorer.text_to_embed(TEXTS[0].encode(), TEXT) is None  # known: under way
    rows = scorer.embedder.embed([TEXTS[0], "a text of its own"])
    await ahead
    assert [texts for texts, _ in embedder.calls] == [TEXTS, ["a text of its own"]]
    assert np.allclose(rows, HashingEmbedder().embed([TEXTS[0], "a text of its own"]))


async def test_texts_a_batch_needs_again_are_not_pushed_out_by_it() -> None:
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder)
    old = [f"old message {i}" for i in range(MAX_AHEAD)]
    await scorer.embed_ahead(old)
    await scorer.embed_ahead([old[0], *(f"new message {i}" for i in range(300))])
    assert scorer.text_to_embed(old[0].encode(), TEXT) is None  # asked for again: kept
    assert scorer.text_to_embed(old[1].encode(), TEXT) == old[1]  # the oldest went


def test_a_catalog_cache_handed_in_runs_the_model_on_its_thread_too() -> None:
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder, cache=CatalogCache(embedder))
    assert scorer.catalogs.embedder is scorer.embedder
    decide(scorer, TEXTS[0])
    assert len({thread for _, thread in embedder.calls}) == 1
    assert embedder.calls[0][1] != threading.get_ident()


async def test_rows_embedded_ahead_and_fresh_rows_combine_in_one_call() -> None:
    embedder = CostlyEmbedder()
    scorer = Scorer(embedder)
    await scorer.embed_ahead(TEXTS[:2])
    rows = scorer.embedder.embed([TEXTS[1], TEXTS[2], TEXTS[0], TEXTS[2]])
    assert embedder.calls[1][0] == [TEXTS[2]]  # only the text not embedded ahead
    expected = HashingEmbedder().embed([TEXTS[1], TEXTS[2], TEXTS[0], TEXTS[2]])
    assert np.allclose(rows, expected)
    assert rows.dtype == np.float32


async def test_a_text_the_model_maps_to_zero_is_not_a_query() -> None:
    class Zero(CostlyEmbedder):
        def embed(self, texts: Sequence[str]) -> Matrix:
            return np.zeros((len(texts), self.dim), np.float32)

    scorer = Scorer(Zero())
    await scorer.embed_ahead(["anything"])
    assert scorer.query(extract(b"anything", TEXT)) is None
