"""Scores and the routing decision: filter, rank by meaning and load, choose.

:func:`decide` runs once per routed message over a tenant's :class:`Catalog`:

1. **Filter** groups (agent capabilities): the intent (``Broker-Intent``: only that action;
   none: all actions), what the capability accepts (see :mod:`broker.routing.catalog`),
   canary (``x-env: canary`` goes only to agents labelled ``env=canary``, everything else
   never does), liveness (``live``), and agents already tried (``exclude``).
2. **Qualify** by relevance: ``cosine + lexical_weight * lexical + priors`` (the cosine
   from the query vector, the lexical BM25 score from the text's stems with the catalog's
   own IDF, the priors from how specifically a capability declares the message's media
   type and modality: :meth:`Catalog.prior`). Only groups within ``semantic_margin`` of
   the most relevant one's, and, without an intent, at least ``threshold``. (With an
   intent the action was named: relevance ranks but does not reject.) Without a query
   vector the priors alone rank, when the capabilities declare anything about content.
3. **Rank** by ``score = w * relevance + (1 - w) * load`` (``w`` = ``semantic_weight``);
   with nothing to rank by (an image with no text, capabilities that declare nothing) by
   the load weight alone. Each agent appears once (its best capability). Groups whose load
   weight is 0 (GPU memory below the minimum, cooling down) rank after all others.
4. **Choose** among the ``top_k`` by ``policy.choice``: ``p2c`` draws two and keeps the
   less loaded (higher load weight; the better-ranked on a tie), ``wrr`` draws one weighted
   by score, ``best`` takes the first. Zero-load candidates are chosen only when nobody else
   is left. Scores within 1e-6 of each other rank as equal, in the catalog's order (agents
   by name): an embedding's last bits depend on the batch it was made in.

Nobody left after filtering: the policy's ``fallback_agent`` (when the tenant has an agent
of that name), else no agent (``no_candidate``); nobody similar enough: the fallback, else
``below_threshold``. Every
decision's ``detail`` says which of these happened, in words.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from broker.errors import BrokerError
from broker.registry.manifest import Limits
from broker.registry.snapshot import RegistrySnapshot
from broker.routing.catalog import Catalog, CatalogCache, GroupLoads, LoadArrays
from broker.routing.embedder import (
    DEFAULT_THRESHOLD,
    Embedder,
    Matrix,
    costly,
    relevance_threshold,
    same_model,
    tokens,
)
from broker.routing.features import Features, InvalidRoutingHeader, extract
from broker.routing.policy import DEFAULT_POLICY, Choice, Policy
from broker.routing.types import AgentLoad, CandidateScore, Decision, DecisionReason

log = structlog.get_logger(__name__)

Floats = npt.NDArray[np.float64]
Bits = npt.NDArray[np.uint8]
Vector = npt.NDArray[np.float32]

NO_LOAD_REPORT = "no_load_report"
#: The penalty of an agent whose heartbeat reports failed requests (its load weight times
#: ``1 - load.error_weight * error_rate``): a decision recorded ``load: 0.0`` with no penalty
#: for an agent whose every recent request had failed, before any cooldown.
ERROR_RATE = "error_rate"
_QPS, _P99, _GPU, _COOLDOWN, _UNKNOWN, _ERRORS = 1, 2, 4, 8, 16, 32
_RNG = random.Random()
_SHOWN = 5  # agent names listed in a detail sentence
#: A JSON body whose leaves are at least this share numbers reads as sensor telemetry.
READINGS_SHARE = 0.6


# --- load weights ---------------------------------------------------------------------------


def _nonnegative(values: Floats) -> Floats:
    """Negative and NaN values as 0 (``fmax`` ignores NaN)."""
    return np.fmax(values, 0.0)


def load_weights(arrays: LoadArrays, policy: Policy) -> tuple[Floats, Bits]:
    """Per agent: the load weight in [0, 1] and penalty bits (see :class:`LoadPolicy` and
    :class:`Penalties` in :mod:`broker.routing.policy` for the formula)."""
    lp, pp, w = policy.load, policy.penalties, policy.load.weights
    instances = arrays.instances
    qps = _nonnegative(arrays.qps)
    p99 = _nonnegative(arrays.p99_ms)
    errors = np.fmin(_nonnegative(arrays.error_rate), 1.0)
    qps_capacity = arrays.max_qps * instances  # NaN: no limit declared
    # Headroom under the declared limits; fmin ignores the NaN of a limit not declared.
    headroom = np.fmin(
        1.0 - qps / qps_capacity,
        1.0 - _nonnegative(arrays.in_flight) / (arrays.max_concurrency * instances),
    )
    qps_signal = np.where(
        np.isnan(headroom),
        lp.qps_ref / (lp.qps_ref + qps / instances),
        np.clip(headroom, 0.0, 1.0),
    )
    latency_signal = lp.latency_ref_ms / (lp.latency_ref_ms + p99)
    has_gpu = ~np.isnan(arrays.gpu_free_mb)
    gpu_free = _nonnegative(arrays.gpu_free_mb)
    gpu_util = np.fmin(_nonnegative(arrays.gpu_util), 1.0)
    gpu_signal = np.fmin(gpu_free / lp.gpu_ref_mb, 1.0) * (1.0 - gpu_util / 2.0)
    gpu_weight = np.where(has_gpu, w.gpu, 0.0)
    weight = (w.qps * qps_signal + w.latency * latency_signal + gpu_weight * gpu_signal) / (
        w.qps + w.latency + gpu_weight
    )
    weight *= 1.0 - lp.error_weight * errors

    over_qps = qps > pp.qps_ratio * qps_capacity  # False where there is no limit (NaN)
    over_p99 = p99 > pp.p99_ms
    low_gpu = has_gpu & (gpu_free < pp.gpu_min_free_mb)
    weight *= np.where(over_qps, pp.qps_factor, 1.0)
    weight *= np.where(over_p99, pp.p99_factor, 1.0)
    weight *= np.where(low_gpu, pp.gpu_factor, 1.0)
    weight = np.clip(weight, 0.0, 1.0)
    erring = (errors > 0.0) & (lp.error_weight > 0.0)
    bits = (over_qps * _QPS | over_p99 * _P99 | low_gpu * _GPU | erring * _ERRORS).astype(np.uint8)
    absent = ~arrays.present
    if absent.any():
        weight[absent] = lp.unknown
        bits[absent] = _UNKNOWN
    return weight, bits


@functools.lru_cache(maxsize=64)
def _penalty_table(names: tuple[str, str, str, str]) -> tuple[tuple[str, ...], ...]:
    """Penalty names for every combination of penalty bits."""
    labelled = (*names, NO_LOAD_REPORT, ERROR_RATE)
    return tuple(
        tuple(name for bit, name in enumerate(labelled) if code >> bit & 1) for code in range(64)
    )


def load_score(
    load: AgentLoad | None, limits: Limits, policy: Policy = DEFAULT_POLICY
) -> tuple[float, tuple[str, ...]]:
    """One agent's load weight in [0, 1] and the penalties applied (``None``: no report)."""
    weights, bits = load_weights(LoadArrays.of([load], [limits]), policy)
    return float(weights[0]), _penalty_table(policy.penalty_names)[int(bits[0])]


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


