"""The routing policy: how load is weighed, penalised and combined with meaning.

A versioned pydantic model, loaded from YAML (:func:`load_policy`) or the built-in
:data:`DEFAULT_POLICY`. Unknown keys and out-of-range values are refused with
:class:`PolicyInvalid`, which names every failing field path. Example::

    version: gpu-heavy-2
    semantic_weight: 0.6
    threshold: 0.15
    choice: p2c
    load:
      weights: {qps: 0.3, latency: 0.3, gpu: 0.4}
    penalties:
      gpu_min_free_mb: 2048
    fallback_agent: generalist
    mirror: {summarizer: summarizer-next}
"""

from __future__ import annotations

import functools
import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.errors import Unprocessable
from broker.registry.manifest import AGENT_NAME_PATTERN, LABEL_KEY

AgentNameField = Annotated[str, Field(pattern=AGENT_NAME_PATTERN)]


class PolicyInvalid(Unprocessable):
    """A routing policy that does not validate; the message names each failing path."""

    error_code = "invalid_routing_policy"


class Choice(StrEnum):
    """How one agent is picked among the top-k candidates."""

    P2C = "p2c"  # power of two choices: two at random, the less loaded one wins
    WRR = "wrr"  # weighted random, weights = scores
    BEST = "best"  # always the best score


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Finite(_Model):
    """Settings a load weight is computed from: an infinite one (YAML's ``.inf``) made every
    agent's load weight NaN, and NaN ranks every candidate as saturated."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoadWeights(_Finite):
    """Relative weights of the load signals; renormalised over the signals an agent has."""

    qps: float = Field(default=0.4, ge=0)
    latency: float = Field(default=0.3, ge=0)
    gpu: float = Field(default=0.3, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> LoadWeights:
        if self.qps + self.latency <= 0:
            raise ValueError("qps and latency weights cannot both be 0 (agents without a GPU)")
        if not math.isfinite(self.qps + self.latency + self.gpu):
            raise ValueError("the weights are too large to add up: scale them down")
        return self


class LoadPolicy(_Finite):
    """How the load weight in [0, 1] is computed from an agent's live load.

    * QPS headroom: ``1 - qps / (max_qps * instances)`` when the manifest sets
      ``limits.max_qps`` (a per-instance limit), the same with ``in_flight`` and
      ``max_concurrency`` when that is set (the smaller headroom wins), else
      ``qps_ref / (qps_ref + qps per instance)``.
    * latency: ``latency_ref_ms / (latency_ref_ms + p99_ms)``.
    * GPU: ``min(1, gpu_free_mb / gpu_ref_mb)``, times ``1 - gpu_util / 2`` when reported.

    The weighted mean is then multiplied by ``1 - error_weight * error_rate``.
    """

    weights: LoadWeights = Field(default_factory=LoadWeights)
    qps_ref: float = Field(default=100.0, gt=0)
    latency_ref_ms: float = Field(default=100.0, gt=0)
    gpu_ref_mb: float = Field(default=16384.0, gt=0)
    error_weight: float = Field(default=1.0, ge=0, le=1)
    unknown: float = Field(
        default=0.5, ge=0, le=1, description="Load weight of an agent with no load report."
    )


class Penalties(_Model):
    """Multiplicative penalties on the load weight (a factor of 0.7 is -30 %)."""

    qps_ratio: float = Field(default=0.8, gt=0, description="Of limits.max_qps x instances.")
    qps_factor: float = Field(default=0.7, ge=0, le=1)
    p99_ms: float = Field(default=200.0, gt=0)
    p99_factor: float = Field(default=0.5, ge=0, le=1)
    gpu_min_free_mb: float = Field(default=1024.0, ge=0)
    gpu_factor: float = Field(default=0.0, ge=0, le=1)
    cooldown_factor: float = Field(default=0.0, ge=0, le=1)


class Cooldown(_Model):
    """``errors`` failures within ``window_s`` cool an agent down for ``duration_s``."""

    errors: int = Field(default=3, ge=1)
    window_s: float = Field(default=30.0, gt=0)
    duration_s: float = Field(default=30.0, gt=0)


class Canary(_Model):
    """Messages whose ``x-env`` header equals ``value`` go only to agents labelled
    ``label=value``; all other messages never go to them."""

    value: str = Field(default="canary", min_length=1, max_length=64)
    label: str = Field(
        default="env",
        min_length=1,
        max_length=63,
        pattern=LABEL_KEY.pattern,
        description="A label key as manifests have them (lower-case a-z 0-9 . _ / -): one "
        "no manifest can carry would match no agent, and send the labelled ones production "
        "traffic.",
    )


class Policy(_Model):
    """A routing policy. ``version`` is recorded in every decision."""

    version: str = Field(default="default-1", min_length=1, max_length=64)
    semantic_weight: float = Field(
        default=0.7, ge=0, le=1, description="score = w * similarity + (1 - w) * load"
    )
    threshold: float | None = Field(
        default=None,
        ge=-1,
        le=2,
        description="Least relevance (cosine + lexical) a candidate needs when the message "
        "has text or an embedding and no Broker-Intent. Unset: the embedder's own, "
        "calibrated value (0.35 with the static table: `static`, `static+hashing`; 0.2 "
        "otherwise, the default `minilm` included).",
    )
    semantic_margin: float = Field(
        default=0.1,
        ge=0,
        le=2,
        description="Only agents whose similarity is within this of the most similar eligible "
        "agent's are candidates: load then chooses among equally good matches, and never "
        "outweighs a clearly better one.",
    )
    lexical_weight: float = Field(
        default=0.5,
        ge=0,
        le=2,
        description="Weight of the lexical (BM25, IDF over the catalog's own texts) relevance "
        "added to the cosine similarity when the message has text.",
    )
    type_prior: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Relevance added to a capability that lists the message's media type "
        "exactly, times how rare that listing is in the tenant's catalog.",
    )
    modality_prior: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Relevance added to a capability that declares the message's modality, "
        "divided by the number of modalities it declares.",
    )
    top_k: int = Field(default=3, ge=1, le=64)
    choice: Choice = Choice.P2C
    load: LoadPolicy = Field(default_factory=LoadPolicy)
    penalties: Penalties = Field(default_factory=Penalties)
    cooldown: Cooldown = Field(
        default_factory=Cooldown,
        description="The router tracks failures and passes the agents cooling down to decide.",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Agents tried for one message before the DLQ."
    )
    fallback_agent: AgentNameField | None = None
    require_live: bool = Field(
        default=True,
        description="Only agents with a live load report are eligible (the router passes "
        "them to decide as `live`).",
    )
    canary: Canary = Field(default_factory=Canary)
    mirror: dict[AgentNameField, AgentNameField] = Field(default_factory=dict, max_length=1024)

    @model_validator(mode="after")
    def _no_self_mirror(self) -> Policy:
        selves = sorted(agent for agent, shadow in self.mirror.items() if agent == shadow)
        if selves:
            raise ValueError(f"an agent cannot mirror to itself: {', '.join(selves)}")
        return self

    @functools.cached_property
    def shadows(self) -> frozenset[str]:
        """The agents mirrors copy to: they get copies only, never a message of their own
        (a shadow is a version on trial, whose replies nobody reads)."""
        return frozenset(self.mirror.values())

    @functools.cached_property
    def penalty_names(self) -> tuple[str, str, str, str]:
        """Names of the QPS, p99, GPU and cooldown penalties, as recorded in candidates."""
        p = self.penalties
        return (
            f"qps_over_{_number(p.qps_ratio * 100)}pct",
            f"p99_over_{_number(p.p99_ms)}ms",
            "gpu_memory_low",
            "cooldown",
        )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


DEFAULT_POLICY = Policy()


def policy_from_dict(data: Any) -> Policy:
    """Validate a parsed policy document; :class:`PolicyInvalid` names every failing path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyInvalid("a routing policy is a mapping of settings")
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(part) for part in err['loc']) or '(root)'}: {err['msg']}"
            for err in e.errors(include_url=False)
        ]
        raise PolicyInvalid("invalid routing policy: " + "; ".join(problems[:10])) from None


def load_policy(path: str | Path, *, allow_empty: bool = True) -> Policy:
    """Read and validate a YAML (or JSON) routing policy file. An empty one (or only
    comments) is the default policy, unless ``allow_empty`` is false: a file read while
    an editor or ``cat >`` rewrites it is empty for a moment."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyInvalid(f"cannot read routing policy {file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise PolicyInvalid(f"routing policy {file} is not UTF-8 text: {e.reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyInvalid(f"routing policy {file} is not valid YAML: {str(e)[:300]}") from None
    except RecursionError:
        raise PolicyInvalid(f"routing policy {file} is nested too deeply") from None
    if data is None and not allow_empty:
        raise PolicyInvalid(f"routing policy {file} is empty")
    return policy_from_dict(data)
