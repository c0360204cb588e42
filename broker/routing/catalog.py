"""The routing catalog: one tenant's agents as arrays, so a decision is NumPy work.

A *group* is one (agent, capability). Each group has one or more unit *rows* in an embedding
matrix: the primary row (the manifest's ``embedding.vector`` when its dimension matches the
embedder and its ``embedding.model``, if given, is the embedder's; else the embedded text
"agent description (or embedding.text) + action + capability description") and, by
default, one row per capability example; a group's similarity to a query is the best of its
rows (``examples="mean"`` folds the examples into the primary row instead;
``benchmarks/routing.py --quality`` compares the two).

Beside the embedding rows, each group has a bag of word stems (the same texts) in a
:class:`LexicalIndex` (BM25, IDF over the catalog's own groups), and :meth:`Catalog.prior`
scores how specifically each group declares a message's media type and modality.

Per-group arrays (agent id, accepted content types and modalities as cached boolean masks,
canary label, limits) are precomputed, and masks derived from a message's features, the
live set and the loads mapping are cached on the catalog, so the hot path is dict lookups
and vector arithmetic, never a Python loop over agents.

Which messages a capability accepts: when its ``content_types`` match the message's media
type (exact, ``type/*`` or ``*/*``; ``application/json`` also matches ``+json`` types; an
``application/octet-stream`` payload is matched by the media type its magic bytes name, and
so is one whose type names the magic bytes' modality, never one typed otherwise), or
its ``modalities`` include the message's modality. A capability that declares neither
accepts text (``text`` modality) and JSON only.

:class:`CatalogCache` keeps one catalog per tenant and rebuilds it only when that tenant's
agents changed (their record sequences), re-embedding only the agents that changed.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import structlog

from broker.registry.manifest import Capability, Embedding, Limits, Modality
from broker.registry.snapshot import AgentRecord, RegistrySnapshot
from broker.routing.embedder import Embedder, same_model, tokens
from broker.routing.features import (
    MAGIC_MEDIA_TYPE,
    MAGIC_MODALITY,
    is_json_type,
    modality_of_media_type,
)
from broker.routing.index import DEFAULT_LSH_ABOVE, LSHIndex
from broker.routing.policy import Canary, Policy
from broker.routing.types import AgentLoad

log = structlog.get_logger(__name__)

Mask = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]
Vector = npt.NDArray[np.float32]
ExampleMode = Literal["rows", "mean"]
_MEMO_LIMIT = 512


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


def _unit(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    unit: npt.NDArray[np.float32] = np.divide(
        matrix, norms, out=np.zeros_like(matrix), where=norms > 0
    )
    return unit


def _given_unit(given: Sequence[float]) -> Vector | None:
    """A manifest's own vector as a unit row, made in float64: an entry past float32's range
    (``1e39``, valid JSON) made an infinite row there and a NaN one once normalised, and one
    NaN similarity turned semantic routing off for the agent's whole tenant (every message
    ranked by load alone). ``None`` when no finite unit row comes of it."""
    row = np.asarray(given, dtype=np.float64)
    norm = float(np.linalg.norm(row))
    if not math.isfinite(norm) or norm == 0.0:
        return None
    unit: Vector = (row / norm).astype(np.float32)
    return unit if np.isfinite(unit).all() else None


def _magic_type(content_type: str, magic: str | None) -> str | None:
    """The media type the magic bytes name, when they do not contradict the declared type:
    the content type names no modality (``application/octet-stream``, ``application/zip``),
    or the same one as the magic bytes (a PNG sent as ``image/jpeg``). A ``text/plain``
    body that starts with "BM" (a BMP signature: "BMW sales…") or "ID3" is text, not an
    image or MP3 that image and audio agents should take."""
    if magic is None or magic not in MAGIC_MEDIA_TYPE:
        return None
    named = MAGIC_MEDIA_TYPE[magic]
    declared = modality_of_media_type(content_type)
    return named if declared is None or declared is MAGIC_MODALITY.get(magic) else None


def accepts(
    capability: Capability, content_type: str, modality: Modality, magic: str | None
) -> bool:
    """Whether ``capability`` takes a message of this media type, modality and magic format
    (the rule in the module docstring)."""
    if not capability.content_types and not capability.modalities:
        return modality is Modality.TEXT or is_json_type(content_type)
    if modality in capability.modalities:
        return True
    types = [content_type]
    named = _magic_type(content_type, magic)
    if named is not None:
        types.append(named)
    for pattern in capability.content_types:
        for media in types:
            if (
                pattern in ("*/*", media)
                or (pattern.endswith("/*") and media.startswith(pattern[:-1]))
                or (pattern == "application/json" and media.endswith("+json"))
            ):
                return True
    return False


# --- lexical relevance ------------------------------------------------------------------------


class LexicalIndex:
    """BM25 over the groups' own texts (agent description, action, capability description,
    examples), with the IDF taken from the catalog itself: a word most capabilities use says
    little, a word one capability uses says much. No outside vocabulary, no training.

    :meth:`scores` gives each group ``sum(idf(t) * sat(tf)) / sum(idf(t))`` over the query's
    distinct stems, in [0, 1], where ``sat(tf) = tf (k1 + 1) / (tf + k1 (1 - b + b len /
    avg len))`` scaled to [0, 1); a query stem the catalog never uses counts in the denominator
    with the largest IDF, so a query mostly made of unknown words scores low everywhere.
    """

    def __init__(self, docs: Sequence[Sequence[str]], *, k1: float = 1.2, b: float = 0.5) -> None:
        n = len(docs)
        self.n = n
        lengths = np.array([len(d) for d in docs], dtype=np.float64).reshape(n)
        avg = float(lengths.mean()) if n and lengths.sum() else 1.0
        norm = k1 * (1.0 - b + b * lengths / avg)
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for g, doc in enumerate(docs):
            counts: dict[str, int] = {}
            for term in doc:
                counts[term] = counts.get(term, 0) + 1
            for term, tf in counts.items():
                ids, weights = postings.setdefault(term, ([], []))
                ids.append(g)
                weights.append(tf / (tf + float(norm[g])))  # sat(tf), in [0, 1)
        self.unknown_idf = math.log(1.0 + (n + 0.5) / 0.5)
        self._postings: dict[str, tuple[npt.NDArray[np.intp], Floats, float]] = {}
        for term, (ids, weights) in postings.items():
            df = len(ids)
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            sat = np.array(weights, dtype=np.float64)
            self._postings[term] = (np.array(ids, dtype=np.intp), sat * idf, idf)

    def __len__(self) -> int:
        return len(self._postings)

    def scores(self, terms: Iterable[str]) -> Floats:
        """Each group's lexical relevance to the query stems ``terms`` (see the class)."""
        out = np.zeros(self.n, dtype=np.float64)
        mass = 0.0
        for term in dict.fromkeys(terms):
            found = self._postings.get(term)
            if found is None:
                mass += self.unknown_idf
                continue
            ids, weighted, idf = found
            out[ids] += weighted
            mass += idf
        if mass > 0.0:
            out /= mass
        return out


