"""What routing produces: an agent's live load, each candidate's scores, and the decision.

All three are frozen values with a JSON-safe ``to_dict``/``from_dict`` pair that round-trips
exactly, so a decision recorded in a ``Broker-Route`` header can be read back and re-scored
later (``CandidateScore.load_inputs`` keeps what the load weight was computed from).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


def _float(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key)
    return default if value is None else float(value)


def _score(value: Any) -> float:
    return math.nan if value is None else float(value)


def _optional_float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class AgentLoad:
    """One agent's live load, aggregated over its live instances.

    ``qps`` and ``in_flight`` are totals over the instances; ``p50_ms``/``p99_ms`` and
    ``error_rate`` describe the agent as a whole. ``gpu_free_mb`` is ``None`` for an agent
    without a GPU (its load weight then uses the QPS and latency signals only).
    """

    instances: int = 1
    qps: float = 0.0
    in_flight: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    error_rate: float = 0.0
    gpu_free_mb: float | None = None
    gpu_util: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "qps": self.qps,
            "in_flight": self.in_flight,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "error_rate": self.error_rate,
            "gpu_free_mb": self.gpu_free_mb,
            "gpu_util": self.gpu_util,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentLoad:
        """Missing keys take their defaults; unknown keys are ignored."""
        instances = data.get("instances")
        in_flight = data.get("in_flight")
        return cls(
            instances=1 if instances is None else int(instances),
            qps=_float(data, "qps", 0.0),
            in_flight=0 if in_flight is None else int(in_flight),
            p50_ms=_float(data, "p50_ms", 0.0),
            p99_ms=_float(data, "p99_ms", 0.0),
            error_rate=_float(data, "error_rate", 0.0),
            gpu_free_mb=_optional_float(data, "gpu_free_mb"),
            gpu_util=_optional_float(data, "gpu_util"),
        )


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """One ranked candidate: an agent's capability with its semantic, load and final scores."""

    agent: str
    capability: str
    semantic: float
    load: float
    score: float
    penalties: tuple[str, ...] = ()
    load_inputs: AgentLoad | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "capability": self.capability,
            "semantic": self.semantic,
            "load": self.load,
            "score": self.score,
            "penalties": list(self.penalties),
            "load_inputs": None if self.load_inputs is None else self.load_inputs.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CandidateScore:
        inputs = data.get("load_inputs")
        return cls(
            agent=str(data["agent"]),
            capability=str(data["capability"]),
            # JSON has no NaN: one is written as null, and read back as NaN, so that a
            # record holding one stays readable (an agent refuses a record it cannot read).
            semantic=_score(data["semantic"]),
            load=_score(data["load"]),
            score=_score(data["score"]),
            penalties=tuple(str(p) for p in data.get("penalties") or ()),
            load_inputs=None if inputs is None else AgentLoad.from_dict(inputs),
        )


class DecisionReason(StrEnum):
    SCORED = "scored"  # the best-scoring candidates were ranked and one was chosen
    FALLBACK = "fallback"  # nobody qualified; the policy's fallback agent takes it
    NO_CANDIDATE = "no_candidate"  # no agent passed the filters, and there is no fallback
    BELOW_THRESHOLD = "below_threshold"  # agents passed the filters, none was similar enough


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one message goes, and why.

    ``agent`` is ``None`` when nobody qualifies and there is no fallback: the message goes to
    the DLQ with ``reason``. ``candidates`` are the ranked top-k (best first) for audit; the
    chosen agent is one of them unless the decision is a fallback.
    """

    agent: str | None
    capability: str | None
    reason: DecisionReason
    detail: str
    candidates: tuple[CandidateScore, ...]
    policy_version: str
    mirror_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "capability": self.capability,
            "reason": self.reason.value,
            "detail": self.detail,
            "candidates": [c.to_dict() for c in self.candidates],
            "policy_version": self.policy_version,
            "mirror_to": self.mirror_to,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """The inverse of :meth:`to_dict`; keys it does not know (a record's envelope) are
        ignored."""
        agent = data.get("agent")
        capability = data.get("capability")
        mirror = data.get("mirror_to")
        return cls(
            agent=None if agent is None else str(agent),
            capability=None if capability is None else str(capability),
            reason=DecisionReason(data["reason"]),
            detail=str(data.get("detail", "")),
            candidates=tuple(CandidateScore.from_dict(c) for c in data.get("candidates") or ()),
            policy_version=str(data["policy_version"]),
            mirror_to=None if mirror is None else str(mirror),
        )
