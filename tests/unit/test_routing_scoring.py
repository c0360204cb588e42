"""Routing scores and decisions: load weights and penalties, filters, choice, policy, catalog."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from broker.envelope import Tenant
from broker.registry.manifest import AgentManifest, AgentName, Limits, Modality
from broker.registry.snapshot import AgentRecord, RegistrySnapshot
from broker.routing import (
    DEFAULT_POLICY,
    AgentLoad,
    CandidateScore,
    Catalog,
    CatalogCache,
    Choice,
    Decision,
    DecisionReason,
    HashingEmbedder,
    InvalidRoutingHeader,
    Policy,
    PolicyInvalid,
    Scorer,
    build_catalog,
    decide,
    extract,
    load_policy,
    load_score,
)
from broker.routing.catalog import LexicalIndex
from broker.routing.features import encode_embedding
from broker.routing.scoring import _top_distinct

pytestmark = pytest.mark.unit

T = Tenant("acme")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(24)
PDF = b"%PDF-1.7\n"
EMBEDDER = HashingEmbedder()
TEXT = {"Content-Type": "text/plain"}


def policy(**changes: Any) -> Policy:
    return Policy.model_validate({**DEFAULT_POLICY.model_dump(), **changes})


def agent(
    name: str,
    description: str = "",
    *capabilities: dict[str, Any],
    seq: int = 1,
    tenant: str = T,
    **fields: Any,
) -> AgentRecord:
    manifest = AgentManifest.model_validate(
        {
            "name": name,
            "version": "1.0.0",
            "description": description or f"The {name} agent.",
            "capabilities": list(capabilities) or [{"action": "work"}],
            **fields,
        }
    )
    return AgentRecord(Tenant(tenant), AgentName(name), manifest, seq, seq, None)


def snapshot(*records: AgentRecord) -> RegistrySnapshot:
    return RegistrySnapshot({(r.tenant, r.name): r for r in records}, max(r.seq for r in records))


def idle(*names: str) -> dict[str, AgentLoad]:
    return {name: AgentLoad() for name in names}


ASSISTANTS = [
    agent(
        "translator",
        "Translates text and documents between English, French, German and Spanish.",
        {
            "action": "translate",
            "description": "Translate text into another language",
            "examples": ["translate this to French", "how do you say this in German"],
        },
    ),
    agent(
        "summarizer",
        "Summarises long documents, articles and reports into short abstracts.",
        {
            "action": "summarize",
            "description": "Shorten a document to its key points",
            "examples": ["give me the gist of this article", "tl;dr this report"],
        },
    ),
    agent(
        "weather",
        "Answers questions about the weather forecast, temperature and rain.",
        {
            "action": "forecast",
            "description": "Weather forecast for a city",
            "examples": ["will it rain tomorrow in Paris"],
        },
    ),
    agent(
        "ocr",
        "Reads printed text from scanned images and photos.",
        {
            "action": "ocr",
            "description": "Extract text from an image",
            "content_types": ["image/*"],
        },
    ),
    agent(
        "transcriber",
        "Transcribes speech in audio recordings to text.",
        {"action": "transcribe", "modalities": ["audio"]},
    ),
]
NAMES = [r.name for r in ASSISTANTS]


def route(
    payload: bytes,
    headers: Mapping[str, str],
    records: list[AgentRecord] = ASSISTANTS,
    loads: Mapping[str, AgentLoad] | None = None,
    rules: Policy = DEFAULT_POLICY,
    **options: Any,
) -> Decision:
    scorer = Scorer(EMBEDDER, rules)
    names = [r.name for r in records]
    return scorer.decide(
        snapshot(*records),
        T,
        payload,
        headers,
        idle(*names) if loads is None else loads,
        rng=options.pop("rng", random.Random(7)),
        **options,
    )


# --- load weights -----------------------------------------------------------------------------


def test_an_idle_agent_without_a_gpu_weighs_one() -> None:
    assert load_score(AgentLoad(), Limits()) == (1.0, ())


def test_the_weight_renormalises_over_the_signals_an_agent_has() -> None:
    limits = Limits(max_qps=100)
    half = AgentLoad(qps=50, p99_ms=100)  # qps headroom 0.5, latency 100/(100+100) = 0.5
    assert load_score(half, limits)[0] == pytest.approx(0.5)
    with_gpu = AgentLoad(qps=50, p99_ms=100, gpu_free_mb=16384, gpu_util=0.0)
    assert load_score(with_gpu, limits)[0] == pytest.approx(0.4 * 0.5 + 0.3 * 0.5 + 0.3 * 1.0)


def _without_penalties() -> Policy:
    return policy(penalties={"qps_factor": 1.0, "p99_factor": 1.0, "gpu_factor": 1.0})


def test_qps_above_80_percent_of_the_limit_costs_30_percent() -> None:
    limits = Limits(max_qps=100)
    at_limit = AgentLoad(qps=80)
    assert load_score(at_limit, limits)[1] == ()
    over = AgentLoad(qps=80.5)
    weight, penalties = load_score(over, limits)
    assert penalties == ("qps_over_80pct",)
    assert weight == pytest.approx(0.7 * load_score(over, limits, _without_penalties())[0])
    # The limit is per instance: two instances take twice the traffic before the penalty.
    assert load_score(AgentLoad(instances=2, qps=150), limits)[1] == ()


def test_p99_above_200ms_halves_the_weight() -> None:
    assert load_score(AgentLoad(p99_ms=200), Limits())[1] == ()
    slow = AgentLoad(p99_ms=201)
    weight, penalties = load_score(slow, Limits())
    assert penalties == ("p99_over_200ms",)
    assert weight == pytest.approx(0.5 * load_score(slow, Limits(), _without_penalties())[0])


def test_gpu_memory_below_the_minimum_zeroes_the_weight() -> None:
    weight, penalties = load_score(AgentLoad(gpu_free_mb=1023, gpu_util=0.1), Limits())
    assert (weight, penalties) == (0.0, ("gpu_memory_low",))
    assert load_score(AgentLoad(gpu_free_mb=1024), Limits())[0] > 0


def test_penalties_multiply() -> None:
    load = AgentLoad(qps=95, p99_ms=450)
    limits = Limits(max_qps=100)
    weight, penalties = load_score(load, limits)
    assert penalties == ("qps_over_80pct", "p99_over_200ms")
    assert weight == pytest.approx(0.35 * load_score(load, limits, _without_penalties())[0])


def test_penalty_names_follow_the_configured_thresholds() -> None:
    rules = policy(penalties={"qps_ratio": 0.9, "p99_ms": 150.5})
    assert load_score(AgentLoad(qps=95, p99_ms=151), Limits(max_qps=100), rules)[1] == (
        "qps_over_90pct",
        "p99_over_150.5ms",
    )


def test_a_reported_error_rate_lowers_the_weight_and_is_named_as_a_penalty() -> None:
    """A heartbeat reporting failures multiplies the weight by ``1 - error_rate``: on a
    running broker an agent that had failed twice was recorded with ``load: 0.0`` and no
    penalty (the cooldown needs three), so the decision did not say why it ranked last."""
    assert load_score(AgentLoad(error_rate=1.0), Limits()) == (0.0, ("error_rate",))
    weight, penalties = load_score(AgentLoad(error_rate=0.25, p99_ms=300), Limits())
    assert weight == pytest.approx((0.4 + 0.3 * 100 / 400) / 0.7 * 0.75 * 0.5)
    assert penalties == ("p99_over_200ms", "error_rate")
    ignored = policy(load={"error_weight": 0})
    assert load_score(AgentLoad(error_rate=1.0), Limits(), ignored) == (1.0, ())


def test_an_agent_without_a_load_report_gets_the_unknown_weight() -> None:
    assert load_score(None, Limits()) == (0.5, ("no_load_report",))


def wild(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats in range, and the NaN and infinities a broken load report could carry."""
    return st.floats(low, high) | st.sampled_from([math.nan, math.inf, -math.inf])