def _group_terms(record: AgentRecord, capability: Capability) -> list[str]:
    manifest = record.manifest
    about = manifest.description
    if manifest.embedding is not None and manifest.embedding.text:
        about += " " + manifest.embedding.text
    words = [_primary_text(capability, about), *capability.examples]
    return tokens(" ".join(words))


# --- priors from what a capability declares ---------------------------------------------------


def media_types_of(content_type: str, magic: str | None) -> tuple[str, ...]:
    """The media types a message counts as: its own, and the one its magic bytes name (when
    they do not contradict it: :func:`_magic_type`)."""
    named = _magic_type(content_type, magic)
    return (content_type,) if named is None or named == content_type else (content_type, named)


def _type_specificity(capabilities: Sequence[Capability], media: tuple[str, ...]) -> Floats:
    """Per group: how rare, in this catalog, an exact listing of the message's media type is
    (``ln(N / n) / ln(N)`` for the ``n`` of ``N`` capabilities that list it; 0 for those that
    do not, or take it only by a wildcard or their modality)."""
    listed = np.array(
        [any(m in c.content_types for m in media) for c in capabilities], dtype=np.bool_
    ).reshape(len(capabilities))
    n, k = len(capabilities), int(listed.sum())
    if n < 2 or k == 0:
        return np.zeros(n, dtype=np.float64)
    rarity = math.log(n / k) / math.log(n)
    return np.where(listed, rarity, 0.0)


