"""Routing on edge inputs: absurd heartbeats, policies that validate into NaN, canary labels
that can never match, and magic bytes that contradict a message's declared type."""

from __future__ import annotations

import asyncio
import math
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.envelope import Tenant
from broker.registry.manifest import AgentManifest, AgentName, Limits
from broker.registry.snapshot import AgentRecord
from broker.routing import (
    AgentLoad,
    DecisionReason,
    HashingEmbedder,
    PolicyInvalid,
    build_catalog,
    decide,
    extract,
    load_policy,
    load_score,
)
from broker.routing.load import InstanceLoad, LoadView
from broker.routing.policy import policy_from_dict
from broker.routing.types import CandidateScore

pytestmark = pytest.mark.unit

EMBEDDER = HashingEmbedder()


def _heartbeat(**fields: Any) -> bytes:
    return orjson.dumps({"tenant": "t", "agent": "a", "instance": "1", **fields})


# --- heartbeats: untrusted bodies published by agents ----------------------------------------


def test_huge_heartbeat_numbers_neither_stop_the_load_view_nor_the_tenants_decisions() -> None:
    """Two instances reporting ``in_flight: 1.7e308`` (valid JSON) summed to an int past
    float's range: the view's refresh raised ``OverflowError`` (its loop died, every load
    froze) and so did every decision of the tenant (its load arrays could not be built)."""
    view = LoadView(ttl=30.0)
    for instance in ("1", "2"):
        body = _heartbeat(instance=instance, in_flight=1.7e308, qps=1.7e308, p99_ms=1.7e308)
        view.observe(InstanceLoad.from_json(body))
    assert view.refresh() is True
    load = view.loads("t")["a"]
    # Finite, so the decision's recorded load inputs read back as they were (JSON has no inf).
    assert math.isfinite(load.qps)
    assert math.isfinite(float(load.in_flight))
    inputs = CandidateScore("a", "work", 0.5, 0.0, 0.0, (), load).to_dict()["load_inputs"]
    assert AgentLoad.from_dict(orjson.loads(orjson.dumps(inputs))) == load
    weight, _ = load_score(load, Limits(max_concurrency=4))
    assert 0.0 <= weight < 1e-9  # saturated, as reported


@pytest.mark.parametrize(
    ("tenant", "agent"),
    [("t.a", "b"), ("t", "a.b"), ("t", "*"), ("", "a"), ("t", "")],
)
def test_a_heartbeat_naming_no_tenant_or_agent_is_refused(tenant: str, agent: str) -> None:
    """Tenants and agents are single subject tokens: a body naming ``t.a`` as its tenant
    matches a key an agent of tenant ``t`` may write (``t.a.b.1``), and gave the router a
    tenant that exists nowhere, kept for good."""
    with pytest.raises(ValueError, match=r"tenant|agent"):
        InstanceLoad.from_json(_heartbeat(tenant=tenant, agent=agent))


def test_a_heartbeat_with_a_valid_odd_instance_id_is_still_read() -> None:
    beat = InstanceLoad.from_json(_heartbeat(instance="host.example-1.x"))
    assert beat.key == "t.a.host.example-1.x"


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from([1.7e308, 2**64 - 1, -1.0, 0.0]),
            st.integers(-(2**63), 2**64 - 1),
            st.none(),
            st.text(max_size=3),
            st.booleans(),
        ),
        min_size=7,
        max_size=7,
    ),
    instances=st.integers(1, 4),
)
def test_any_heartbeat_values_give_a_load_weight_in_range(
    values: list[Any], instances: int
) -> None:
    """Whatever numbers agents report, the view refreshes and the weight is in [0, 1]."""
    names = ("qps", "in_flight", "p50_ms", "p99_ms", "error_rate", "gpu_free_mb", "gpu_util")
    view = LoadView(ttl=30.0)
    for i in range(instances):
        fields = dict(zip(names, values, strict=True))
        view.observe(InstanceLoad.from_json(_heartbeat(instance=str(i), **fields)))
    view.refresh(now=time.monotonic())
    weight, _ = load_score(view.loads("t")["a"], Limits(max_qps=10.0, max_concurrency=2))
    assert 0.0 <= weight <= 1.0