loads_strategy = st.builds(
    AgentLoad,
    instances=st.integers(0, 8),
    qps=wild(-10, 1e6),
    in_flight=st.integers(0, 10_000),
    p50_ms=st.floats(0, 1e5),
    p99_ms=wild(-1, 1e6),
    error_rate=wild(-1, 2),
    gpu_free_mb=st.none() | wild(-1, 1e6),
    gpu_util=st.none() | wild(-1, 2),
)
limits_strategy = st.builds(
    Limits,
    max_qps=st.none() | st.floats(0.1, 1e4),
    max_concurrency=st.none() | st.integers(1, 512),
)


@settings(max_examples=400, deadline=None)
@given(load=loads_strategy, limits=limits_strategy)
def test_load_weights_stay_within_0_and_1_whatever_is_reported(
    load: AgentLoad, limits: Limits
) -> None:
    weight, penalties = load_score(load, limits)
    assert 0.0 <= weight <= 1.0
    assert set(penalties) <= {"qps_over_80pct", "p99_over_200ms", "gpu_memory_low", "error_rate"}


sane_loads = st.builds(
    AgentLoad,
    instances=st.integers(1, 8),
    qps=st.floats(0, 1e4),
    in_flight=st.integers(0, 1000),
    p99_ms=st.floats(0, 1e4),
    error_rate=st.floats(0, 1),
    gpu_free_mb=st.none() | st.floats(0, 1e5),
    gpu_util=st.none() | st.floats(0, 1),
)


@settings(max_examples=500, deadline=None)
@given(
    base=sane_loads,
    limits=limits_strategy,
    more_qps=st.floats(0, 1e4),
    more_in_flight=st.integers(0, 1000),
    more_p99=st.floats(0, 1e4),
    more_errors=st.floats(0, 1),
    less_gpu=st.floats(0, 1e5),
    more_util=st.floats(0, 1),
)
def test_more_load_never_gives_a_higher_weight(
    base: AgentLoad,
    limits: Limits,
    more_qps: float,
    more_in_flight: int,
    more_p99: float,
    more_errors: float,
    less_gpu: float,
    more_util: float,
) -> None:
    busier = AgentLoad(
        instances=base.instances,
        qps=base.qps + more_qps,
        in_flight=base.in_flight + more_in_flight,
        p99_ms=base.p99_ms + more_p99,
        error_rate=min(1.0, base.error_rate + more_errors),
        gpu_free_mb=None if base.gpu_free_mb is None else max(0.0, base.gpu_free_mb - less_gpu),
        gpu_util=None if base.gpu_util is None else min(1.0, base.gpu_util + more_util),
    )
    assert load_score(busier, limits)[0] <= load_score(base, limits)[0]


# --- decision records -------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False)
candidates_strategy = st.builds(
    CandidateScore,
    agent=st.text(min_size=1, max_size=20),
    capability=st.text(min_size=1, max_size=20),
    semantic=finite,
    load=finite,
    score=finite,
    penalties=st.lists(st.text(max_size=20), max_size=4).map(tuple),
    load_inputs=st.none()
    | st.builds(
        AgentLoad,
        instances=st.integers(0, 100),
        qps=finite,
        in_flight=st.integers(0, 1000),
        p50_ms=finite,
        p99_ms=finite,
        error_rate=finite,
        gpu_free_mb=st.none() | finite,
        gpu_util=st.none() | finite,
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    decision=st.builds(
        Decision,
        agent=st.none() | st.text(max_size=30),
        capability=st.none() | st.text(max_size=30),
        reason=st.sampled_from(DecisionReason),
        detail=st.text(max_size=200),
        candidates=st.lists(candidates_strategy, max_size=4).map(tuple),
        policy_version=st.text(min_size=1, max_size=20),
        mirror_to=st.none() | st.text(max_size=30),
    )
)
def test_decisions_round_trip_through_json_exactly(decision: Decision) -> None:
    assert Decision.from_dict(orjson.loads(orjson.dumps(decision.to_dict()))) == decision


def test_a_decision_record_with_more_keys_still_reads() -> None:
    decision = route(b"translate this letter to German", TEXT)
    record = {**decision.to_dict(), "tenant": "acme", "message_seq": 9, "attempt": 2}
    assert Decision.from_dict(record) == decision


def test_agent_load_from_dict_tolerates_missing_and_unknown_keys() -> None:
    assert AgentLoad.from_dict({}) == AgentLoad()
    assert AgentLoad.from_dict({"qps": 3, "gpu_free_mb": 100, "extra": True}) == AgentLoad(
        qps=3.0, gpu_free_mb=100.0
    )
    load = AgentLoad(2, 1.5, 3, 4.0, 5.0, 0.1, 6.0, 0.7)
    assert AgentLoad.from_dict(load.to_dict()) == load


# --- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("please translate this letter into German", "translator"),
        ("can you summarise the attached quarterly report", "summarizer"),
        ("is it going to rain in Berlin tomorrow", "weather"),
    ],
)
def test_the_semantically_closest_agent_is_chosen(text: str, expected: str) -> None:
    decision = route(text.encode(), TEXT)
    assert decision.reason is DecisionReason.SCORED
    assert decision.agent == expected
    assert decision.candidates[0].agent == expected
    assert decision.policy_version == "default-1"
    assert f"chose '{expected}'" in decision.detail