_ZERO_LOAD_LAST = 4.0  # more than any score spread, so zero-load groups rank last


def _view(policy: Policy, weight: Floats, bits: Bits) -> GroupLoads:
    load_term = (1.0 - policy.semantic_weight) * weight
    bonus = np.where(weight > 0.0, _ZERO_LOAD_LAST, 0.0)
    return GroupLoads(
        policy=policy,
        weight=_frozen(weight),
        bits=_frozen(bits),
        load_term=_frozen(load_term),
        cost=_frozen(-(load_term + bonus)),
        cost_by_load=_frozen(-(weight + bonus)),
    )


def _group_loads(
    catalog: Catalog, loads: Mapping[str, AgentLoad], policy: Policy
) -> tuple[LoadArrays, GroupLoads]:
    """The loads, and their per-group arrays for ``policy`` (memoised on the catalog)."""
    arrays = catalog.load_arrays(loads)
    found = arrays.groups
    if found is None or found.policy is not policy:
        weights, bits = load_weights(arrays, policy)
        found = _view(policy, weights[catalog.group_agent], bits[catalog.group_agent])
        arrays.groups = found
    return arrays, found


def _cooled(
    catalog: Catalog, view: GroupLoads, cooling: Collection[str], policy: Policy
) -> GroupLoads:
    weight, bits = view.weight.copy(), view.bits.copy()
    for agent in cooling:
        where = catalog.group_slice(agent)
        if where is not None:
            weight[where] *= policy.penalties.cooldown_factor
            bits[where] |= _COOLDOWN
    return _view(policy, weight, bits)