def _modality_specificity(capabilities: Sequence[Capability], modality: Modality) -> Floats:
    """Per group: ``1 / len(modalities)`` when the capability declares ``modality`` (a
    capability for images only is more of an image specialist than one for images,
    documents and text), else 0."""
    return np.array(
        [1.0 / len(c.modalities) if modality in c.modalities else 0.0 for c in capabilities],
        dtype=np.float64,
    ).reshape(len(capabilities))


_NAN = float("nan")


@dataclass(frozen=True, slots=True)
class GroupLoads:
    """Per-group load arrays for one policy, derived from :class:`LoadArrays` by
    :mod:`broker.routing.scoring`: the load weight and penalty bits, the load's share of the
    score ``(1 - semantic_weight) * weight``, and the ranking costs (lower ranks first) with
    and without semantics, which put every zero-load group after the others."""

    policy: Policy
    weight: Floats
    bits: npt.NDArray[np.uint8]
    load_term: Floats
    cost: Floats  # -(load_term + bonus); a decision subtracts semantic_weight * similarity
    cost_by_load: Floats  # -(weight + bonus)


@dataclass(slots=True)
class LoadArrays:
    """The catalog agents' live loads as arrays (NaN: not reported / no limit)."""

    loads: tuple[AgentLoad | None, ...]
    present: Mask
    instances: Floats
    qps: Floats
    in_flight: Floats
    p99_ms: Floats
    error_rate: Floats
    gpu_free_mb: Floats
    gpu_util: Floats
    max_qps: Floats
    max_concurrency: Floats
    #: Memo of :class:`GroupLoads` for the last policy used, filled in by routing.scoring.
    groups: GroupLoads | None = None

    @classmethod
    def build(
        cls,
        loads: Sequence[AgentLoad | None],
        max_qps: Floats,
        max_concurrency: Floats,
    ) -> LoadArrays:
        """One pass over ``loads`` (aligned with the limit arrays)."""
        flat: list[float] = []
        add = flat.extend
        for x in loads:
            if x is None:
                add(_NO_LOAD_ROW)
            else:
                gpu_free, gpu_util = x.gpu_free_mb, x.gpu_util
                add(
                    (
                        1.0,
                        x.instances,
                        x.qps,
                        x.in_flight,
                        x.p99_ms,
                        x.error_rate,
                        _NAN if gpu_free is None else gpu_free,
                        _NAN if gpu_util is None else gpu_util,
                    )
                )
        table = np.array(flat, dtype=np.float64).reshape(len(loads), 8)
        return cls(
            loads=tuple(loads),
            present=table[:, 0] > 0,
            instances=np.fmax(table[:, 1], 1.0),
            qps=table[:, 2],
            in_flight=table[:, 3],
            p99_ms=table[:, 4],
            error_rate=table[:, 5],
            gpu_free_mb=table[:, 6],
            gpu_util=table[:, 7],
            max_qps=max_qps,
            max_concurrency=max_concurrency,
        )

    @classmethod
    def of(cls, loads: Sequence[AgentLoad | None], limits: Sequence[Limits]) -> LoadArrays:
        """Load arrays for agents given by their limits (not a catalog's)."""
        return cls.build(loads, *_limit_arrays(limits))


def _limit_arrays(limits: Sequence[Limits]) -> tuple[Floats, Floats]:
    def column(values: Iterable[float | None]) -> Floats:
        return np.array([_NAN if v is None else v for v in values], dtype=np.float64)

    return (
        column(lim.max_qps for lim in limits).reshape(len(limits)),
        column(lim.max_concurrency for lim in limits).reshape(len(limits)),
    )


_NO_LOAD_ROW = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0, _NAN, _NAN)


@dataclass(frozen=True, slots=True)
class _Group:
    agent: str
    capability: Capability
    rows: npt.NDArray[np.float32]  # (r, dim), unit rows


@dataclass(frozen=True, slots=True)
class _AgentEntry:
    """One agent's embedded groups, kept across rebuilds while its record seq is unchanged."""

    record: AgentRecord
    groups: tuple[_Group, ...]