def test_an_intent_restricts_to_that_action_whatever_the_text_says() -> None:
    decision = route(b"is it going to rain tomorrow", {**TEXT, "Broker-Intent": "translate"})
    assert (decision.agent, decision.capability) == ("translator", "translate")
    assert [c.agent for c in decision.candidates] == ["translator"]


def test_an_intent_nobody_offers_is_explained() -> None:
    decision = route(b"hello", {**TEXT, "Broker-Intent": "teleport"})
    assert decision.agent is None
    assert decision.reason is DecisionReason.NO_CANDIDATE
    assert decision.detail == "no agent offers action 'teleport'"


def test_images_go_to_agents_that_accept_images_even_without_text() -> None:
    decision = route(PNG, {"Content-Type": "image/png"})
    assert decision.agent == "ocr"
    assert "no text or embedding to compare, ranked by load" in decision.detail
    untyped = route(PNG, {})  # recognised by its magic bytes
    assert untyped.agent == "ocr"


def test_a_content_type_list_matches_the_type_magic_bytes_name() -> None:
    png_only = agent("png-reader", "", {"action": "read", "content_types": ["image/png"]})
    assert route(PNG, {}, [png_only]).agent == "png-reader"
    gif = b"GIF89a" + bytes(10)
    assert route(gif, {}, [png_only]).agent is None


def test_audio_goes_to_agents_with_the_audio_modality() -> None:
    assert route(WAV, {"Content-Type": "audio/wav"}).agent == "transcriber"
    assert route(WAV, {}).agent == "transcriber"


def test_a_capability_that_declares_nothing_takes_text_and_json_only() -> None:
    plain = [agent("plain", "Does anything with words.")]
    as_json = {"Content-Type": "application/json"}
    assert route(b'{"q": "translate this to French"}', as_json).agent == "translator"
    assert route(b"does anything with words", TEXT, plain).agent == "plain"
    assert route(b'{"q": "does anything with words"}', as_json, plain).agent == "plain"
    refused = route(PDF, {"Content-Type": "application/pdf"}, plain)
    assert refused.agent is None
    assert refused.detail == "no agent accepts application/pdf (document)"


def test_an_unaccepted_media_type_is_explained_with_the_intent() -> None:
    decision = route(WAV, {"Content-Type": "audio/wav", "Broker-Intent": "ocr"})
    assert decision.agent is None
    assert decision.detail == "no agent for action 'ocr' accepts audio/wav (audio)"


CANARY_PAIR = [
    agent("stable", "Summarises reports.", {"action": "summarize"}),
    agent("next", "Summarises reports.", {"action": "summarize"}, labels={"env": "canary"}),
]


def test_canary_agents_get_only_canary_traffic() -> None:
    for seed in range(30):
        normal = route(b"summarise reports", TEXT, CANARY_PAIR, rng=random.Random(seed))
        canary = route(
            b"summarise reports", {**TEXT, "X-Env": "canary"}, CANARY_PAIR, rng=random.Random(seed)
        )
        assert normal.agent == "stable"
        assert canary.agent == "next"


def test_a_canary_message_with_no_canary_agent_is_not_routed() -> None:
    decision = route(b"summarise reports", {**TEXT, "x-env": "canary"}, CANARY_PAIR[:1])
    assert decision.agent is None
    assert decision.detail == "no canary agent (env=canary) accepts text/plain (text)"
    only_canary = route(b"summarise reports", TEXT, CANARY_PAIR[1:])
    assert only_canary.agent is None
    assert "only canary agents (env=canary: next)" in only_canary.detail


REPLICAS = [
    agent(f"worker-{i}", "Summarises long reports into short abstracts.", {"action": "summarize"})
    for i in range(3)
]
REPLICA_NAMES = [r.name for r in REPLICAS]


def test_an_agent_in_cooldown_is_not_chosen_while_another_can_take_it() -> None:
    for seed in range(20):
        decision = route(
            b"summarise this report",
            TEXT,
            REPLICAS[:2],
            cooling={"worker-0"},
            rng=random.Random(seed),
        )
        assert decision.agent == "worker-1"
        cooled = next(c for c in decision.candidates if c.agent == "worker-0")
        assert cooled.penalties == ("cooldown",)
        assert cooled.load == 0.0


def test_when_every_candidate_cools_down_the_best_is_still_chosen_and_said_so() -> None:
    decision = route(b"summarise this report", TEXT, REPLICAS[:1], cooling={"worker-0"})
    assert decision.agent == "worker-0"
    assert "every candidate is saturated or cooling down" in decision.detail


def test_agents_already_tried_are_excluded() -> None:
    decision = route(b"summarise this report", TEXT, REPLICAS, exclude={"worker-0", "worker-1"})
    assert decision.agent == "worker-2"
    nobody = route(b"summarise this report", TEXT, REPLICAS, exclude=set(REPLICA_NAMES))
    assert nobody.reason is DecisionReason.NO_CANDIDATE
    assert nobody.detail == (
        "every agent that accepts text/plain (text) was already tried "
        "(worker-0, worker-1, worker-2)"
    )


def test_only_live_agents_are_eligible() -> None:
    decision = route(b"summarise this report", TEXT, REPLICAS, live=frozenset({"worker-2"}))
    assert decision.agent == "worker-2"
    nobody = route(b"summarise this report", TEXT, REPLICAS, live=frozenset())
    assert nobody.agent is None
    assert "has a live instance (registered: worker-0, worker-1, worker-2)" in nobody.detail