# --- the decision -----------------------------------------------------------------------------


def _describe(features: Features) -> str:
    what = features.content_type
    if features.magic is not None and features.content_type == "application/octet-stream":
        what = f"{features.magic} data"
    return f"{what} ({features.modality})"


def _names(catalog: Catalog, mask: npt.NDArray[np.bool_]) -> str:
    agents = sorted({catalog.agents[i] for i in catalog.group_agent[mask].tolist()})
    shown = ", ".join(agents[:_SHOWN])
    return shown + (f" and {len(agents) - _SHOWN} more" if len(agents) > _SHOWN else "")


def _explain_nobody(
    catalog: Catalog,
    features: Features,
    policy: Policy,
    *,
    wants_canary: bool,
    live: Collection[str] | None,
    exclude: Collection[str],
) -> str:
    """Which filter left no candidate, in words (the slow path: masks are recomputed)."""
    if catalog.n_groups == 0:
        return f"tenant '{catalog.tenant}' has no registered agents"
    intent = features.intent
    scope = f" for action '{intent}'" if intent else ""
    mask = catalog.action_mask(intent)
    if not mask.any():
        return f"no agent offers action '{intent}'"
    what = _describe(features)
    mask = mask & catalog.accept_mask(features.content_type, features.modality, features.magic)
    if not mask.any():
        return f"no agent{scope} accepts {what}"
    label = f"{policy.canary.label}={policy.canary.value}"
    canary = mask & catalog.canary_mask(policy.canary, wants_canary)
    if not canary.any():
        if wants_canary:
            return f"no canary agent ({label}){scope} accepts {what}"
        return (
            f"only canary agents ({label}: {_names(catalog, mask)}){scope} accept {what}, "
            "and this message is not a canary"
        )
    mask = canary
    if live is not None:
        live_ones = mask & catalog.live_mask(live)
        if not live_ones.any():
            return (
                f"no agent{scope} that accepts {what} has a live instance "
                f"(registered: {_names(catalog, mask)})"
            )
        mask = live_ones
    primaries = catalog.without(mask, policy.shadows)
    if not primaries.any():
        return (
            f"every agent{scope} that accepts {what} is a mirror's shadow, which only gets "
            f"copies ({_names(catalog, mask)})"
        )
    tried = ", ".join(sorted(exclude))
    return f"every agent{scope} that accepts {what} was already tried ({tried})"


#: Ranking costs this close count as equal, and rank in the catalog's order (agents by name).
#: The same text embedded in two calls differs in the last bits (a model pads a batch, and
#: BLAS blocks each shape its own way: ~1e-7 in a cosine), so two agents with identical
#: manifests (replicas under two names) scored a hair apart in whichever order their rows
#: happened to be embedded, and p2c's tie rule (the better-ranked) then chose by those bits:
#: a router and ``broker routes simulate`` (which embeds the catalog in one call) chose
#: differently for the same recorded inputs.
_TIE = 1e-6


def _ties_in_catalog_order(groups: list[int], values: Sequence[float]) -> list[int]:
    """``groups`` (sorted by ``values``, ascending) with each run of values within
    :data:`_TIE` of the run's first in group order."""
    if len(groups) < 2:
        return groups
    out: list[int] = []
    start = 0
    for i in range(1, len(groups) + 1):
        if i == len(groups) or not values[i] - values[start] <= _TIE:  # NaN: a run of its own
            run = groups[start:i]
            out.extend(sorted(run) if len(run) > 1 else run)
            start = i
    return out