def _vector_problem(embedding: Embedding, embedder: Embedder) -> str | None:
    """Why a manifest's ``embedding.vector`` is not in the embedder's space (``None``: it
    is): its dimension differs, or it names the model that made it and that model is not the
    embedder's. (A 384-number vector from another model would otherwise be compared as if it
    were one of ours: meaningless scores, silently.)"""
    vector = embedding.vector
    if vector is not None and len(vector) != embedder.dim:
        return "dimension"
    if embedding.model is not None and not same_model(embedding.model, embedder):
        return "model"
    return None


def _primary_text(capability: Capability, about: str) -> str:
    action = capability.action.replace("_", " ").replace("-", " ").replace(".", " ")
    return f"{about}. {action}. {capability.description}".strip()


_Plan = list[tuple[AgentRecord, list[tuple[Capability, Vector | int, list[int]]]]]


def _plan_agents(records: Sequence[AgentRecord], embedder: Embedder) -> tuple[list[str], _Plan]:
    """The texts to embed for these records' groups, and where each group's rows come from
    (a row of a manifest's own vector, or indexes into the texts)."""
    texts: list[str] = []
    plans: _Plan = []
    for record in records:
        manifest = record.manifest
        vector: Vector | None = None
        about = manifest.description
        if manifest.embedding is not None:
            given = manifest.embedding.vector
            if given is not None and _vector_problem(manifest.embedding, embedder) is None:
                vector = _given_unit(given)
            if vector is None and manifest.embedding.text:
                about = manifest.embedding.text
        plan: list[tuple[Capability, Vector | int, list[int]]] = []
        for capability in manifest.capabilities:
            if vector is not None:
                primary: Vector | int = vector
            else:
                primary = len(texts)
                texts.append(_primary_text(capability, about))
            example_ids = []
            for example in capability.examples:
                example_ids.append(len(texts))
                texts.append(example)
            plan.append((capability, primary, example_ids))
        plans.append((record, plan))
    return texts, plans


def _embed_agents(
    records: Sequence[AgentRecord], embedder: Embedder, examples: ExampleMode
) -> list[_AgentEntry]:
    """Embed every record's groups with one ``embed`` call."""
    texts, plans = _plan_agents(records, embedder)
    for record in records:
        embedding = record.manifest.embedding
        if embedding is None or embedding.vector is None:
            continue
        problem = _vector_problem(embedding, embedder)
        if problem is not None:
            log.warning(
                "agent_embedding_ignored",
                agent=record.name,
                because=problem,
                dim=len(embedding.vector),
                model=embedding.model,
                embedder=embedder.name,
                expected=embedder.dim,
                using="embedding.text" if embedding.text else "description",
            )
    embedded = embedder.embed(texts) if texts else np.zeros((0, embedder.dim), np.float32)

    entries = []
    for record, plan in plans:
        groups = []
        for capability, primary, example_ids in plan:
            first = embedded[primary] if isinstance(primary, int) else primary
            extra = embedded[example_ids]
            extra = extra[np.linalg.norm(extra, axis=1) > 0]
            if examples == "mean" and len(extra):
                rows = _unit(first + _unit(extra.mean(axis=0)))[None, :]
            else:
                rows = np.vstack([first[None, :], extra])
            groups.append(_Group(record.name, capability, rows.astype(np.float32)))
        entries.append(_AgentEntry(record, tuple(groups)))
    return entries