#: A fallback agent the tenant has, which takes none of the messages below itself.
GENERALIST = agent(
    "generalist", "Handles what nobody else does.", {"action": "film", "modalities": ["video"]}
)


def test_no_candidate_goes_to_the_fallback_agent_unless_it_was_tried() -> None:
    rules = policy(fallback_agent="generalist", mirror={"generalist": "generalist-next"})
    with_generalist = [*ASSISTANTS, GENERALIST]
    decision = route(PDF, {"Content-Type": "application/pdf"}, with_generalist, rules=rules)
    assert (decision.agent, decision.reason) == ("generalist", DecisionReason.FALLBACK)
    assert decision.detail.endswith("; sent to the fallback agent 'generalist'")
    assert decision.mirror_to == "generalist-next"
    tried = route(
        PDF,
        {"Content-Type": "application/pdf"},
        with_generalist,
        rules=rules,
        exclude={"generalist"},
    )
    assert tried.agent is None
    assert tried.reason is DecisionReason.NO_CANDIDATE
    assert "the fallback agent 'generalist' was already tried" in tried.detail


def test_text_unlike_every_agent_is_below_the_threshold() -> None:
    decision = route(b"zebra xylophone quasar", TEXT)
    assert decision.agent is None
    assert decision.reason is DecisionReason.BELOW_THRESHOLD
    assert "below the threshold 0.2" in decision.detail
    assert decision.candidates  # the closest ones, for audit
    assert all(c.semantic < 0.2 for c in decision.candidates)
    fallback = route(
        b"zebra xylophone quasar",
        TEXT,
        [*ASSISTANTS, GENERALIST],
        rules=policy(fallback_agent="generalist"),
    )
    assert (fallback.agent, fallback.reason) == ("generalist", DecisionReason.FALLBACK)


def test_a_fallback_agent_the_tenant_does_not_have_dead_letters_instead() -> None:
    """One policy serves every tenant. Its fallback agent, registered by one tenant, was the
    decision for the others' messages too: they went to an inbox no agent reads (neither
    handled nor dead-lettered), and a waiting caller got 504 after its whole timeout. Seen
    on a running broker with ``fallback_agent: generalist`` and no such agent."""
    rules = policy(fallback_agent="generalist")
    other = GENERALIST.manifest.model_dump()
    theirs = AgentRecord(
        Tenant("other"), AgentName("generalist"), AgentManifest.model_validate(other), 9, 9, None
    )
    for payload, headers, reason in [
        (PDF, {"Content-Type": "application/pdf"}, DecisionReason.NO_CANDIDATE),
        (b"zebra xylophone quasar", TEXT, DecisionReason.BELOW_THRESHOLD),
    ]:
        decision = route(payload, headers, [*ASSISTANTS, theirs], rules=rules)
        assert (decision.agent, decision.reason) == (None, reason)
        assert decision.detail.endswith("; no fallback: tenant 'acme' has no agent 'generalist'")
    nobody = route(PDF, {"Content-Type": "application/pdf"}, [theirs], rules=rules)
    assert (nobody.agent, nobody.reason) == (None, DecisionReason.NO_CANDIDATE)


# --- choice -------------------------------------------------------------------------------------

REPLICA_LOADS = {
    "worker-0": AgentLoad(qps=10, p99_ms=20),
    "worker-1": AgentLoad(qps=60, p99_ms=80),
    "worker-2": AgentLoad(qps=150, p99_ms=190),
}


def _choices(rules: Policy, loads: Mapping[str, AgentLoad] = REPLICA_LOADS) -> Counter[str]:
    """Who 300 routings of the same message go to, among the replicas that have a load."""
    rng = random.Random(3)
    replicas = [r for r in REPLICAS if r.name in loads]
    return Counter(
        route(b"summarise this report", TEXT, replicas, loads, rules, rng=rng).agent
        for _ in range(300)
    )


def test_p2c_never_picks_the_most_loaded_of_three_equal_matches() -> None:
    chosen = _choices(DEFAULT_POLICY)
    assert chosen["worker-2"] == 0
    assert chosen["worker-0"] > chosen["worker-1"] > 0


def test_wrr_spreads_over_every_candidate_and_best_takes_the_top() -> None:
    assert set(_choices(policy(choice="wrr"))) == set(REPLICA_NAMES)
    assert _choices(policy(choice=Choice.BEST)) == Counter({"worker-0": 300})


def test_a_gpu_starved_agent_ranks_last() -> None:
    loads = {
        "worker-0": AgentLoad(gpu_free_mb=100, gpu_util=0.99),
        "worker-1": AgentLoad(qps=90, p99_ms=150, gpu_free_mb=8000),
    }
    for rules in (DEFAULT_POLICY, policy(choice="best"), policy(choice="wrr")):
        assert _choices(rules, loads) == Counter({"worker-1": 300})


def test_a_clearly_better_match_is_not_traded_for_a_lighter_load() -> None:
    loads = {name: AgentLoad(qps=150, p99_ms=400) for name in NAMES}
    loads["weather"] = AgentLoad()
    for seed in range(20):
        decision = route(
            b"please translate this letter into German", TEXT, loads=loads, rng=random.Random(seed)
        )
        assert decision.agent == "translator"


def test_a_new_loads_mapping_is_taken_into_account() -> None:
    catalog = build_catalog(REPLICAS[:2], EMBEDDER)
    features = extract(b"summarise this report", TEXT)
    query = EMBEDDER.embed([features.text or ""])[0]
    rules = policy(choice="best")
    busy_0 = {"worker-0": AgentLoad(p99_ms=900), "worker-1": AgentLoad()}
    busy_1 = {"worker-0": AgentLoad(), "worker-1": AgentLoad(p99_ms=900)}
    assert decide(catalog, features, busy_0, rules, query=query).agent == "worker-1"
    assert decide(catalog, features, busy_1, rules, query=query).agent == "worker-0"


def test_a_zero_query_vector_carries_no_meaning_and_routes_by_load() -> None:
    catalog = build_catalog(REPLICAS[:2], EMBEDDER)
    features = extract(b"", {})
    loads = {"worker-0": AgentLoad(p99_ms=900), "worker-1": AgentLoad()}
    zero = np.zeros(384, dtype=np.float32)
    decision = decide(catalog, features, loads, policy(choice="best"), query=zero)
    assert decision.agent == "worker-1"
    assert decision.candidates[0].semantic == 0.0
    assert "ranked by load" in decision.detail