def _best(values: npt.NDArray[np.floating[Any]], eligible: npt.NDArray[Any], m: int) -> list[int]:
    """The ``m`` groups of ``eligible`` with the lowest ``values``, best first, values within
    :data:`_TIE` of each other in catalog order: also at the cut, where the groups tied
    with the last one taken compete for the places left (which replicas a last bit apart
    made the cut followed those bits). Python touches at most ``m`` values: idle agents
    with nothing else to tell them apart tie exactly, by the thousand."""
    n = values.shape[0]
    if m >= n:
        order = values.argsort(kind="stable")
        return _ties_in_catalog_order(eligible[order].tolist(), values[order].tolist())
    top = values.argpartition(m - 1)[:m]
    top = top[values[top].argsort(kind="stable")]
    ranked = values[top].tolist()
    out: list[int] = []
    start = 0
    while start < m:
        first = ranked[start]
        end = start + 1
        while end < m and ranked[end] - first <= _TIE:
            end += 1
        if end == m and not np.isnan(first):  # the run at the cut: all its ties compete
            run = np.flatnonzero((values >= first) & (values <= first + _TIE))
            out.extend(eligible[run[: m - len(out)]].tolist())  # ascending: catalog order
            return out
        out.extend(sorted(eligible[top[start:end]].tolist()))
        start = end
    return out


def _top_distinct(
    catalog: Catalog, cost: npt.NDArray[np.floating[Any]], allowed: npt.NDArray[np.bool_], k: int
) -> list[int]:
    """Up to ``k`` allowed groups with the lowest ``cost``, one per agent (its best); costs
    within :data:`_TIE` of each other in the catalog's order."""
    eligible = allowed.nonzero()[0]
    n = eligible.shape[0]
    if n == 0:
        return []
    values = cost[eligible]
    m = min(n, k if catalog.one_group_per_agent else 4 * k)
    agent_of = catalog.group_agent_list
    while True:
        best_first = _best(values, eligible, m)
        if catalog.one_group_per_agent:
            return best_first
        picked: list[int] = []
        seen: set[int] = set()
        for group in best_first:
            agent = agent_of[group]
            if agent not in seen:
                seen.add(agent)
                picked.append(group)
                if len(picked) == k:
                    return picked
        if m == n:
            return picked
        m = n  # one agent's capabilities crowded the top: look at all of them


def _candidates(
    catalog: Catalog,
    arrays: LoadArrays,
    view: GroupLoads,
    groups: list[int],
    *,
    sims: npt.NDArray[np.float32],
    policy: Policy,
) -> list[CandidateScore]:
    table = _penalty_table(policy.penalty_names)
    agent_of = catalog.group_agent_list
    w = policy.semantic_weight if sims is not catalog.no_similarity else 0.0
    load_share = 1.0 - w
    return [
        CandidateScore(
            agent=catalog.agents[agent_of[g]],
            capability=catalog.group_action[g],
            semantic=similarity,
            load=load,
            score=w * similarity + load_share * load,
            penalties=table[bits],
            load_inputs=arrays.loads[agent_of[g]],
        )
        for g, similarity, load, bits in zip(
            groups,
            sims[groups].tolist(),
            view.weight[groups].tolist(),
            view.bits[groups].tolist(),
            strict=True,
        )
    ]


def _no_one(
    reason: DecisionReason,
    detail: str,
    policy: Policy,
    exclude: Collection[str],
    candidates: tuple[CandidateScore, ...] = (),
    *,
    catalog: Catalog,
) -> Decision:
    """The policy's fallback agent, when the tenant has one by that name and it was not
    tried; else nobody. (One policy serves every tenant: a fallback registered by one tenant
    only sent the others' messages to an inbox that no agent reads, neither handled nor
    dead-lettered, and their waiting callers got 504.)"""
    fallback = policy.fallback_agent
    if fallback is not None and fallback not in catalog.agent_index:
        detail += f"; no fallback: tenant '{catalog.tenant}' has no agent '{fallback}'"
        return Decision(None, None, reason, detail, candidates, policy.version)
    if fallback is not None and fallback not in exclude:
        return Decision(
            agent=fallback,
            capability=None,
            reason=DecisionReason.FALLBACK,
            detail=f"{detail}; sent to the fallback agent '{fallback}'",
            candidates=candidates,
            policy_version=policy.version,
            mirror_to=policy.mirror.get(fallback),
        )
    if fallback is not None:
        detail += f"; the fallback agent '{fallback}' was already tried"
    return Decision(None, None, reason, detail, candidates, policy.version)


