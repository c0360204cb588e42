"""Scores: top-1 accuracy, accuracy per modality and for the hard requests, confusion pairs.

The same :class:`Summary` serves the broker run and the in-process baselines, so their
numbers are computed one way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.routing_quality.dataset import Request

NONE = "(none)"


@dataclass(frozen=True)
class Outcome:
    """What happened to one request: the agent chosen (None: nobody) against its label."""

    request_id: str
    label: str
    modality: str
    hard: bool
    chosen: str | None
    top3: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.chosen == self.label

    @classmethod
    def of(
        cls,
        request: Request,
        chosen: str | None,
        top3: tuple[str, ...] = (),
        **detail: Any,
    ) -> Outcome:
        return cls(
            request.id, request.label, request.modality.value, request.hard, chosen, top3, detail
        )


@dataclass(frozen=True)
class Bucket:
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def _bucket(outcomes: list[Outcome]) -> Bucket:
    return Bucket(len(outcomes), sum(o.correct for o in outcomes))


@dataclass(frozen=True)
class Summary:
    name: str
    outcomes: list[Outcome]

    @property
    def overall(self) -> Bucket:
        return _bucket(self.outcomes)

    @property
    def top3(self) -> Bucket | None:
        """Label among the first three distinct agents ranked; None when no ranking is known."""
        ranked = [o for o in self.outcomes if o.top3]
        if not ranked:
            return None
        return Bucket(len(self.outcomes), sum(o.label in o.top3 for o in self.outcomes))

    def by_modality(self) -> dict[str, Bucket]:
        modalities = sorted({o.modality for o in self.outcomes})
        return {m: _bucket([o for o in self.outcomes if o.modality == m]) for m in modalities}

    def hard(self) -> Bucket:
        return _bucket([o for o in self.outcomes if o.hard])

    def confusion(self) -> list[tuple[str, str, int]]:
        """(label, chosen, count) for every wrong pair, most frequent first."""
        pairs = Counter((o.label, o.chosen or NONE) for o in self.outcomes if not o.correct)
        return [(label, chosen, n) for (label, chosen), n in pairs.most_common()]

    def lines(self) -> list[str]:
        """The human-readable report."""
        total = self.overall
        out = [f"{self.name}: top-1 accuracy {total.accuracy:.3f} ({total.correct}/{total.n})"]
        top3 = self.top3
        if top3 is not None:
            out.append(f"  top-3 accuracy {top3.accuracy:.3f} ({top3.correct}/{top3.n})")
        out.append("  by modality:")
        for modality, bucket in self.by_modality().items():
            out.append(f"    {modality:<11} {bucket.accuracy:.3f} ({bucket.correct}/{bucket.n})")
        hard = self.hard()
        out.append(f"  hard ones:    {hard.accuracy:.3f} ({hard.correct}/{hard.n})")
        confusion = self.confusion()
        out.append("  confusion pairs (label -> chosen: count):" + ("" if confusion else " none"))
        out += [f"    {label} -> {chosen}: {n}" for label, chosen, n in confusion]
        return out

    def to_dict(self) -> dict[str, Any]:
        top3 = self.top3
        return {
            "name": self.name,
            "top1": {**asdict(self.overall), "accuracy": self.overall.accuracy},
            "top3": None if top3 is None else {**asdict(top3), "accuracy": top3.accuracy},
            "by_modality": {
                m: {**asdict(b), "accuracy": b.accuracy} for m, b in self.by_modality().items()
            },
            "hard": {**asdict(self.hard()), "accuracy": self.hard().accuracy},
            "confusion": [
                {"label": label, "chosen": chosen, "count": n}
                for label, chosen, n in self.confusion()
            ],
            "requests": [
                {**asdict(o), "top3": list(o.top3), "correct": o.correct} for o in self.outcomes
            ],
        }