def test_the_mirror_map_names_a_shadow() -> None:
    rules = policy(mirror={"translator": "translator-v2"})
    decision = route(b"translate this to French", TEXT, rules=rules)
    assert (decision.agent, decision.mirror_to) == ("translator", "translator-v2")
    assert route(b"summarise the report", TEXT, rules=rules).mirror_to is None


def test_a_shadow_gets_copies_only_never_a_message_of_its_own() -> None:
    """A version on trial registered with the same capabilities as the agent it shadows
    used to be drawn for real messages too (its replies then went to callers): taking no
    traffic of its own, it even looked the less loaded of the two."""
    twin = agent(
        "translator-v2",
        ASSISTANTS[0].manifest.description,
        *[c.model_dump(exclude_none=True) for c in ASSISTANTS[0].manifest.capabilities],
    )
    records = [*ASSISTANTS, twin]
    text = b"translate this to French"
    busy = AgentLoad(qps=80, p99_ms=50)
    loads = {**idle(*NAMES), "translator": busy, "translator-v2": AgentLoad()}
    assert route(text, TEXT, records, loads).agent == "translator-v2"  # without the mirror
    rules = policy(mirror={"translator": "translator-v2"})
    decisions = [
        route(text, TEXT, records, loads, rules=rules, rng=random.Random(s)) for s in range(40)
    ]
    assert {(d.agent, d.mirror_to) for d in decisions} == {("translator", "translator-v2")}
    alone = route(text, TEXT, [twin], rules=rules)  # the shadow is all there is
    assert alone.agent is None
    assert "mirror's shadow" in alone.detail


def test_an_agent_appears_once_with_its_best_capability() -> None:
    multi = agent(
        "polyglot",
        "Language services.",
        {"action": "translate", "description": "translate text to French or German"},
        {"action": "detect-language", "description": "which language is this text"},
        {"action": "spellcheck", "description": "fix spelling mistakes in text"},
    )
    decision = route(b"translate this to German", TEXT, [multi, *REPLICAS])
    agents = [c.agent for c in decision.candidates]
    assert len(agents) == len(set(agents))
    assert (decision.agent, decision.capability) == ("polyglot", "translate")


@settings(max_examples=60, deadline=None)
@given(
    loads=st.lists(st.none() | sane_loads, min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
    weight=st.floats(0, 1),
    choice=st.sampled_from(Choice),
    text=st.sampled_from(
        ["translate to German", "summarise reports", "rain tomorrow", "zebra", "report"]
    ),
)
def test_decisions_are_well_formed_for_any_loads_and_weights(
    loads: list[AgentLoad | None], seed: int, weight: float, choice: Choice, text: str
) -> None:
    reported = {name: load for name, load in zip(NAMES, loads, strict=True) if load is not None}
    rules = policy(semantic_weight=weight, choice=choice)
    decision = route(text.encode(), TEXT, loads=reported, rules=rules, rng=random.Random(seed))
    assert len(decision.candidates) <= rules.top_k
    assert len({c.agent for c in decision.candidates}) == len(decision.candidates)
    # relevance: cosine + lexical_weight x [0, 1) + priors (this catalog declares no types)
    most = 1.0 + rules.lexical_weight + rules.type_prior + 2 * rules.modality_prior + 1e-6
    for c in decision.candidates:
        assert -1.0 - 1e-6 <= c.semantic <= most
        assert 0.0 <= c.load <= 1.0
        assert -weight - 1e-6 <= c.score <= weight * most + (1.0 - weight) + 1e-6
        assert c.load_inputs == reported.get(c.agent)
    if decision.reason is DecisionReason.SCORED:
        assert decision.agent in {c.agent for c in decision.candidates}
        ranked = [(c.load > 0, c.score) for c in decision.candidates]
        # scores within 1e-6 rank as equal, in the catalog's order (broker.routing.scoring._TIE)
        assert all(a >= b or abs(a[1] - b[1]) <= 1e-6 for a, b in itertools.pairwise(ranked))
    else:
        assert decision.agent is None


# --- the Scorer, the catalog and its cache --------------------------------------------------


def test_a_broker_embedding_header_is_the_query() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 384)).astype(np.float32)
    records = [
        agent(f"vec-{i}", "", {"action": "work"}, embedding={"vector": vectors[i].tolist()})
        for i in range(3)
    ]
    for i in range(3):
        headers = {"Broker-Embedding": encode_embedding(vectors[i] + 0.01)}
        decision = route(b"", headers, records, rules=policy(choice="best"))
        assert decision.agent == f"vec-{i}"
        assert decision.candidates[0].semantic > 0.99