# --- the policy file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        {"load": {"qps_ref": math.inf}},
        {"load": {"latency_ref_ms": math.inf}},
        {"load": {"gpu_ref_mb": math.inf}},
        {"load": {"weights": {"qps": math.inf}}},
        {"load": {"weights": {"gpu": math.nan}}},
        {"load": {"weights": {"qps": 1e308, "latency": 1e308}}},
    ],
)
def test_a_policy_with_infinite_or_overflowing_load_settings_is_refused(
    document: dict[str, Any],
) -> None:
    """``qps_ref: .inf`` (YAML) validated, and every agent's load weight became NaN (0 with
    weights summing past float's range; ``gpu_ref_mb: .inf`` zeroed every GPU signal): every
    candidate then counted as saturated and the first by name won, whatever its relevance."""
    with pytest.raises(PolicyInvalid, match="load"):
        policy_from_dict(document)


def test_an_infinite_load_setting_in_a_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    """From YAML as an operator writes it. Accepted, the NaN weights were recorded as
    ``null`` in every decision's ``Broker-Route``, which agents could not read back: each
    instance terminated every message it was sent (``agent_message_unreadable``)."""
    file = tmp_path / "policy.yaml"
    file.write_text("version: x\nload:\n  qps_ref: .inf\n", encoding="utf-8")
    with pytest.raises(PolicyInvalid, match=r"load\.qps_ref"):
        load_policy(file)


@settings(max_examples=300, deadline=None)
@given(
    qps=st.floats(0, 1e300),
    latency=st.floats(0, 1e300),
    gpu=st.floats(0, 1e300),
    refs=st.tuples(st.floats(1e-6, 1e300), st.floats(1e-6, 1e300), st.floats(1e-6, 1e300)),
)
def test_every_policy_that_validates_gives_idle_agents_a_finite_weight(
    qps: float, latency: float, gpu: float, refs: tuple[float, float, float]
) -> None:
    document = {
        "load": {
            "weights": {"qps": qps, "latency": latency, "gpu": gpu},
            "qps_ref": refs[0],
            "latency_ref_ms": refs[1],
            "gpu_ref_mb": refs[2],
        }
    }
    try:
        rules = policy_from_dict(document)
    except PolicyInvalid:
        return
    for load in (AgentLoad(), AgentLoad(qps=5.0, p99_ms=20.0, gpu_free_mb=8000.0, gpu_util=0.5)):
        weight, _ = load_score(load, Limits(), rules)
        assert 0.0 <= weight <= 1.0


@pytest.mark.parametrize("label", ["Env", "ENV", "env ", "-env"])
def test_a_canary_label_no_manifest_can_carry_is_refused(label: str) -> None:
    """Manifests' label keys are lower-case a-z 0-9 . _ / -; a policy naming ``Env`` matched
    no agent, so the agents labelled ``env=canary`` took production traffic and every
    canary message went to the DLQ."""
    with pytest.raises(PolicyInvalid, match=r"canary\.label"):
        policy_from_dict({"canary": {"label": label}})


def test_a_valid_canary_label_is_kept() -> None:
    assert policy_from_dict({"canary": {"label": "team/stage"}}).canary.label == "team/stage"


# --- magic bytes against the declared type ----------------------------------------------------


def _agent(name: str, *capabilities: dict[str, Any]) -> AgentRecord:
    manifest = AgentManifest.model_validate(
        {
            "name": name,
            "version": "1.0.0",
            "description": f"The {name} agent.",
            "capabilities": list(capabilities),
        }
    )
    return AgentRecord(Tenant("acme"), AgentName(name), manifest, 1, 1, None)


IMAGES = _agent("ocr", {"action": "ocr", "content_types": ["image/*"]})
MP3 = _agent("tagger", {"action": "ocr", "content_types": ["audio/mpeg"]})


@pytest.mark.parametrize("text", [b"BMW sales in March", b"ID3 tags explained"])
def test_a_text_message_that_starts_like_a_binary_format_is_still_text(text: bytes) -> None:
    """``text/plain`` "BMW sales…" starts with a BMP signature ("BM"): image-only agents took
    it (and "ID3…" went to an audio/mpeg agent), against its declared type."""
    catalog = build_catalog([IMAGES, MP3], EMBEDDER)
    features = extract(text, {"Content-Type": "text/plain", "Broker-Intent": "ocr"})
    decision = decide(catalog, features, {"ocr": AgentLoad(), "tagger": AgentLoad()})
    assert decision.agent is None
    assert decision.reason is DecisionReason.NO_CANDIDATE
    assert decision.detail == "no agent for action 'ocr' accepts text/plain (text)"