def _choose(
    candidates: list[CandidateScore], policy: Policy, rng: random.Random
) -> tuple[CandidateScore, int]:
    """The chosen candidate and the size of the pool it was chosen from: the candidates
    with a positive load weight."""
    pool = [c for c in candidates if c.load > 0.0]
    if len(pool) <= 1 or policy.choice is Choice.BEST:
        return (pool or candidates)[0], len(pool)
    if policy.choice is Choice.P2C:
        i, j = rng.sample(range(len(pool)), 2)
        first, second = pool[min(i, j)], pool[max(i, j)]  # the better-ranked one wins ties
        return (second if second.load > first.load else first), len(pool)
    weights = [max(c.score, 1e-9) for c in pool]
    return rng.choices(pool, weights=weights)[0], len(pool)


def _check_dimension(catalog: Catalog, query: Vector) -> None:
    if query.shape != (catalog.dim,):
        raise InvalidRoutingHeader(
            f"the query vector has shape {query.shape}; agents are embedded with "
            f"{catalog.dim} dimensions ({catalog.embedder_name})"
        )


def _similarities(
    catalog: Catalog, query: Vector, mask: npt.NDArray[np.bool_], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Every group's similarity, and the mask narrowed to the groups that have one: all of
    them for exact search, the ones the LSH index found for large catalogs."""
    if catalog.index is None:
        return catalog.similarities(query), mask
    groups, found = catalog.nearest_groups(query, mask, 8 * k)
    sims = np.zeros(catalog.n_groups, dtype=np.float32)
    sims[groups] = found
    narrowed = np.zeros(catalog.n_groups, dtype=np.bool_)
    narrowed[groups] = True
    return sims, narrowed


@dataclass(frozen=True, slots=True)
class _Relevance:
    """Each group's relevance to a message, and which groups qualify by it."""

    mask: npt.NDArray[np.bool_]  # the filter mask, narrowed to the groups LSH found
    relevance: npt.NDArray[np.float32]  # catalog.no_similarity: nothing to rank by
    qualify: npt.NDArray[np.bool_]
    textual: bool  # the relevance includes the message's text or vector


def _relevance(
    catalog: Catalog,
    features: Features,
    policy: Policy,
    mask: npt.NDArray[np.bool_],
    *,
    query: Vector | None,
    terms: Sequence[str],
) -> _Relevance:
    """``cosine + lexical_weight * lexical + priors`` per group (step 2 of the module
    docstring); without text or vector, the priors alone; without either, nothing."""
    prior = catalog.prior(
        features.content_type,
        features.modality,
        features.magic,
        readings=(features.numeric_share or 0.0) >= READINGS_SHARE,
        type_weight=policy.type_prior,
        modality_weight=policy.modality_prior,
    )
    if query is not None:
        _check_dimension(catalog, query)
        similar, mask = _similarities(catalog, query, mask, policy.top_k)
        if terms and policy.lexical_weight > 0.0:
            lexical = catalog.lexical.scores(terms)
            similar = (similar + policy.lexical_weight * lexical).astype(np.float32)
        relevance = similar if prior is None else (similar + prior).astype(np.float32)
        within = np.where(mask, relevance, -np.inf)
        best = float(within.max()) if within.shape[0] else -np.inf
        # A zero query vector means nothing (then only the priors rank, below).
        if best > -np.inf and ((prior is None and best != 0.0) or query.any()):
            floor = best - policy.semantic_margin
            if features.intent is None:
                floor = max(floor, threshold_of(policy))
            return _Relevance(mask, relevance, within >= floor, textual=True)
    if prior is not None:
        relevance = prior.astype(np.float32)
        within = np.where(mask, relevance, -np.inf)
        best = float(within.max()) if within.shape[0] else -np.inf
        if best > -np.inf:  # else nothing passed the filters
            near = within >= best - policy.semantic_margin
            return _Relevance(mask, relevance, near, textual=False)
    return _Relevance(mask, catalog.no_similarity, mask, textual=False)


def threshold_of(policy: Policy) -> float:
    """The policy's threshold (:class:`Scorer` fills in the embedder's when it is unset)."""
    return DEFAULT_THRESHOLD if policy.threshold is None else policy.threshold


def decide(
    catalog: Catalog,
    features: Features,
    loads: Mapping[str, AgentLoad],
    policy: Policy = DEFAULT_POLICY,
    *,
    query: Vector | None = None,
    live: Collection[str] | None = None,
    cooling: Collection[str] = (),
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
    terms: Sequence[str] = (),
) -> Decision:
    """Route one message (see the module docstring for the rules).

    ``query`` is the message's unit vector (``features.embedding``, else the embedded
    ``features.text``); ``None`` or a zero vector: no semantics. ``live``: agents with a live
    instance (``None``: no liveness filter); ``cooling``: agents in cooldown (their load
    weight takes ``penalties.cooldown_factor``); ``exclude``: agents already tried. ``loads``
    and ``live`` are memoised by identity: pass new objects when they change, and the same
    objects while they do not. When the live agents are those with a load entry, pass
    ``live=loads`` itself: a fresh ``loads.keys()`` view per call defeats the memo and costs
    a pass over the catalog's agents on every decision. ``terms``: the stems of the
    message's text (:func:`broker.routing.embedder.tokens`) for the lexical relevance;
    empty: cosine only.
    """
    wants_canary = features.env is not None and features.env == policy.canary.value
    mask = catalog.filter_mask(
        intent=features.intent,
        content_type=features.content_type,
        modality=features.modality,
        magic=features.magic,
        canary=policy.canary,
        wants_canary=wants_canary,
    )
    if live is not None:
        mask = catalog.and_live(mask, live)
    if exclude:
        mask = catalog.without(mask, exclude)
    if policy.shadows:  # a mirror's shadow only gets copies, never the message itself
        mask = catalog.without(mask, policy.shadows)
    arrays, view = _group_loads(catalog, loads, policy)
    if cooling:
        view = _cooled(catalog, view, cooling, policy)

    found = _relevance(catalog, features, policy, mask, query=query, terms=terms)
    mask, sims, qualify = found.mask, found.relevance, found.qualify
    cost = view.cost_by_load
    if sims is not catalog.no_similarity:
        cost = view.cost - sims * policy.semantic_weight
    semantic = sims is not catalog.no_similarity
    textual = found.textual
    picked = _top_distinct(catalog, cost, qualify, policy.top_k)

    if not picked:
        if not mask.any():
            detail = _explain_nobody(
                catalog, features, policy, wants_canary=wants_canary, live=live, exclude=exclude
            )
            return _no_one(DecisionReason.NO_CANDIDATE, detail, policy, exclude, catalog=catalog)
        closest = _top_distinct(catalog, -sims, mask, policy.top_k)
        below = _candidates(catalog, arrays, view, closest, sims=sims, policy=policy)
        top = below[0]
        detail = (
            f"no agent is similar enough: the closest, '{top.agent}' ({top.capability}), has "
            f"similarity {top.semantic:.3f}, below the threshold {threshold_of(policy):g}"
        )
        return _no_one(
            DecisionReason.BELOW_THRESHOLD, detail, policy, exclude, tuple(below), catalog=catalog
        )

    candidates = _candidates(catalog, arrays, view, picked, sims=sims, policy=policy)
    chosen, pool = _choose(candidates, policy, rng or _RNG)
    count = int(np.count_nonzero(qualify))
    how = f"by {policy.choice} among the top {pool}" if pool > 1 else "the best"
    detail = (
        f"chose '{chosen.agent}' for '{chosen.capability}' ({how} of {count} "
        f"candidate{'' if count == 1 else 's'}): similarity {chosen.semantic:.3f}, "
        f"load {chosen.load:.3f}, score {chosen.score:.3f}"
    )
    if not semantic:
        detail += "; no text or embedding to compare, ranked by load"
    elif not textual:
        detail += (
            "; no text or embedding to compare, ranked by how specifically each capability "
            f"declares this content, within {policy.semantic_margin:g} of the best, then load"
        )
    else:
        detail += f"; candidates are within {policy.semantic_margin:g} of the best relevance"
    if chosen.penalties:
        detail += f"; penalties: {', '.join(chosen.penalties)}"
    if pool == 0:
        detail += "; every candidate is saturated or cooling down"
    return Decision(
        agent=chosen.agent,
        capability=chosen.capability,
        reason=DecisionReason.SCORED,
        detail=detail,
        candidates=tuple(candidates),
        policy_version=policy.version,
        mirror_to=policy.mirror.get(chosen.agent),
    )


#: The most texts a :class:`Scorer` keeps embedded ahead, oldest dropped first (a batch
#: embedded ahead is always kept whole until the next one): a router's fetched batch (256)
#: several times over.
MAX_AHEAD = 1024


class _OwnThread:
    """A costly embedder that runs on one thread of its own, and remembers what was embedded
    ahead of need.

    ``embed_ahead`` (awaited by the router for each fetched batch) embeds texts on that
    thread while the event loop goes on; ``embed`` (a query, a catalog, a retry: the
    embedder interface, blocking) returns the rows it already has, waits for those being
    embedded ahead right now, and sends only the rest to the thread. One thread, so a model
    (and its tokenizer, which must not be used by two threads at once) only ever sees one
    caller; and torch, once used from two threads of a process, ran single texts at half
    speed (all-MiniLM-L6-v2 on 2 cores: 175 texts/s on one thread, 81-84 once a second
    thread had used the model). Called from the event loop's thread only."""

    def __init__(self, embedder: Embedder) -> None:
        self.inner = embedder
        self.name = embedder.name
        self.dim = embedder.dim
        self.costly = True
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="broker-embedder")
        self._rows: dict[str, Vector] = {}  # embedded ahead, least recently asked for first
        #: Texts on the thread now: the job and the text's row in its result.
        self._running: dict[str, tuple[Future[Matrix], int]] = {}

    def knows(self, text: str) -> bool:
        return text in self._rows or text in self._running

    def embed(self, texts: Sequence[str]) -> Matrix:
        rows, running = self._rows, self._running
        missing = [t for t in dict.fromkeys(texts) if t not in rows and t not in running]
        if len(missing) == len(texts):
            return self._thread.submit(self.inner.embed, texts).result()
        fresh = self._thread.submit(self.inner.embed, missing).result() if missing else ()
        found = dict(zip(missing, fresh, strict=True))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            if text in found:
                out[i] = found[text]
            elif text in rows:
                out[i] = rows[text]
            else:  # being embedded ahead: wait for that job rather than run it twice
                job, index = running[text]
                out[i] = job.result()[index]
        return out

    async def embed_ahead(self, texts: Iterable[str]) -> None:
        """Embed what is not known yet; texts known already count as just asked for, so the
        batch that needs them does not push them out."""
        rows, running = self._rows, self._running
        todo = []
        for text in dict.fromkeys(texts):
            if text in rows:
                rows[text] = rows.pop(text)
            elif text not in running:
                todo.append(text)
        if not todo:
            return
        job = self._thread.submit(self.inner.embed, todo)
        for index, text in enumerate(todo):
            running[text] = (job, index)
        try:
            embedded = await asyncio.wrap_future(job)
        finally:
            for text in todo:
                running.pop(text, None)
        while rows and len(rows) + len(todo) > MAX_AHEAD:
            del rows[next(iter(rows))]
        for text, row in zip(todo, embedded, strict=True):
            rows[text] = row