def test_a_manifest_vector_past_float32s_range_does_not_switch_semantic_routing_off() -> None:
    """``1e39`` is valid JSON but infinite in float32: the agent's row became NaN, and one NaN
    similarity made every message of the tenant rank by load alone (threshold ignored)."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2, 384)).astype(np.float32)
    huge = [1e39] + [0.0] * 383
    records = [
        agent(f"vec-{i}", "", {"action": "work"}, embedding={"vector": vectors[i].tolist()})
        for i in range(2)
    ]
    records.append(agent("huge", "", {"action": "work"}, embedding={"vector": huge}))
    for i in range(2):
        headers = {"Broker-Embedding": encode_embedding(vectors[i] + 0.01)}
        decision = route(b"", headers, records, rules=policy(choice="best"))
        assert decision.agent == f"vec-{i}"
        assert decision.candidates[0].semantic > 0.99
        assert all(math.isfinite(c.semantic) for c in decision.candidates)
    toward_huge = {"Broker-Embedding": encode_embedding(np.array(huge[:1] + [0.0] * 383) / 1e39)}
    assert route(b"", toward_huge, records, rules=policy(choice="best")).agent == "huge"


def test_a_broker_embedding_of_another_dimension_is_refused() -> None:
    with pytest.raises(InvalidRoutingHeader, match="384 dimensions"):
        route(b"", {"Broker-Embedding": encode_embedding(np.ones(16))})


def test_a_manifest_vector_of_another_dimension_is_ignored_with_a_warning() -> None:
    record = agent(
        "odd",
        "Translates letters into German.",
        {"action": "translate"},
        embedding={"vector": [1.0, 2.0, 3.0], "text": "translation of letters"},
    )
    with capture_logs() as logs:
        catalog = build_catalog([record], EMBEDDER)
    expected = {"event": "agent_embedding_ignored", "agent": "odd", "dim": 3}
    assert expected.items() <= logs[0].items()
    assert logs[0]["because"] == "dimension"
    query = EMBEDDER.embed(["translation of letters"])[0]
    assert float(catalog.similarities(query)[0]) > 0.5  # embedding.text was used instead


@pytest.mark.parametrize("text", [None, "translation of letters"])
def test_a_manifest_vector_made_by_another_model_is_ignored_whatever_its_dimension(
    text: str | None,
) -> None:
    """384 numbers from another model would be compared as if they were the embedder's: a
    manifest that names its model is believed, and the text (or description) is embedded."""
    vector = EMBEDDER.embed(["cooking recipes and kitchen timers"])[0].tolist()
    embedding: dict[str, Any] = {"vector": vector, "model": "BAAI/bge-small-en-v1.5"}
    if text is not None:
        embedding["text"] = text
    record = agent(
        "odd", "Translates letters into German.", {"action": "translate"}, embedding=embedding
    )
    with capture_logs() as logs:
        catalog = build_catalog([record], EMBEDDER)
    (logged,) = [entry for entry in logs if entry["event"] == "agent_embedding_ignored"]
    assert logged["because"] == "model"
    assert logged["model"] == "BAAI/bge-small-en-v1.5"
    assert logged["using"] == ("embedding.text" if text else "description")
    kitchen = EMBEDDER.embed(["cooking recipes and kitchen timers"])[0]
    letters = EMBEDDER.embed([text or "Translates letters into German."])[0]
    assert float(catalog.similarities(kitchen)[0]) < 0.5
    assert float(catalog.similarities(letters)[0]) > 0.5


@pytest.mark.parametrize(
    "model", ["hashing-384", "HASHING-384", "sentence-transformers:hashing-384"]
)
def test_a_manifest_vector_that_names_the_embedders_model_is_used(model: str) -> None:
    vector = EMBEDDER.embed(["cooking recipes and kitchen timers"])[0].tolist()
    record = agent(
        "chef",
        "Translates letters into German.",
        {"action": "cook"},
        embedding={"vector": vector, "model": model},
    )
    with capture_logs() as logs:
        catalog = build_catalog([record], EMBEDDER)
    assert not [entry for entry in logs if entry["event"] == "agent_embedding_ignored"]
    kitchen = EMBEDDER.embed(["cooking recipes and kitchen timers"])[0]
    assert float(catalog.similarities(kitchen)[0]) == pytest.approx(1.0, abs=1e-5)


def test_a_broker_embedding_from_another_model_is_refused_and_one_from_ours_is_used() -> None:
    records = [agent("a", "Forecasts rain and wind for a city", {"action": "work"})]
    vector = EMBEDDER.embed(["Forecasts rain and wind for a city"])[0]
    sent = {"Broker-Embedding": encode_embedding(vector)}
    with pytest.raises(InvalidRoutingHeader, match=r"'bge-small-en-v1\.5'.*hashing-384"):
        route(b"", {**sent, "Broker-Embedding-Model": "bge-small-en-v1.5"}, records)
    decision = route(b"", {**sent, "Broker-Embedding-Model": "hashing-384"}, records)
    assert decision.agent == "a"
    assert route(b"", sent, records).agent == "a"  # no model named: the dimension decides


def test_each_capability_example_is_a_row_and_the_best_row_counts() -> None:
    record = agent(
        "helper",
        "General helper.",
        {"action": "help", "examples": ["reset my password", "printer is jammed"]},
    )
    catalog = build_catalog([record], EMBEDDER)
    assert catalog.matrix.shape == (3, 384)
    query = EMBEDDER.embed(["printer is jammed"])[0]
    assert float(catalog.similarities(query)[0]) == pytest.approx(1.0, abs=1e-5)
    mean = build_catalog([record], EMBEDDER, examples="mean")
    assert mean.matrix.shape == (1, 384)


def test_the_catalog_cache_rebuilds_only_the_tenant_that_changed() -> None:
    cache = CatalogCache(EMBEDDER)
    a1 = agent("a", "first", seq=1)
    b1 = agent("b", "other tenant", seq=2, tenant="other")
    first = snapshot(a1, b1)
    catalog = cache.get(first, T)
    assert cache.get(first, T) is catalog
    assert cache.builds == 1
    other = cache.get(first, Tenant("other"))
    assert other.agents == ("b",)
    # A new snapshot in which only the other tenant changed: the same catalog object.
    second = snapshot(a1, agent("b", "changed", seq=3, tenant="other"))
    assert cache.get(second, T) is catalog
    assert cache.get(second, Tenant("other")) is not other
    assert cache.builds == 3
    # acme's agent changes: rebuilt, with the new description.
    third = snapshot(agent("a", "second version", seq=4), agent("c", "new", seq=5))
    rebuilt = cache.get(third, T)
    assert rebuilt is not catalog
    assert rebuilt.agents == ("a", "c")
    assert rebuilt.seqs == {"a": 4, "c": 5}
    assert cache.get(RegistrySnapshot({}, 6), T).agents == ()


def test_a_tenant_without_agents_has_no_candidate() -> None:
    decision = Scorer(EMBEDDER).decide(RegistrySnapshot({}, 0), T, b"hi", TEXT, {})
    assert decision.agent is None
    assert decision.detail == "tenant 'acme' has no registered agents"


def test_a_catalog_large_enough_for_lsh_decides_like_exact_search() -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((300, 64)).astype(np.float32)
    records = [
        agent(f"a{i:03d}", "", {"action": "work"}, embedding={"vector": vectors[i].tolist()})
        for i in range(300)
    ]
    small = HashingEmbedder(64)
    exact: Catalog = build_catalog(records, small)
    lsh = build_catalog(records, small, lsh_above=100)
    assert exact.index is None
    assert lsh.index is not None
    features = extract(b"", {})
    loads = idle(*(r.name for r in records))
    rules = policy(choice="best")
    for i in range(0, 300, 15):
        query = (vectors[i] / np.linalg.norm(vectors[i])).astype(np.float32)
        assert decide(exact, features, loads, rules, query=query).agent == f"a{i:03d}"
        with_intent = extract(b"", {"Broker-Intent": "work"})
        assert decide(lsh, with_intent, loads, rules, query=query).agent == f"a{i:03d}"
        assert decide(lsh, features, loads, rules, query=query).agent == f"a{i:03d}"


# --- policy -------------------------------------------------------------------------------------


def test_the_default_policy_is_the_documented_one() -> None:
    p = DEFAULT_POLICY
    assert p.version == "default-1"
    assert (p.load.weights.qps, p.load.weights.latency, p.load.weights.gpu) == (0.4, 0.3, 0.3)
    assert (p.penalties.qps_ratio, p.penalties.qps_factor) == (0.8, 0.7)
    assert (p.penalties.p99_ms, p.penalties.p99_factor, p.penalties.gpu_factor) == (200, 0.5, 0)
    assert (p.top_k, p.choice, p.semantic_weight) == (3, Choice.P2C, 0.7)
    assert (p.cooldown.errors, p.cooldown.window_s, p.cooldown.duration_s) == (3, 30, 30)
    assert (p.max_attempts, p.require_live, p.fallback_agent, p.mirror) == (3, True, None, {})
    assert (p.canary.value, p.canary.label) == ("canary", "env")


def test_a_policy_loads_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: gpu-heavy-2\n"
        "semantic_weight: 0.6\n"
        "choice: wrr\n"
        "load:\n  weights: {qps: 0.3, latency: 0.3, gpu: 0.4}\n"
        "penalties:\n  gpu_min_free_mb: 2048\n"
        "fallback_agent: generalist\n"
        "mirror: {summarizer: summarizer-next}\n"
    )
    loaded = load_policy(path)
    assert loaded.version == "gpu-heavy-2"
    assert loaded.choice is Choice.WRR
    assert loaded.load.weights.gpu == 0.4
    assert loaded.penalties.gpu_min_free_mb == 2048
    assert loaded.penalties.qps_factor == 0.7  # untouched defaults stay
    assert loaded.mirror == {"summarizer": "summarizer-next"}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("semantic_weigth: 0.5\n", "semantic_weigth: Extra inputs are not permitted"),
        ("semantic_weight: 2\n", "semantic_weight: Input should be less than or equal to 1"),
        ("penalties: {qps_factor: -1}\n", "penalties.qps_factor"),
        ("choice: random\n", "choice: Input should be 'p2c', 'wrr' or 'best'"),
        ("mirror: {a: a}\n", "an agent cannot mirror to itself: a"),
        ("fallback_agent: 'not a name'\n", "fallback_agent"),
        ("load: {weights: {qps: 0, latency: 0}}\n", "cannot both be 0"),
        ("- a list\n", "a routing policy is a mapping"),
        ("version: [unclosed\n", "is not valid YAML"),
    ],
)
def test_a_bad_policy_is_refused_with_the_failing_path(
    tmp_path: Path, text: str, complaint: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(path)
    assert complaint in caught.value.message
    assert caught.value.status == 422


def test_a_missing_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid, match="cannot read routing policy"):
        load_policy(tmp_path / "absent.yaml")


def test_an_empty_policy_file_is_the_default_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("")
    assert load_policy(path) == DEFAULT_POLICY


# --- relevance: lexical scores and declared-content priors -------------------------------------


def test_lexical_index_weighs_words_by_their_rarity_in_the_catalog() -> None:
    index = LexicalIndex([["invoice", "total", "read"], ["photo", "read"], ["photo", "caption"]])
    rare = index.scores(["invoice"])
    assert rare.argmax() == 0
    assert rare[1] == rare[2] == 0.0
    mixed = index.scores(["photo", "total"])  # "total" is in one group, "photo" in two
    assert mixed[0] > mixed[1] == mixed[2] > 0.0
    assert index.scores(["unknown"]).tolist() == [0.0, 0.0, 0.0]
    diluted = index.scores(["invoice", "unknown", "words"])
    assert 0.0 < diluted[0] < rare[0] < 1.0  # words the catalog never uses dilute the score


@given(st.lists(st.sampled_from(["a", "b", "c", "d", "zz"]), max_size=8))
def test_lexical_scores_stay_in_the_unit_interval(terms: list[str]) -> None:
    index = LexicalIndex([["a", "b", "b"], ["c"], [], ["a", "d", "d", "d"]])
    scores = index.scores(terms)
    assert scores.shape == (4,)
    assert ((scores >= 0.0) & (scores < 1.0)).all()


def test_a_shared_rare_word_decides_between_otherwise_unrelated_agents() -> None:
    """The catalog-IDF lexical score ranks the agent whose texts use the message's rare word."""
    decision = route(b"what's the temperature tomorrow", TEXT, rules=policy(choice="best"))
    assert decision.agent == "weather"
    without = route(
        b"what's the temperature tomorrow", TEXT, rules=policy(choice="best", lexical_weight=0)
    )
    assert decision.candidates[0].semantic > without.candidates[0].semantic