def test_magic_bytes_still_name_the_type_of_untyped_and_consistent_payloads() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(32)
    png_only = _agent("png-reader", {"action": "read", "content_types": ["image/png"]})
    catalog = build_catalog([png_only], EMBEDDER)
    loads = {"png-reader": AgentLoad()}
    for content_type in ("application/octet-stream", "image/jpeg"):
        features = extract(png, {"Content-Type": content_type})
        assert decide(catalog, features, loads).agent == "png-reader", content_type


def test_a_charset_that_is_no_codec_name_reads_the_body_as_utf8() -> None:
    """``charset=a<NUL>b`` (a header that did not come through the HTTP ingress) made
    ``codecs.lookup`` raise ``ValueError``, not ``LookupError``: ``extract`` raised, and the
    router's decision on the message failed instead of reading it as UTF-8 like any other
    unknown charset."""
    features = extract("héllo".encode(), {"Content-Type": "text/plain; charset=a\x00b"})
    assert features.text == "héllo"


# --- determinism ------------------------------------------------------------------------------

_TWINS = [
    _agent(name, {"action": "read", "content_types": ["image/*"], "description": "Read images"})
    for name in ("a1", "b2", "c3", "d4", "e5")
]


@settings(max_examples=60, deadline=None)
@given(
    order=st.permutations(range(len(_TWINS))),
    seed=st.integers(0, 2**32),
    choice=st.sampled_from(["p2c", "wrr", "best"]),
    reported=st.lists(st.booleans(), min_size=len(_TWINS), max_size=len(_TWINS)),
    text=st.sampled_from([None, "read this image", "zzz"]),
)
def test_equal_candidates_are_ranked_and_chosen_the_same_whatever_the_registration_order(
    order: list[int], seed: int, choice: str, reported: list[bool], text: str | None
) -> None:
    """Two routers whose registries list the same agents in another order, deciding the same
    message with the same seed, make the same decision, ties included; every score is finite."""
    rules = policy_from_dict({"choice": choice})
    loads: dict[str, AgentLoad] = {
        r.name: AgentLoad() for r, on in zip(_TWINS, reported, strict=True) if on
    }
    headers = {"Content-Type": "image/png"} | ({"Broker-Text": text} if text else {})
    features = extract(b"\x89PNG\r\n\x1a\n" + bytes(8), headers)
    query = EMBEDDER.embed([text])[0] if text else None
    decisions = []
    for records in (_TWINS, [_TWINS[i] for i in order]):
        catalog = build_catalog(records, EMBEDDER)
        decisions.append(
            decide(catalog, features, loads, rules, query=query, rng=random.Random(seed))
        )
    assert decisions[0] == decisions[1]
    for candidate in decisions[0].candidates:
        assert math.isfinite(candidate.score)
        assert 0.0 <= candidate.load <= 1.0


async def test_a_refresh_that_raises_does_not_end_the_refresh_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The view's loop refreshes every interval; one refresh that raised ended it, and every
    load of every tenant froze until the router restarted."""
    from broker.routing import load as load_module

    view = LoadView(ttl=30.0, refresh_interval=0.01)
    real = load_module.aggregate
    calls = {"n": 0}

    def flaky(instances: Any) -> AgentLoad:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("one bad refresh")
        return real(instances)

    monkeypatch.setattr(load_module, "aggregate", flaky)
    task = asyncio.create_task(view._refresh_loop())
    try:
        view.observe(InstanceLoad.from_json(_heartbeat(qps=1)))
        assert await view.wait_until(lambda v: calls["n"] >= 1, timeout=5)
        view.observe(InstanceLoad.from_json(_heartbeat(qps=2)))
        assert await view.wait_until(lambda v: "a" in v.loads("t"), timeout=5)
        assert view.loads("t")["a"].qps == 2.0
    finally:
        task.cancel()