class Scorer:
    """What a router holds: features, query embedding, catalog cache and :func:`decide`.

    With a costly embedder (a neural model: the default ``minilm``, a sentence-transformers
    model; :func:`costly`), the router hands each fetched batch to :meth:`prepare` first:
    the texts of the batch's messages, and of agents registered or changed since the
    tenant's catalog was built, are embedded in one call on the model's own thread, and the
    decisions find them there. One call for
    many texts is several times faster than one per text, and the event loop keeps serving
    (acks, load reports, registry changes) meanwhile. Rows embedded in a batch can differ
    from a lone text's in the last bits (the model pads a batch), far below what changes a
    decision.
    """

    def __init__(
        self,
        embedder: Embedder,
        policy: Policy = DEFAULT_POLICY,
        *,
        cache: CatalogCache | None = None,
    ) -> None:
        self.costly = costly(embedder)
        self._own_thread = _OwnThread(embedder) if self.costly else None
        self.embedder: Embedder = self._own_thread or embedder
        self._calibrated = relevance_threshold(embedder)
        self.set_policy(policy)
        if cache is not None and self._own_thread is not None and cache.embedder is embedder:
            cache.embedder = self.embedder  # the catalogs' model calls on the model's thread too
        self.catalogs = cache or CatalogCache(self.embedder)

    def set_policy(self, policy: Policy) -> None:
        """Decide by ``policy`` from now on (a threshold it leaves out is the embedder's
        calibrated value)."""
        if policy.threshold is None:
            policy = policy.model_copy(update={"threshold": self._calibrated})
        self.policy: Policy = policy

    def text_to_embed(self, payload: bytes, headers: Mapping[str, str]) -> str | None:
        """The text deciding this message would embed, when the embedder is costly and the
        text is not embedded yet; else ``None``."""
        text = self._query_text(payload, headers)
        if text is None or self._own_thread is None or self._own_thread.knows(text):
            return None
        return text

    @staticmethod
    def _query_text(payload: bytes, headers: Mapping[str, str]) -> str | None:
        """The text :meth:`query` embeds for this message, if any."""
        try:
            features = extract(payload, headers)
        except BrokerError:  # decide refuses it; nothing to embed
            return None
        return features.text if features.embedding is None and features.text else None

    def agent_texts_to_embed(self, snapshot: RegistrySnapshot, tenant: str) -> list[str]:
        """The texts of the tenant's agents registered or changed since its catalog was
        built, not embedded yet (costly embedders only; empty otherwise)."""
        own = self._own_thread
        if own is None:
            return []
        return [t for t in self.catalogs.texts_to_embed(snapshot, tenant) if not own.knows(t)]

    async def embed_ahead(self, texts: Iterable[str]) -> None:
        """Embed ``texts`` in one call on the model's thread, for the decisions to find
        (a costly embedder's; nothing to do otherwise)."""
        if self._own_thread is not None:
            await self._own_thread.embed_ahead(texts)

    async def prepare(
        self, snapshot: RegistrySnapshot, messages: Iterable[tuple[str, bytes, Mapping[str, str]]]
    ) -> None:
        """Before deciding a batch of ``(tenant, payload, headers)`` messages: embed what the
        decisions would (each text, and the agents changed since a tenant's catalog was
        built) in one call on the model's thread. Nothing to do unless the embedder is
        costly. A failure is only logged: each decision then embeds its own text, and fails
        there if it must."""
        if self._own_thread is None:
            return
        texts: list[str] = []  # known ones too: they count as just asked for
        tenants: set[str] = set()
        try:
            for tenant, payload, headers in messages:
                tenants.add(tenant)
                text = self._query_text(payload, headers)
                if text is not None:
                    texts.append(text)
            for tenant in sorted(tenants):
                texts += self.catalogs.texts_to_embed(snapshot, tenant)
            await self.embed_ahead(texts)
        except Exception as e:  # one odd message must not stop the batch (decide guards each)
            log.warning("embed_ahead_failed", texts=len(texts), error=repr(e)[:200])

    def query(self, features: Features) -> Vector | None:
        """The message's query vector: its ``Broker-Embedding``, else its embedded text."""
        if features.embedding is not None:
            if features.embedding.shape[0] != self.embedder.dim:
                raise InvalidRoutingHeader(
                    f"Broker-Embedding has {features.embedding.shape[0]} dimensions; this "
                    f"broker embeds with {self.embedder.name} ({self.embedder.dim} dimensions)"
                )
            model = features.embedding_model
            if model is not None and not same_model(model, self.embedder):
                raise InvalidRoutingHeader(
                    f"Broker-Embedding was made by {model[:200]!r}; this broker embeds with "
                    f"{self.embedder.name}, whose vectors mean something else: send "
                    "Broker-Text instead, or a vector from the broker's model"
                )
            return features.embedding
        if features.text:
            vector: Vector = self.embedder.embed([features.text])[0]
            return vector if vector.any() else None
        return None

    def decide(
        self,
        snapshot: RegistrySnapshot,
        tenant: str,
        payload: bytes,
        headers: Mapping[str, str],
        loads: Mapping[str, AgentLoad],
        *,
        live: Collection[str] | None = None,
        cooling: Collection[str] = (),
        exclude: Collection[str] = (),
        rng: random.Random | None = None,
    ) -> Decision:
        features = extract(payload, headers)
        terms = tokens(features.text) if features.text and features.embedding is None else ()
        return decide(
            self.catalogs.get(snapshot, tenant),
            features,
            loads,
            self.policy,
            query=self.query(features),
            live=live,
            cooling=cooling,
            exclude=exclude,
            rng=rng,
            terms=terms,
        )