MEDIA = [
    agent(
        "reviewer",
        "Reviews code.",
        {"action": "review", "content_types": ["text/x-diff", "text/plain"]},
    ),
    agent("chat", "Answers questions.", {"action": "answer", "content_types": ["text/plain"]}),
    agent(
        "listener", "Handles audio and text.", {"action": "listen", "modalities": ["audio", "text"]}
    ),
    agent("speech", "Handles recordings.", {"action": "hear", "modalities": ["audio"]}),
    agent(
        "meter",
        "Watches readings.",
        {"action": "watch", "modalities": ["sensor"], "content_types": ["application/json"]},
    ),
    agent("records", "Stores records.", {"action": "store", "content_types": ["application/json"]}),
]


def test_a_rarely_listed_media_type_raises_the_capability_that_lists_it() -> None:
    diff = b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
    rules = policy(choice="best", threshold=-1)
    decision = route(diff, {"Content-Type": "text/x-diff"}, MEDIA, rules=rules)
    assert decision.agent == "reviewer"
    assert decision.reason is DecisionReason.SCORED


def test_without_text_the_modality_specialist_ranks_first() -> None:
    """An audio file with no text ranks the audio-only capability above the audio-and-text
    one; with the priors off, load alone decides."""
    wav = {"Content-Type": "audio/wav"}
    decision = route(WAV, wav, MEDIA, rules=policy(choice="best"))
    assert decision.agent == "speech"
    assert [c.agent for c in decision.candidates] == ["speech", "listener"]
    assert "declares this content" in decision.detail
    loads = {"speech": AgentLoad(qps=500.0, p99_ms=150.0), "listener": AgentLoad()}
    flat = route(WAV, wav, MEDIA, loads=loads, rules=policy(modality_prior=0, type_prior=0))
    assert flat.agent == "listener"
    assert "ranked by load" in flat.detail


