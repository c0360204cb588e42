"""What-if replay: re-score recorded routing decisions under another policy.

Every ``RouteDecided`` (and every routing dead letter) holds what its decision was made
from: the payload and headers, and the load inputs of the ranked candidates. Simulation
reads them back from a point in time, decides again with the other policy against the
current registry and the same per-message random seed, and reports which decisions would
change. Only first attempts are compared; mirrors and retries follow from them.

A decision records the load of its ranked candidates only (the policy's ``top_k``), so
when the policy requires live agents, the agents that count as live are those recorded
candidates, and those recorded in cooldown are still cooling. Re-scoring under the
policy that made the decisions therefore reproduces them; a policy with another
``require_live: false`` scores every registered agent (with no load information for the
ones the decision did not record).
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker.reader import read_batches
from broker.registry.snapshot import RegistrySnapshot
from broker.routing.events import (
    H_EVENT,
    RouteDecided,
    RouteEventType,
    RouteEventUnreadable,
    original_headers,
)
from broker.routing.router import decision_rng
from broker.routing.scoring import Scorer
from broker.routing.types import AgentLoad
from broker.streams import SUBJECT_PREFIX, Stream


@dataclass(frozen=True, slots=True)
class Resimulated:
    """One recorded decision and what the other policy decides."""

    tenant: str
    message_seq: int
    message_subject: str
    decided_at: datetime
    old_agent: str | None
    new_agent: str | None
    old_reason: str
    new_reason: str
    old_policy: str
    new_policy: str

    @property
    def changed(self) -> bool:
        return self.old_agent != self.new_agent


@dataclass
class SimulationReport:
    policy_version: str
    decisions: int = 0
    changed: int = 0
    unreadable: int = 0
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    rows: list[Resimulated] = field(default_factory=list)

    def add(self, row: Resimulated) -> None:
        self.count(row)
        self.rows.append(row)

    def count(self, row: Resimulated) -> None:
        """Count ``row`` without keeping it."""
        self.decisions += 1
        if row.changed:
            self.changed += 1
            self.moves[(row.old_agent or "(dlq)", row.new_agent or "(dlq)")] += 1

    def to_dict(self) -> dict[str, object]:
        return {
            "policy_version": self.policy_version,
            "decisions": self.decisions,
            "changed": self.changed,
            "unreadable": self.unreadable,
            "moves": [
                {"from": old, "to": new, "count": n} for (old, new), n in self.moves.most_common()
            ],
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            [
                "tenant",
                "message_seq",
                "message_subject",
                "decided_at",
                "old_agent",
                "new_agent",
                "changed",
                "old_reason",
                "new_reason",
                "old_policy",
                "new_policy",
            ]
        )
        for r in self.rows:
            writer.writerow(
                [
                    r.tenant,
                    r.message_seq,
                    r.message_subject,
                    r.decided_at.isoformat(),
                    r.old_agent or "",
                    r.new_agent or "",
                    "yes" if r.changed else "no",
                    r.old_reason,
                    r.new_reason,
                    r.old_policy,
                    r.new_policy,
                ]
            )
        return out.getvalue()


def _first_attempt(message: Msg, tenant: str | None) -> tuple[RouteDecided, dict[str, str]] | None:
    """The recorded first-attempt decision in ``message`` (of ``tenant``, when given) and
    the message's headers; ``None`` for any other event. Raises
    :class:`RouteEventUnreadable`."""
    headers = dict(message.headers or {})
    if headers.get(H_EVENT) != RouteEventType.DECIDED:
        return None
    route = RouteDecided.from_headers(headers)
    if route.attempt != 1 or route.mirror or (tenant is not None and route.tenant != tenant):
        return None
    return route, headers


def resimulate(
    message: Msg, snapshot: RegistrySnapshot, scorer: Scorer, tenant: str | None = None
) -> Resimulated | None:
    """Decide one recorded first-attempt decision again; ``None`` for anything else."""
    found = _first_attempt(message, tenant)
    if found is None:
        return None
    route, headers = found
    loads: dict[str, AgentLoad] = {
        c.agent: c.load_inputs for c in route.decision.candidates if c.load_inputs is not None
    }
    cooling = {c.agent for c in route.decision.candidates if "cooldown" in c.penalties}
    new = scorer.decide(
        snapshot,
        route.tenant,
        message.data,
        original_headers(headers),
        loads,
        live=loads.keys() if scorer.policy.require_live else None,
        cooling=cooling,
        rng=decision_rng(route.tenant, route.message_seq, 1),
    )
    return Resimulated(
        tenant=route.tenant,
        message_seq=route.message_seq,
        message_subject=route.message_subject,
        decided_at=route.decided_at,
        old_agent=route.decision.agent,
        new_agent=new.agent,
        old_reason=str(route.decision.reason),
        new_reason=str(new.reason),
        old_policy=route.decision.policy_version,
        new_policy=new.policy_version,
    )


async def _embed_ahead(
    batch: Sequence[Msg], snapshot: RegistrySnapshot, scorer: Scorer, tenant: str | None
) -> None:
    """A costly embedder embeds the batch's texts in one call (:meth:`Scorer.prepare`)."""
    if not scorer.costly:
        return
    messages = []
    for message in batch:
        with contextlib.suppress(RouteEventUnreadable):  # counted when it is decided
            found = _first_attempt(message, tenant)
            if found is not None:
                route, headers = found
                messages.append((route.tenant, message.data, original_headers(headers)))
    await scorer.prepare(snapshot, messages)


async def recorded_decisions(
    js: JetStreamContext, *, since: datetime | None = None
) -> AsyncIterator[list[Msg]]:
    """Batches of stored decisions: agents' inboxes, then routing dead letters."""
    sources: Iterable[tuple[Stream, str]] = (
        (Stream.ROUTES, f"{SUBJECT_PREFIX[Stream.ROUTES]}.*.*"),
        (Stream.DLQ, f"{SUBJECT_PREFIX[Stream.DLQ]}.*.route"),
    )
    for stream, subject in sources:
        async for batch in read_batches(js, stream, subject=subject, start_time=since):
            yield batch


async def simulate(
    js: JetStreamContext,
    snapshot: RegistrySnapshot,
    scorer: Scorer,
    *,
    since: datetime | None = None,
    tenant: str | None = None,
    rows: Callable[[Resimulated], None] | None = None,
) -> SimulationReport:
    """Decide every recorded first attempt (of ``tenant``) again. The report keeps each
    decision, sorted by tenant and message sequence; with ``rows``, each goes to it as it
    is decided instead, and the report holds only the counts."""
    report = SimulationReport(policy_version=scorer.policy.version)
    async for batch in recorded_decisions(js, since=since):
        await _embed_ahead(batch, snapshot, scorer, tenant)
        for message in batch:
            try:
                row = resimulate(message, snapshot, scorer, tenant)
            except RouteEventUnreadable:
                report.unreadable += 1
                continue
            if row is None:
                continue
            if rows is None:
                report.add(row)
            else:
                report.count(row)
                rows(row)
    report.rows.sort(key=lambda r: (r.tenant, r.message_seq))
    return report
