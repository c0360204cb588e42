"""Routing benchmark: decisions/s against a bare NumPy top-k, LSH against brute force.

1. ``decide`` with ``--agents`` agents x ``--dim``-d embeddings (one row each, from the
   manifests' ``embedding.vector``), every agent live with a load report, the query vector
   given (embedding excluded): decisions/s and p99 latency, against a bare NumPy
   ``matrix @ q`` + ``np.argpartition`` top-3 over the same matrix and queries in the same
   run (target >= 0.5x). The same again through ``Scorer.decide`` with the HashingEmbedder
   (agents described by text; per message: feature extraction, embedding, catalog lookup,
   decision) against the same bare baseline.
2. :class:`LSHIndex` against exact brute force at ``--rows`` x ``--dim`` (clustered unit
   vectors; each query is a new member of a cluster): recall@3 and speed-up; also the int8
   brute-force index.
3. ``--quality``: on a small hand-written set of 15 agents with 3 held-out requests each and
   10 off-topic requests, top-1 accuracy with per-example rows vs one mean row per
   capability, and how many off-topic requests each threshold rejects.

4. ``--dev``: only top-1 (``choice: best``) on a hand-written dev set of 42 requests for the
   fleet of ``benchmarks/routing_quality/agents.yaml`` (text, JSON, PNG/JPEG, WAV and PDF
   payloads), in process, to tune the router's constants without touching the labelled
   evaluation; ``--embedder SPEC`` picks the embedder. ``--dev-file FILE`` scores a request
   file in the evaluation's schema instead (``routing_quality/dev_requests.yaml``: 160
   requests written later, for more power than 42 give); ``--policy FILE`` sets the policy
   (default: ``choice: best``, ``require_live: false``).

Usage: ``python benchmarks/routing.py [--agents 1000] [--decisions 20000] [--rows 100000]
[--quality] [--skip-lsh] [--json]``, ``python benchmarks/routing.py --dev [--embedder SPEC]
[--dev-file FILE] [--policy FILE]``
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.routing_quality import dataset, payloads  # noqa: E402
from broker.envelope import Tenant  # noqa: E402
from broker.logs import configure_logging  # noqa: E402
from broker.registry.manifest import AgentManifest, AgentName  # noqa: E402
from broker.registry.snapshot import AgentRecord, RegistrySnapshot  # noqa: E402
from broker.routing import (  # noqa: E402
    DEFAULT_POLICY,
    AgentLoad,
    CatalogCache,
    HashingEmbedder,
    LSHIndex,
    Scorer,
    build_catalog,
    decide,
    extract,
)
from broker.routing.embedder import Embedder, load_embedder, tokens  # noqa: E402
from broker.routing.index import BruteForceIndex, top_k  # noqa: E402
from broker.routing.policy import Choice, Policy  # noqa: E402

TENANT = Tenant("bench")
Matrix = npt.NDArray[np.float32]


def unit(matrix: Matrix) -> Matrix:
    return (matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)).astype(np.float32)


def record(i: int, manifest: dict[str, Any]) -> AgentRecord:
    parsed = AgentManifest.model_validate(manifest)
    return AgentRecord(TENANT, AgentName(parsed.name), parsed, i + 1, i + 1, None)


def loads_for(names: list[str], rng: np.random.Generator) -> dict[str, AgentLoad]:
    """Varied live loads: a third of the agents have a GPU, some run hot."""
    loads = {}
    for i, name in enumerate(names):
        loads[name] = AgentLoad(
            instances=int(rng.integers(1, 4)),
            qps=float(rng.uniform(0, 120)),
            in_flight=int(rng.integers(0, 8)),
            p50_ms=float(rng.uniform(5, 80)),
            p99_ms=float(rng.uniform(20, 400)),
            error_rate=float(rng.uniform(0, 0.05)),
            gpu_free_mb=float(rng.uniform(0, 24000)) if i % 3 == 0 else None,
            gpu_util=float(rng.uniform(0, 1)) if i % 3 == 0 else None,
        )
    return loads


def timed(fn: Callable[[int], object], n: int) -> list[int]:
    """Nanoseconds per call of ``fn(i)`` for i in range(n)."""
    out = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        began = clock()
        fn(i)
        out[i] = clock() - began
    return out


def summary(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    total_s = sum(ordered) / 1e9
    return {
        "per_s": round(len(ordered) / total_s),
        "p50_us": round(ordered[len(ordered) // 2] / 1000, 1),
        "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000, 1),
    }


def compare(
    ours: Callable[[int], object], bare: Callable[[int], object], n: int, rounds: int
) -> dict[str, Any]:
    """Interleaved rounds of both; the ratio of the medians of per-round throughput."""
    ours_all: list[int] = []
    bare_all: list[int] = []
    ratios = []
    ours(0)
    bare(0)
    gc.disable()
    try:
        for _ in range(rounds):
            b = timed(bare, n)
            o = timed(ours, n)
            bare_all += b
            ours_all += o
            ratios.append(sum(b) / sum(o))
    finally:
        gc.enable()
    return {
        "ours": summary(ours_all),
        "bare": summary(bare_all),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
    }


# --- 1. decisions -----------------------------------------------------------------------------


def bench_decide(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    vectors = unit(rng.standard_normal((args.agents, args.dim)).astype(np.float32))
    records = [
        record(
            i,
            {
                "name": f"agent-{i:04d}",
                "version": "1.0.0",
                "description": f"Agent {i}",
                "capabilities": [{"action": "work"}],
                "embedding": {"vector": vectors[i].tolist()},
                "limits": {"max_qps": 100} if i % 2 else {},
            },
        )
        for i in range(args.agents)
    ]
    names = [r.name for r in records]
    catalog = build_catalog(records, HashingEmbedder(args.dim))
    loads = loads_for(names, rng)
    live = frozenset(names)
    targets = rng.integers(0, args.agents, args.decisions)
    queries = unit(vectors[targets] + 0.04 * rng.standard_normal((args.decisions, args.dim)))
    queries = queries.astype(np.float32)
    features = extract(b"", {"Content-Type": "application/octet-stream"})
    text_features = extract(b"hello", {"Content-Type": "text/plain"})
    matrix = catalog.matrix
    k = DEFAULT_POLICY.top_k
    pyrng = random.Random(1)

    def bare(i: int) -> object:
        scores = matrix @ queries[i]
        return np.argpartition(scores, -k)[-k:]

    def ours(i: int) -> object:
        return decide(
            catalog, text_features, loads, DEFAULT_POLICY, query=queries[i], live=live, rng=pyrng
        )

    checked = min(2000, args.decisions)
    chosen = [
        decide(catalog, text_features, loads, DEFAULT_POLICY, query=queries[i], live=live)
        for i in range(checked)
    ]
    hits = sum(d.agent == names[targets[i]] for i, d in enumerate(chosen))
    result = compare(ours, bare, args.decisions, args.rounds)
    result["chosen_is_the_nearest_agent"] = round(hits / checked, 3)

    def keys_view(i: int) -> object:  # a new live collection object per call: no memo
        return decide(
            catalog,
            text_features,
            loads,
            DEFAULT_POLICY,
            query=queries[i],
            live=loads.keys(),
            rng=pyrng,
        )

    with_keys = compare(keys_view, bare, args.decisions // 4, 1)
    result["live_as_a_new_keys_view"] = {"ours": with_keys["ours"], "ratio": with_keys["ratio"]}
    result["example_detail"] = chosen[0].detail

    # A new loads mapping (a load report arrived) costs one refresh on the next decision.
    refresh = []
    for _ in range(20):
        fresh = dict(loads)
        began = time.perf_counter_ns()
        decide(catalog, features, fresh, DEFAULT_POLICY, query=queries[0], live=live)
        refresh.append(time.perf_counter_ns() - began)
    result["first_decision_after_new_loads_us"] = round(statistics.median(refresh) / 1000, 1)
    return result


WORDS = [
    "".join(chr(97 + c) for c in np.random.default_rng(i).integers(0, 26, 4 + i % 6))
    for i in range(4000)
]


def bench_scorer(args: argparse.Namespace) -> dict[str, Any]:
    """The full path with the HashingEmbedder: text agents, text messages."""
    rng = np.random.default_rng(11)
    descriptions = [" ".join(rng.choice(WORDS, 14)) for _ in range(args.agents)]
    records = [
        record(
            i,
            {
                "name": f"agent-{i:04d}",
                "version": "1.0.0",
                "description": descriptions[i],
                "capabilities": [{"action": "work"}],
            },
        )
        for i in range(args.agents)
    ]
    names = [r.name for r in records]
    snapshot = RegistrySnapshot({(TENANT, r.name): r for r in records}, len(records))
    embedder = HashingEmbedder(args.dim)
    scorer = Scorer(embedder, DEFAULT_POLICY, cache=CatalogCache(embedder))
    began = time.perf_counter()
    catalog = scorer.catalogs.get(snapshot, TENANT)
    build_s = time.perf_counter() - began
    loads = loads_for(names, rng)
    live = frozenset(names)
    n = args.decisions // 2
    targets = rng.integers(0, args.agents, n)
    texts = [
        " ".join([*rng.choice(descriptions[t].split(), 6), *rng.choice(WORDS, 4)]) for t in targets
    ]
    payloads = [t.encode() for t in texts]
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    queries = embedder.embed(texts)
    matrix = catalog.matrix
    k = DEFAULT_POLICY.top_k
    pyrng = random.Random(1)

    def bare(i: int) -> object:
        scores = matrix @ queries[i]
        return np.argpartition(scores, -k)[-k:]

    def ours(i: int) -> object:
        return scorer.decide(snapshot, TENANT, payloads[i], headers, loads, live=live, rng=pyrng)

    checked = min(2000, n)
    hits = sum(
        scorer.decide(snapshot, TENANT, payloads[i], headers, loads, live=live).agent
        == names[targets[i]]
        for i in range(checked)
    )
    result = compare(ours, bare, n, args.rounds)
    result["chosen_is_the_described_agent"] = round(hits / checked, 3)
    result["catalog_build_s"] = round(build_s, 3)
    embed_ns = timed(lambda i: embedder.embed([texts[i]]), n)
    extract_ns = timed(lambda i: extract(payloads[i], headers), n)
    result["embed_one_text_us_p50"] = summary(embed_ns)["p50_us"]
    result["extract_us_p50"] = summary(extract_ns)["p50_us"]
    return result


# --- 2. LSH ---------------------------------------------------------------------------------


def bench_lsh(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    n, d = args.rows, args.dim
    clusters = max(1, n // 50)
    centres = unit(rng.standard_normal((clusters, d)).astype(np.float32))
    spread = 0.038  # a member's cosine to its centre is about 0.8
    members = rng.integers(0, clusters, n)
    data = unit(centres[members] + spread * rng.standard_normal((n, d)).astype(np.float32))
    picks = rng.integers(0, clusters, args.queries)
    queries = unit(centres[picks] + spread * rng.standard_normal((args.queries, d)))
    queries = queries.astype(np.float32)

    exact = BruteForceIndex(data)
    began = time.perf_counter()
    quantized = BruteForceIndex(data, quantized=True)
    q8_build = time.perf_counter() - began
    began = time.perf_counter()
    lsh = LSHIndex(data)
    lsh_build = time.perf_counter() - began

    truth = [set(exact.search(q, 3)[0].tolist()) for q in queries]

    def bare(i: int) -> object:
        return np.argpartition(data @ queries[i], -3)[-3:]

    def recall(index: BruteForceIndex | LSHIndex) -> float:
        found = sum(
            len(truth[i] & set(index.search(q, 3)[0].tolist())) for i, q in enumerate(queries)
        )
        return round(found / (3 * len(queries)), 3)

    lsh_vs = compare(lambda i: lsh.search(queries[i], 3), bare, len(queries), args.rounds)
    q8_vs = compare(lambda i: quantized.search(queries[i], 3), bare, len(queries), 1)
    candidates = statistics.median(len(lsh.candidates(q)) for q in queries)
    return {
        "rows": n,
        "dim": d,
        "lsh": {
            "tables": lsh.tables,
            "bits": lsh.bits,
            "probes": lsh.probes,
            "build_s": round(lsh_build, 2),
            "median_candidates": candidates,
            "recall_at_3": recall(lsh),
            "speedup": lsh_vs["ratio"],
            "search": lsh_vs["ours"],
            "brute_force": lsh_vs["bare"],
        },
        "int8_brute_force": {
            "build_s": round(q8_build, 2),
            "recall_at_3": recall(quantized),
            "speedup": q8_vs["ratio"],
            "search": q8_vs["ours"],
        },
    }


# --- 3. quality -----------------------------------------------------------------------------

# (name, description, action, capability description, examples, held-out requests)
AGENTS: list[tuple[str, str, str, str, list[str], list[str]]] = [
    (
        "summarizer",
        "Summarises long documents, articles and reports into short abstracts.",
        "summarize",
        "Shorten a document to its key points",
        ["give me the gist of this article", "tl;dr this report", "condense these notes"],
        [
            "summarise the attached quarterly report",
            "I need a short abstract of this paper",
            "what are the key points of this long email thread",
        ],
    ),
    (
        "translator",
        "Translates text between languages such as English, French, German and Spanish.",
        "translate",
        "Translate text into another language",
        ["translate this to French", "how do you say this in German", "put this into Spanish"],
        [
            "please translate the following letter into English",
            "can you render this paragraph in Italian",
            "translation of this contract to Portuguese",
        ],
    ),
    (
        "weather",
        "Answers questions about weather forecasts, temperature and rain.",
        "forecast",
        "Weather forecast for a place and day",
        ["will it rain tomorrow in Paris", "temperature in Berlin this weekend", "is it sunny"],
        [
            "what's the forecast for London on Friday",
            "do I need an umbrella today",
            "how cold will it be tonight in Oslo",
        ],
    ),
    (
        "code-reviewer",
        "Reviews source code, finds bugs and suggests fixes for Python, Go and Java.",
        "review-code",
        "Code review of a diff or a file",
        ["review this pull request", "find the bug in this function", "is this Python idiomatic"],
        [
            "can you check my Go code for race conditions",
            "look over this diff and point out problems",
            "why does this Java method throw a null pointer exception",
        ],
    ),
    (
        "sql-assistant",
        "Writes and optimises SQL queries for PostgreSQL and MySQL databases.",
        "write-sql",
        "Turn a question into a SQL query",
        ["write a query for the top customers", "join orders and users", "optimise this SELECT"],
        [
            "how do I count rows per month in postgres",
            "make this slow query use an index",
            "give me SQL that finds duplicate emails in the users table",
        ],
    ),
    (
        "calendar",
        "Schedules meetings, finds free time slots and sends calendar invitations.",
        "schedule",
        "Book a meeting in the calendar",
        ["set up a meeting with Anna on Tuesday", "find a free slot next week", "invite the team"],
        [
            "book a 30 minute call with the design team",
            "when am I free on Thursday afternoon",
            "move my 3pm meeting to tomorrow",
        ],
    ),
    (
        "travel",
        "Books flights, trains and hotels and plans travel itineraries.",
        "book-travel",
        "Travel booking",
        ["book a flight to Rome", "find a hotel near the station", "train tickets to Lyon"],
        [
            "I need a cheap flight from Madrid to Boston in May",
            "reserve a hotel room in Tokyo for three nights",
            "plan a trip itinerary for a week in Portugal",
        ],
    ),
    (
        "invoices",
        "Extracts totals, dates and vendors from invoices and receipts for billing.",
        "extract-invoice",
        "Read an invoice",
        ["what is the total on this invoice", "extract the vendor name", "parse this receipt"],
        [
            "pull the amount due and due date from the attached invoice",
            "which supplier sent this bill",
            "itemise the receipt from the restaurant",
        ],
    ),
    (
        "sentiment",
        "Classifies the sentiment and emotion of customer reviews and feedback.",
        "classify-sentiment",
        "Positive, negative or neutral",
        ["is this review positive", "how angry is this customer", "classify the feedback"],
        [
            "tell me whether these product reviews are negative",
            "what is the mood of this customer complaint",
            "rate the sentiment of the survey answers",
        ],
    ),
    (
        "math-tutor",
        "Solves math problems and equations step by step: algebra, calculus, probability.",
        "solve-math",
        "Solve an equation",
        ["solve x^2 - 4 = 0", "what is the derivative of sin x", "integrate this function"],
        [
            "help me with this algebra equation",
            "what is the probability of two sixes with two dice",
            "compute the integral of x squared from 0 to 3",
        ],
    ),
    (
        "recipes",
        "Suggests cooking recipes, ingredients and meal plans.",
        "suggest-recipe",
        "Recipes and cooking",
        ["a recipe with chicken and rice", "what can I cook with eggs", "vegan dinner ideas"],
        [
            "how do I bake sourdough bread",
            "give me a quick pasta recipe for dinner",
            "meal plan for a week with lentils and vegetables",
        ],
    ),
    (
        "legal",
        "Reviews contracts and legal clauses for risks: NDAs, leases, terms of service.",
        "review-contract",
        "Contract and legal review",
        ["review this NDA", "is this lease clause fair", "explain the liability section"],
        [
            "check the termination clause in my employment contract",
            "are there risky terms in this service agreement",
            "what does the indemnity clause mean in this contract",
        ],
    ),
    (
        "hr-helpdesk",
        "Answers employee questions about vacation, leave, payroll and benefits.",
        "hr-question",
        "Human resources policies",
        ["how many vacation days do I have", "when is payday", "parental leave policy"],
        [
            "how do I request paid time off",
            "what health insurance benefits do employees get",
            "my salary payment is missing this month",
        ],
    ),
    (
        "it-support",
        "Fixes IT problems: password resets, laptops, VPN, email and printer issues.",
        "it-ticket",
        "IT support ticket",
        ["reset my password", "the VPN does not connect", "my laptop will not boot"],
        [
            "I am locked out of my account",
            "the office printer is jammed again",
            "outlook keeps crashing when I open an attachment",
        ],
    ),
    (
        "stocks",
        "Analyses stock prices, market trends and company earnings.",
        "analyse-stock",
        "Market and stock analysis",
        ["how is Apple stock doing", "analyse the market today", "earnings of Tesla"],
        [
            "should I worry about the share price drop of Nvidia",
            "compare the quarterly earnings of Microsoft and Google",
            "what moved the stock market this week",
        ],
    ),
]
OFF_TOPIC = [
    "hello",
    "thanks, that was helpful",
    "who won the football match last night",
    "tell me a joke about cats",
    "what is the meaning of life",
    "my dog keeps barking at the neighbours",
    "recommend a good science fiction novel",
    "how tall is mount everest",
    "lyrics of a famous song",
    "good morning everyone",
]


def bench_quality(args: argparse.Namespace) -> dict[str, Any]:
    records = [
        record(
            i,
            {
                "name": name,
                "version": "1.0.0",
                "description": description,
                "capabilities": [{"action": action, "description": about, "examples": examples}],
            },
        )
        for i, (name, description, action, about, examples, _) in enumerate(AGENTS)
    ]
    embedder = load_embedder(args.embedder)  # the default embedder unless --embedder
    requests = [(q, name) for name, *_, held_out in AGENTS for q in held_out]
    off = embedder.embed(OFF_TOPIC)
    on = embedder.embed([q for q, _ in requests])
    result: dict[str, Any] = {
        "embedder": embedder.name,
        "agents": len(AGENTS),
        "requests": len(requests),
    }
    for mode in ("rows", "mean", "none"):
        if mode == "none":  # no examples at all
            stripped = [
                record(
                    i,
                    {
                        **r.manifest.model_dump(mode="json"),
                        "capabilities": [
                            {**r.manifest.capabilities[0].model_dump(mode="json"), "examples": []}
                        ],
                    },
                )
                for i, r in enumerate(records)
            ]
            catalog = build_catalog(stripped, embedder)
        else:
            catalog = build_catalog(
                records, embedder, examples="rows" if mode == "rows" else "mean"
            )
        on_best = np.array([catalog.similarities(q).max() for q in on])
        chosen = [catalog.agents[int(top_k(catalog.similarities(q), 1)[0])] for q in on]
        correct = np.array([c == name for c, (_, name) in zip(chosen, requests, strict=True)])
        weight = DEFAULT_POLICY.lexical_weight
        hybrid = [
            catalog.agents[
                int(
                    top_k(catalog.similarities(v) + weight * catalog.lexical.scores(tokens(q)), 1)[
                        0
                    ]
                )
            ]
            for v, (q, _) in zip(on, requests, strict=True)
        ]
        hybrid_correct = sum(c == name for c, (_, name) in zip(hybrid, requests, strict=True))
        off_best = np.array([catalog.similarities(q).max() for q in off])
        # The threshold applies to relevance: cosine + lexical_weight * BM25 (text alone
        # carries no content priors), as Scorer.decide compares it.
        on_relevance = np.array(
            [
                (catalog.similarities(v) + weight * catalog.lexical.scores(tokens(q))).max()
                for v, (q, _) in zip(on, requests, strict=True)
            ]
        )
        off_relevance = np.array(
            [
                (catalog.similarities(v) + weight * catalog.lexical.scores(tokens(q))).max()
                for v, q in zip(off, OFF_TOPIC, strict=True)
            ]
        )
        hybrid_ok = np.array([c == name for c, (_, name) in zip(hybrid, requests, strict=True)])
        sweep = {}
        for threshold in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
            sweep[str(threshold)] = {
                "correct_and_kept": int((hybrid_ok & (on_relevance >= threshold)).sum()),
                "off_topic_rejected": int((off_relevance < threshold).sum()),
            }
        result[mode] = {
            "top1_accuracy": round(float(correct.mean()), 3),
            "top1_accuracy_with_lexical": round(hybrid_correct / len(requests), 3),
            "rows": int(catalog.matrix.shape[0]),
            "median_best_similarity_on_topic": round(float(np.median(on_best)), 3),
            "median_best_similarity_off_topic": round(float(np.median(off_best)), 3),
            "thresholds": sweep,
        }
    return result


# --- 4. dev set on the evaluation's fleet ---------------------------------------------------

#: Hand-written requests for the fleet of benchmarks/routing_quality/agents.yaml, written for
#: tuning the router's constants without touching the labelled evaluation (requests.yaml).
#: (label, content type, body: text, or a generated payload kind "png"/"jpeg"/"wav"/"pdf:..."
#: / "json:..." , Broker-Text or None)
DEV: list[tuple[str, str, str, str | None]] = [
    (
        "support-triage",
        "text/plain",
        "my order arrived broken and the box was soaked, I want a replacement",
        None,
    ),
    (
        "support-triage",
        "text/plain",
        "customer on the enterprise plan cannot log in since this morning, high priority?",
        None,
    ),
    (
        "support-triage",
        "text/plain",
        "why was my card declined when I tried to upgrade my plan",
        None,
    ),
    (
        "translator",
        "text/plain",
        "Bonjour, je voudrais annuler ma réservation pour demain soir. Merci beaucoup.",
        None,
    ),
    (
        "translator",
        "text/plain",
        "can you turn this into french for our paris office: the office will close early on friday",
        None,
    ),
    (
        "translator",
        "text/markdown",
        "# Release notes\n- faster sync\n- dark mode\nneed this in Korean and Dutch",
        None,
    ),
    (
        "sql-analyst",
        "text/plain",
        "how many new customers signed up per week in march, split by country",
        None,
    ),
    (
        "sql-analyst",
        "text/plain",
        "average basket size for repeat buyers vs first-time buyers last quarter",
        None,
    ),
    ("sql-analyst", "text/plain", "revenue by product line for 2024, as a table please", None),
    (
        "code-reviewer",
        "text/x-diff",
        "--- a/app.py\n+++ b/app.py\n@@ -1,3 +1,4 @@\n-def load(p):\n+def load(p, cache={}):\n+    cache[p] = open(p).read()\n     return cache[p]",  # noqa: E501
        None,
    ),
    (
        "code-reviewer",
        "text/plain",
        'Traceback (most recent call last):\n  File "main.py", line 12, in <module>\n    print(items[3])\nIndexError: list index out of range',  # noqa: E501
        None,
    ),
    (
        "code-reviewer",
        "text/plain",
        "is this function thread safe? func (c *Counter) Inc() { c.n++ }",
        None,
    ),
    (
        "meeting-summarizer",
        "text/vtt",
        "WEBVTT\n\n00:00:01.000 --> 00:00:04.000\nAnna: ok so we ship on monday\n\n00:00:05.000 --> 00:00:09.000\nBen: I'll update the docs before then",  # noqa: E501
        None,
    ),
    (
        "meeting-summarizer",
        "text/plain",
        "notes from the planning session: agreed to drop feature X, Sam owns the migration, revisit budget next sprint. what are the takeaways?",  # noqa: E501
        None,
    ),
    (
        "calendar-scheduler",
        "text/plain",
        "can we get the whole design team together for an hour sometime wednesday or thursday",
        None,
    ),
    (
        "calendar-scheduler",
        "text/plain",
        "move my dentist appointment to next monday morning",
        None,
    ),
    (
        "calendar-scheduler",
        "text/calendar",
        "BEGIN:VCALENDAR\nBEGIN:VEVENT\nSUMMARY:Quarterly planning\nDTSTART:20250312T100000Z\nEND:VEVENT\nEND:VCALENDAR",  # noqa: E501
        None,
    ),
    (
        "contract-reviewer",
        "text/plain",
        "the lease says the tenant pays all repairs including structural ones, is that normal? anything else I should push back on",  # noqa: E501
        None,
    ),
    (
        "contract-reviewer",
        "text/plain",
        "Section 9.2: Either party may terminate this Agreement upon thirty days written notice. Indemnification shall be unlimited.",  # noqa: E501
        None,
    ),
    (
        "expense-auditor",
        "text/plain",
        "am I allowed to claim a business class flight for a 3 hour trip?",
        None,
    ),
    (
        "expense-auditor",
        "text/csv",
        "date,employee,category,amount\n2025-01-03,j.doe,meals,84.00\n2025-01-03,j.doe,meals,84.00\n2025-01-04,j.doe,hotel,310.00",
        None,
    ),
    (
        "content-moderator",
        "text/plain",
        "you people are idiots and I hope your whole company burns down",
        None,
    ),
    (
        "content-moderator",
        "text/plain",
        "selling cheap replica watches and prescription pills, dm me",
        None,
    ),
    (
        "sensor-anomaly",
        "application/json",
        'json:{"device": "compressor-7", "readings": [{"t": 1700000000, "vibration_mm_s": 2.1}, {"t": 1700000060, "vibration_mm_s": 2.2}, {"t": 1700000120, "vibration_mm_s": 9.8}]}',  # noqa: E501
        None,
    ),
    (
        "sensor-anomaly",
        "application/json",
        'json:{"sensor_id": "fridge-2", "temperature_c": [3.9, 4.0, 4.1, 7.5, 8.2], "interval_s": 300}',  # noqa: E501
        None,
    ),
    (
        "sensor-anomaly",
        "application/json",
        'json:{"asset": "pump-12", "current_a": [11.2, 11.4, 11.9, 12.8, 13.9], "hours_run": 18200}',  # noqa: E501
        "how long until this one breaks down",
    ),
    (
        "support-triage",
        "application/json",
        'json:{"ticket": 4411, "from": "lena@example.com", "subject": "Refund not received", "message": "I returned the shoes three weeks ago and still no refund"}',  # noqa: E501
        None,
    ),
    (
        "expense-auditor",
        "application/json",
        'json:{"claimant": "p.khan", "trip": "Berlin", "items": [{"type": "hotel", "amount": 420}, {"type": "dinner", "amount": 190}], "receipts_attached": 1}',  # noqa: E501
        None,
    ),
    (
        "translator",
        "application/json",
        'json:{"settings.title": "Settings", "settings.logout": "Log out", "cart.empty": "Your cart is empty"}',  # noqa: E501
        "we need these in italian",
    ),
    (
        "image-captioner",
        "image/jpeg",
        "jpeg",
        "what's going on in this photo? need a sentence for accessibility",
    ),
    ("image-captioner", "image/png", "png", "keywords for our media library"),
    ("content-moderator", "image/png", "png", "user uploaded this as their avatar, ok to show?"),
    ("photo-ocr", "image/png", "png", "copy the words from this whiteboard picture"),
    ("photo-ocr", "image/jpeg", "jpeg", "what does the small print on the battery say"),
    ("invoice-extractor", "image/jpeg", "jpeg", "total and VAT from this restaurant bill please"),
    ("speech-transcriber", "audio/wav", "wav", "need the words of this interview written down"),
    ("speech-transcriber", "audio/wav", "wav", None),
    (
        "meeting-summarizer",
        "audio/wav",
        "wav",
        "recording of the board call, what were the main decisions",
    ),
    (
        "invoice-extractor",
        "application/pdf",
        "pdf:INVOICE No. 2024-118|Supplier: Nordic Parts AB|Item: bearings x 40  EUR 1,240.00|VAT 25%  EUR 310.00|Total due EUR 1,550.00 by 30 days",  # noqa: E501
        None,
    ),
    (
        "contract-reviewer",
        "application/pdf",
        "pdf:MUTUAL NON-DISCLOSURE AGREEMENT|1. Confidential Information means ...|7. Term: this agreement renews automatically each year|8. Governing law: Delaware",  # noqa: E501
        None,
    ),
    (
        "expense-auditor",
        "application/pdf",
        "pdf:Travel expense report - March|Taxi 45.00|Hotel 3 nights 690.00|Dinner with client 240.00|Employee signature",  # noqa: E501
        "ok to approve?",
    ),
    (
        "photo-ocr",
        "application/pdf",
        "pdf:Dear Mr. Jensen,|thank you for your letter of 4 May.|Kind regards",
        "scanned letter, make it searchable",
    ),
]


def _dev_payload(content_type: str, body: str) -> bytes:
    if body.startswith("json:"):
        return body[5:].encode()
    if body.startswith("pdf:"):
        return payloads.pdf(body[4:].split("|"))
    if body in payloads.GENERATORS:
        return payloads.build({"kind": body, "seed": len(content_type)})
    return body.encode()


def bench_dev(
    args: argparse.Namespace, embedder: Embedder | None = None, policy: Policy | None = None
) -> dict[str, Any]:
    """Top-1 on :data:`DEV` (or on ``args.dev_file``) over the evaluation's fleet, in
    process, ``choice: best`` unless ``policy`` says otherwise."""
    fleet = yaml.safe_load((ROOT / "benchmarks/routing_quality/agents.yaml").read_text())
    records = [record(i, manifest) for i, manifest in enumerate(fleet["agents"])]
    snapshot = RegistrySnapshot({(TENANT, r.name): r for r in records}, len(records))
    embedder = embedder or load_embedder(None)  # the broker's default, as --quality uses
    policy = policy or Policy(choice=Choice.BEST, require_live=False)
    scorer = Scorer(embedder, policy, cache=CatalogCache(embedder))
    requests = _dev_requests(getattr(args, "dev_file", None))
    misses: list[str] = []
    for label, payload, headers, shown in requests:
        decision = scorer.decide(snapshot, TENANT, payload, headers, {})
        if decision.agent != label:
            misses.append(f"{label} <- {decision.agent}: {shown[:50]!r}")
    return {
        "requests": len(requests),
        "top1_accuracy": round(1 - len(misses) / len(requests), 3),
        "misses": misses,
    }


def _dev_requests(dev_file: Path | None) -> list[tuple[str, bytes, dict[str, str], str]]:
    """(label, payload, headers, what a miss shows) for :data:`DEV`, or for every request of
    a file in the evaluation's schema (``routing_quality/dataset.py``)."""
    if dev_file is not None:
        loaded = dataset.load(requests_file=dev_file)
        if loaded.errors:
            raise SystemExit(f"{dev_file}: {loaded.errors}")
        return [(r.label, r.body, r.headers(), f"{r.id} {r.plain_text()}") for r in loaded.requests]
    requests = []
    for label, content_type, body, text in DEV:
        headers = {"Content-Type": content_type}
        if text is not None:
            headers["Broker-Text"] = quote(text, safe="")
        requests.append((label, _dev_payload(content_type, body), headers, text or body))
    return requests


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--decisions", type=int, default=20000, help="per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per ratio")
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the LSH comparison")
    parser.add_argument("--queries", type=int, default=300, help="queries for the LSH comparison")
    parser.add_argument("--skip-lsh", action="store_true")
    parser.add_argument("--quality", action="store_true", help="also run the quality set")
    parser.add_argument(
        "--dev", action="store_true", help="only the dev set on the evaluation's fleet (fast)"
    )
    parser.add_argument(
        "--embedder", default=None, help="embedder spec for --dev and --quality (default: default)"
    )
    parser.add_argument(
        "--dev-file", type=Path, default=None, help="--dev on this request file instead of DEV"
    )
    parser.add_argument(
        "--policy", type=Path, default=None, help="routing policy YAML for --dev (default: best)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("warning")
    if args.dev:
        policy = None
        if args.policy is not None:
            policy = Policy.model_validate(yaml.safe_load(args.policy.read_text()) or {})
        dev = bench_dev(args, load_embedder(args.embedder), policy)
        print(json.dumps(dev, indent=2))
        return

    result: dict[str, Any] = {
        "decide": bench_decide(args),
        "scorer_with_hashing_embedder": bench_scorer(args),
    }
    if not args.skip_lsh:
        result["lsh"] = bench_lsh(args)
    if args.quality:
        result["quality"] = bench_quality(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    report(args, result)


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    d, s = result["decide"], result["scorer_with_hashing_embedder"]
    ok = "ok" if d["ratio"] >= 0.5 else "MISSED"
    print(f"\nrouting benchmark: {args.agents} agents x {args.dim}-d, {args.rounds} rounds")
    print(
        f"decide (query given)       {d['ours']['per_s']:>9,}/s  p50 {d['ours']['p50_us']:>6} us"
        f"  p99 {d['ours']['p99_us']:>6} us"
    )
    print(
        f"bare matvec + argpartition {d['bare']['per_s']:>9,}/s  p50 {d['bare']['p50_us']:>6} us"
        f"  p99 {d['bare']['p99_us']:>6} us"
    )
    print(
        f"ratio                      {d['ratio']:>9.2f}x  target >= 0.5x {ok}  "
        f"per round {d['ratio_per_round']}"
    )
    print(
        f"  chose the nearest agent in {d['chosen_is_the_nearest_agent']:.1%} of decisions; "
        f"first decision after a new loads mapping {d['first_decision_after_new_loads_us']} us"
    )
    keys = d["live_as_a_new_keys_view"]
    print(
        f"  with live=loads.keys() (a new object per call) {keys['ours']['per_s']:,}/s, "
        f"p50 {keys['ours']['p50_us']} us, ratio {keys['ratio']:.2f}x"
    )
    print(
        f"Scorer.decide + hashing    {s['ours']['per_s']:>9,}/s  p50 {s['ours']['p50_us']:>6} us"
        f"  p99 {s['ours']['p99_us']:>6} us"
    )
    print(f"bare matvec + argpartition {s['bare']['per_s']:>9,}/s   ratio {s['ratio']:.2f}x")
    print(
        f"  extract p50 {s['extract_us_p50']} us, embed p50 {s['embed_one_text_us_p50']} us, "
        f"catalog build {s['catalog_build_s']} s, chose the described agent in "
        f"{s['chosen_is_the_described_agent']:.1%}"
    )
    if "lsh" in result:
        lsh, q8 = result["lsh"]["lsh"], result["lsh"]["int8_brute_force"]
        print(
            f"\nLSH at {result['lsh']['rows']:,} x {result['lsh']['dim']}: {lsh['tables']} tables "
            f"x {lsh['bits']} bits, {lsh['probes']} probes, build {lsh['build_s']} s"
        )
        print(
            f"recall@3 {lsh['recall_at_3']:.3f}, speed-up {lsh['speedup']:.1f}x "
            f"(p50 {lsh['search']['p50_us']} us vs brute force {lsh['brute_force']['p50_us']} us), "
            f"median candidates {lsh['median_candidates']}"
        )
        print(
            f"int8 brute force: recall@3 {q8['recall_at_3']:.3f}, {q8['speedup']:.2f}x of float32 "
            f"(p50 {q8['search']['p50_us']} us)"
        )
    if "quality" in result:
        quality = result["quality"]
        print(
            f"\nquality ({quality['embedder']} embedder, {quality['agents']} agents, "
            f"{quality['requests']} held-out requests, {len(OFF_TOPIC)} off-topic):"
        )
        for mode in ("rows", "mean", "none"):
            q = result["quality"][mode]
            on, off = q["median_best_similarity_on_topic"], q["median_best_similarity_off_topic"]
            print(
                f"  examples={mode:<4} top-1 {q['top1_accuracy']:.3f} (with lexical "
                f"{q['top1_accuracy_with_lexical']:.3f})  median best similarity "
                f"on/off topic {on}/{off}"
            )
            for threshold, row in q["thresholds"].items():
                print(
                    f"    threshold {threshold:<4}: {row['correct_and_kept']:>2}/45 correct and "
                    f"kept, {row['off_topic_rejected']:>2}/10 off-topic rejected"
                )


if __name__ == "__main__":
    main()