def test_numeric_json_counts_as_sensor_readings_for_the_prior() -> None:
    """A JSON body of mostly numbers raises the sensor capability by the modality prior; a
    record of mostly strings does not."""
    json = {"Content-Type": "application/json"}

    def relevance(body: bytes, **changes: Any) -> dict[str, float]:
        rules = policy(choice="best", threshold=-1, semantic_margin=2, **changes)
        decision = route(body, json, MEDIA[4:], rules=rules)
        return {c.agent: c.semantic for c in decision.candidates}

    readings = orjson.dumps({"t": [1, 2, 3, 4], "v": [0.1, 0.2, 0.4, 9.0]})
    record = orjson.dumps({"customer": "x", "note": "y", "id": 4})
    with_prior, without = relevance(readings), relevance(readings, modality_prior=0)
    assert with_prior["meter"] - without["meter"] == pytest.approx(0.05, abs=1e-6)
    assert with_prior["records"] == pytest.approx(without["records"])
    assert relevance(record) == pytest.approx(relevance(record, modality_prior=0))


def test_catalog_priors_are_memoised_and_none_when_nothing_is_declared() -> None:
    catalog = build_catalog(MEDIA, EMBEDDER)
    args = {"readings": False, "type_weight": 0.2, "modality_weight": 0.05}
    first = catalog.prior("text/x-diff", Modality.TEXT, None, **args)
    assert first is not None
    assert first is catalog.prior("text/x-diff", Modality.TEXT, None, **args)
    assert int(first.argmax()) == catalog.agent_index["reviewer"]
    plain = build_catalog(ASSISTANTS[:3], EMBEDDER)
    assert plain.prior("text/plain", Modality.TEXT, None, **args) is None


def test_a_candidate_whose_score_is_nan_is_recorded_and_read_back() -> None:
    """JSON has no NaN: orjson writes one as null. Read back as NaN, the record stays
    readable (an agent refuses, and drops, a decision it cannot read)."""
    decision = route(b"translate this letter to German", TEXT)
    odd = replace(decision.candidates[0], semantic=math.nan, load=math.nan, score=math.nan)
    record = orjson.loads(orjson.dumps(replace(decision, candidates=(odd,)).to_dict()))
    assert record["candidates"][0]["score"] is None
    back = Decision.from_dict(record).candidates[0]
    assert math.isnan(back.semantic)
    assert math.isnan(back.load)
    assert math.isnan(back.score)


# --- ties -------------------------------------------------------------------------------------


def test_agents_a_last_bit_apart_are_chosen_as_if_they_tied() -> None:
    """Two agents with identical manifests (replicas under two names) get rows that differ
    in the last bits when their texts were embedded in different calls (a model pads a
    batch): the router had ranked whichever came out a hair ahead first, and p2c's tie rule
    chose it, while ``broker routes simulate`` (one call, identical rows) chose the other.
    Seen on a running broker: message 4 went to twin-b, and re-scoring it under the same
    policy sent it to twin-a."""
    rng = np.random.default_rng(5)
    row = rng.standard_normal(384)
    row /= np.linalg.norm(row)
    query = row + 0.8 * rng.standard_normal(384) / np.sqrt(384)
    query /= np.linalg.norm(query)
    nudged = row + 2e-7 * query  # the same row, embedded in another batch
    headers = {"Broker-Embedding": encode_embedding(query.astype(np.float32))}

    def twins(second: np.ndarray) -> list[AgentRecord]:
        return [
            agent(name, "Echoes the text", {"action": "echo"}, embedding={"vector": v.tolist()})
            for name, v in (("twin-a", row), ("twin-b", second))
        ]

    apart = route(b"", headers, twins(nudged))
    a, b = sorted(apart.candidates, key=lambda c: c.agent)
    assert 0.0 < b.semantic - a.semantic < 1e-6  # b is ahead, by bits
    for seed in range(20):
        for choice in Choice:
            rules = policy(choice=choice)
            tied = route(b"", headers, twins(row), rules=rules, rng=random.Random(seed))
            near = route(b"", headers, twins(nudged), rules=rules, rng=random.Random(seed))
            assert near.agent == tied.agent, (seed, choice)
            assert [c.agent for c in near.candidates] == [c.agent for c in tied.candidates]


def test_agents_tied_at_the_top_k_cut_enter_it_in_catalog_order() -> None:
    """Five replicas a last bit apart and ``top_k`` 3: which of them made the cut was decided
    by those bits (the partition), whatever order the ties then took inside it."""
    catalog = SimpleNamespace(one_group_per_agent=True, group_agent_list=[0, 1, 2, 3, 4])
    allowed = np.ones(5, dtype=bool)
    one = np.array([-0.5000001, -0.5, -0.50000005, -0.5000002, -0.50000015])
    other = np.array([-0.5, -0.5000001, -0.50000015, -0.50000005, -0.5000002])
    picked = [
        _top_distinct(catalog, cost, allowed, 3)  # type: ignore[arg-type]
        for cost in (one, other)
    ]
    assert picked == [[0, 1, 2], [0, 1, 2]]
    clear = np.array([-0.9, -0.4, -0.5, -0.8, -0.1])  # apart: the best three, best first
    assert _top_distinct(catalog, clear, allowed, 3) == [0, 3, 2]  # type: ignore[arg-type]


def test_groups_that_all_tie_give_the_first_in_catalog_order() -> None:
    """Idle agents with nothing else to tell them apart tie exactly, by the thousand."""
    catalog = SimpleNamespace(one_group_per_agent=True, group_agent_list=list(range(1000)))
    allowed = np.ones(1000, dtype=bool)
    allowed[0] = False
    tied = np.full(1000, -0.5)
    assert _top_distinct(catalog, tied, allowed, 3) == [1, 2, 3]  # type: ignore[arg-type]