class Catalog:
    """One tenant's agents, capabilities and embedding rows as arrays (see module docstring).

    Derived masks are memoised on the catalog: filters by feature key, the live mask and the
    load arrays by the *identity* of the ``live`` collection and ``loads`` mapping passed in.
    Treat those as immutable values: pass a new object when they change.
    """

    def __init__(
        self,
        tenant: str,
        entries: Sequence[_AgentEntry],
        dim: int,
        *,
        embedder_name: str = "",
        lsh_above: int = DEFAULT_LSH_ABOVE,
    ) -> None:
        entries = sorted(entries, key=lambda e: e.record.name)
        self.tenant = tenant
        self.dim = dim
        self.embedder_name = embedder_name
        self.records: tuple[AgentRecord, ...] = tuple(e.record for e in entries)
        self.agents: tuple[str, ...] = tuple(e.record.name for e in entries)
        self.agent_index: dict[str, int] = {name: i for i, name in enumerate(self.agents)}
        self.seqs: dict[str, int] = {e.record.name: e.record.seq for e in entries}
        self.limits: tuple[Limits, ...] = tuple(e.record.manifest.limits for e in entries)
        self._max_qps, self._max_concurrency = _limit_arrays(self.limits)
        groups = [g for e in entries for g in e.groups]
        self.capabilities: tuple[Capability, ...] = tuple(g.capability for g in groups)
        self.group_action: tuple[str, ...] = tuple(g.capability.action for g in groups)
        self.group_agent = _frozen(
            np.array([self.agent_index[g.agent] for g in groups], dtype=np.intp)
        )
        self.group_agent_list: list[int] = self.group_agent.tolist()
        counts = np.array([len(e.groups) for e in entries], dtype=np.intp)
        self.one_group_per_agent = bool((counts == 1).all())
        self.agent_groups = _frozen(np.concatenate([[0], np.cumsum(counts)]).astype(np.intp))
        rows = [g.rows for g in groups]
        row_counts = np.array([len(r) for r in rows], dtype=np.intp)
        self.matrix: npt.NDArray[np.float32] = _frozen(
            np.ascontiguousarray(np.vstack(rows) if rows else np.zeros((0, dim), np.float32))
        )
        self.row_group = _frozen(np.repeat(np.arange(len(groups), dtype=np.intp), row_counts))
        self.group_starts = _frozen(
            np.concatenate([[0], np.cumsum(row_counts)[:-1]]).astype(np.intp)
        )
        self.one_row_per_group = bool(len(rows) == self.matrix.shape[0])
        # Exact similarities are one matrix-vector product up to lsh_above rows; beyond, LSH.
        self.index: LSHIndex | None = (
            LSHIndex(self.matrix) if self.matrix.shape[0] > lsh_above else None
        )
        self.no_similarity = _frozen(np.zeros(len(groups), dtype=np.float32))
        by_name: dict[str, AgentRecord] = {e.record.name: e.record for e in entries}
        self.lexical = LexicalIndex([_group_terms(by_name[g.agent], g.capability) for g in groups])
        self._priors: dict[tuple[Any, ...], Floats | None] = {}
        self._filters: dict[tuple[Any, ...], Mask] = {}
        self._live: tuple[object, Mask] | None = None
        self._live_and: tuple[Mask, object, Mask] | None = None
        self._loads: tuple[object, LoadArrays] | None = None

    def __len__(self) -> int:
        return len(self.agents)

    @property
    def n_groups(self) -> int:
        return len(self.group_action)

    def group_slice(self, agent: str) -> slice | None:
        """The groups of ``agent`` (consecutive), or ``None`` when it is not in the catalog."""
        i = self.agent_index.get(agent)
        if i is None:
            return None
        return slice(int(self.agent_groups[i]), int(self.agent_groups[i + 1]))

    # --- masks over groups --------------------------------------------------------------

    def _memo(self, key: tuple[Any, ...], build: Mask) -> Mask:
        if len(self._filters) >= _MEMO_LIMIT:
            self._filters.clear()
        self._filters[key] = _frozen(build)
        return build

    def action_mask(self, intent: str | None) -> Mask:
        """Groups whose action is ``intent`` (all groups when ``intent`` is ``None``)."""
        key = ("action", intent)
        found = self._filters.get(key)
        if found is not None:
            return found
        if intent is None:
            return self._memo(key, np.ones(self.n_groups, dtype=np.bool_))
        return self._memo(key, np.array([a == intent for a in self.group_action], dtype=np.bool_))

    def accept_mask(self, content_type: str, modality: Modality, magic: str | None) -> Mask:
        """Groups whose capability accepts such a message."""
        key = ("accept", content_type, modality, magic)
        found = self._filters.get(key)
        if found is not None:
            return found
        values = [accepts(c, content_type, modality, magic) for c in self.capabilities]
        return self._memo(key, np.array(values, dtype=np.bool_).reshape(self.n_groups))

    def prior(
        self,
        content_type: str,
        modality: Modality,
        magic: str | None,
        *,
        readings: bool,
        type_weight: float,
        modality_weight: float,
    ) -> Floats | None:
        """Per group: ``type_weight`` x how specific its listing of the message's media type
        is, plus ``modality_weight`` x how specialised it is in the message's modality (and
        in ``sensor`` too when ``readings``: a JSON body of mostly numbers); ``None`` when
        that is 0 for every group. Memoised by the whole key."""
        key = (content_type, modality, magic, readings, type_weight, modality_weight)
        if key in self._priors:
            return self._priors[key]
        caps = self.capabilities
        prior = type_weight * _type_specificity(caps, media_types_of(content_type, magic))
        prior += modality_weight * _modality_specificity(caps, modality)
        if readings and modality is not Modality.SENSOR:
            prior += modality_weight * _modality_specificity(caps, Modality.SENSOR)
        found = _frozen(prior) if prior.any() else None
        if len(self._priors) >= _MEMO_LIMIT:
            self._priors.clear()
        self._priors[key] = found
        return found

    def canary_mask(self, canary: Canary, wanted: bool) -> Mask:
        """Groups of agents labelled ``canary.label=canary.value`` (``wanted``), or of the
        other agents (not ``wanted``)."""
        key = ("canary", canary.label, canary.value, wanted)
        found = self._filters.get(key)
        if found is not None:
            return found
        labelled = np.array(
            [r.manifest.labels.get(canary.label) == canary.value for r in self.records],
            dtype=np.bool_,
        ).reshape(len(self.records))
        by_group = labelled[self.group_agent]
        return self._memo(key, by_group if wanted else ~by_group)

    def filter_mask(
        self,
        *,
        intent: str | None,
        content_type: str,
        modality: Modality,
        magic: str | None,
        canary: Canary,
        wants_canary: bool,
    ) -> Mask:
        """Action, acceptance and canary masks combined (memoised by the whole key)."""
        key = (
            "filter",
            intent,
            content_type,
            modality,
            magic,
            canary.label,
            canary.value,
            wants_canary,
        )
        found = self._filters.get(key)
        if found is not None:
            return found
        combined = (
            self.action_mask(intent)
            & self.accept_mask(content_type, modality, magic)
            & self.canary_mask(canary, wants_canary)
        )
        return self._memo(key, combined)

    def live_mask(self, live: Collection[str]) -> Mask:
        """Groups of agents named in ``live`` (memoised by the identity of ``live``)."""
        cached = self._live
        if cached is not None and cached[0] is live:
            return cached[1]
        names = live if isinstance(live, (AbstractSet, Mapping)) else set(live)
        alive = np.array([name in names for name in self.agents], dtype=np.bool_)
        mask = _frozen(alive.reshape(len(self.agents))[self.group_agent])
        self._live = (live, mask)
        return mask

    def and_live(self, mask: Mask, live: Collection[str]) -> Mask:
        """``mask & live_mask(live)``, memoised for the last (mask, live) pair by identity."""
        cached = self._live_and
        if cached is not None and cached[0] is mask and cached[1] is live:
            return cached[2]
        combined = _frozen(mask & self.live_mask(live))
        self._live_and = (mask, live, combined)
        return combined

    def without(self, mask: Mask, agents: Iterable[str]) -> Mask:
        """A copy of ``mask`` with every group of ``agents`` cleared."""
        out = mask.copy()
        for agent in agents:
            where = self.group_slice(agent)
            if where is not None:
                out[where] = False
        return out

    # --- loads and similarity ---------------------------------------------------------------

    def load_arrays(self, loads: Mapping[str, AgentLoad]) -> LoadArrays:
        """The agents' loads as arrays (memoised by the identity of ``loads``)."""
        cached = self._loads
        if cached is not None and cached[0] is loads:
            return cached[1]
        arrays = LoadArrays.build(
            [loads.get(name) for name in self.agents], self._max_qps, self._max_concurrency
        )
        self._loads = (loads, arrays)
        return arrays

    def similarities(self, query: Vector) -> npt.NDArray[np.float32]:
        """Cosine similarity of every group to ``query`` (the best of the group's rows)."""
        sims = self.matrix @ query
        if self.one_row_per_group:
            return sims
        return np.maximum.reduceat(sims, self.group_starts) if len(sims) else sims

    def nearest_groups(
        self, query: Vector, allowed: Mask, k: int
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
        """Up to ``k`` allowed groups nearest to ``query`` through the LSH index (catalogs
        with more than ``lsh_above`` rows), with their similarities."""
        if self.index is None:
            raise RuntimeError("this catalog is small enough for exact similarities")
        rows, scores = self.index.search(query, k * 4, allowed[self.row_group])
        groups = self.row_group[rows]
        _, first = np.unique(groups, return_index=True)  # rows come best first
        first.sort()
        return groups[first][:k], scores[first][:k]


def build_catalog(
    records: Iterable[AgentRecord],
    embedder: Embedder,
    *,
    tenant: str | None = None,
    examples: ExampleMode = "rows",
    lsh_above: int = DEFAULT_LSH_ABOVE,
) -> Catalog:
    """Embed ``records`` (one tenant's agents) into a :class:`Catalog`."""
    records = list(records)
    entries = _embed_agents(records, embedder, examples)
    owner = tenant if tenant is not None else (records[0].tenant if records else "")
    return Catalog(owner, entries, embedder.dim, embedder_name=embedder.name, lsh_above=lsh_above)


@dataclass(slots=True)
class CatalogCache:
    """One catalog per tenant, rebuilt only when the tenant's agents change.

    ``get`` is a dict lookup while the snapshot object is the one seen last; when a new
    snapshot arrives, a tenant's catalog is rebuilt only if its agents' record sequences
    differ, and only the changed agents are embedded again.
    """

    embedder: Embedder
    examples: ExampleMode = "rows"
    lsh_above: int = DEFAULT_LSH_ABOVE
    _snapshot: RegistrySnapshot | None = None
    _current: dict[str, Catalog] = field(default_factory=dict)
    _entries: dict[tuple[str, str], _AgentEntry] = field(default_factory=dict)
    _previous: dict[str, Catalog] = field(default_factory=dict)
    builds: int = 0

    def get(self, snapshot: RegistrySnapshot, tenant: str) -> Catalog:
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._current = {}
        found = self._current.get(tenant)
        if found is None:
            found = self._refresh(snapshot, tenant)
            self._current[tenant] = found
        return found

    def texts_to_embed(self, snapshot: RegistrySnapshot, tenant: str) -> list[str]:
        """The texts :meth:`get` would embed for this tenant now: those of agents added or
        changed since its catalog was built (a router embeds them ahead, off its loop)."""
        if snapshot is self._snapshot and tenant in self._current:
            return []
        changed = self._changed(snapshot, tenant)
        return _plan_agents(changed[1], self.embedder)[0] if changed is not None else []

    def _changed(
        self, snapshot: RegistrySnapshot, tenant: str
    ) -> tuple[list[_AgentEntry], list[AgentRecord], list[AgentRecord]] | None:
        """``None`` when the tenant's catalog is up to date; else the entries kept, the
        records to embed again and all the tenant's records."""
        records = [r for (t, _), r in snapshot.items() if t == tenant]
        previous = self._previous.get(tenant)
        if previous is not None and previous.seqs == {r.name: r.seq for r in records}:
            return None
        entries: list[_AgentEntry] = []
        stale: list[AgentRecord] = []
        for record in records:
            kept = self._entries.get((tenant, record.name))
            if kept is not None and kept.record.seq == record.seq:
                entries.append(kept)
            else:
                stale.append(record)
        return entries, stale, records

    def _refresh(self, snapshot: RegistrySnapshot, tenant: str) -> Catalog:
        changed = self._changed(snapshot, tenant)
        if changed is None:
            return self._previous[tenant]
        entries, stale, records = changed
        for entry in _embed_agents(stale, self.embedder, self.examples):
            entries.append(entry)
        current_names = {r.name for r in records}
        for key in [k for k in self._entries if k[0] == tenant and k[1] not in current_names]:
            del self._entries[key]
        for entry in entries:
            self._entries[(tenant, entry.record.name)] = entry
        catalog = Catalog(
            tenant,
            entries,
            self.embedder.dim,
            embedder_name=self.embedder.name,
            lsh_above=self.lsh_above,
        )
        self._previous[tenant] = catalog
        self.builds += 1
        log.info(
            "routing_catalog_built", tenant=tenant, agents=len(catalog), rows=len(catalog.matrix)
        )
        return catalog
