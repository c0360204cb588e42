"""The tenant's agents a page at a time, in name order: what ``GET /v1/agents`` answers.

A page starts after a name (the last one the page before held) rather than at one: names
are not appended in order as stream sequences are, so an agent registered between two
reads under a name past the cursor is still found, where "the next page starts at the
name that came next" would step over it. A page stops at ``limit`` agents, or before the
agent whose manifest would take it past ``max_bytes`` (it always holds one, however large),
so it stays small whatever the manifests weigh.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.registry.snapshot import AgentRecord


@dataclass(frozen=True, slots=True)
class AgentPage:
    """Agents in name order, and the name the next page follows (``None``: no more)."""

    agents: list[AgentRecord]
    next_after: str | None


def manifest_bytes(record: AgentRecord) -> int:
    """How many bytes the agent's manifest takes as JSON."""
    return len(record.manifest.model_dump_json().encode())


def agent_page(
    agents: Sequence[AgentRecord],
    *,
    after: str | None,
    limit: int,
    max_bytes: int,
    size: Callable[[AgentRecord], int] = manifest_bytes,
) -> AgentPage:
    """The page of ``agents`` (sorted by name) that follows the name ``after`` (from the
    first when ``None``; it need not be a name in ``agents``): at most ``limit`` of them,
    and no more than ``max_bytes`` by ``size`` unless the first alone is more."""
    if limit < 1:
        raise ValueError(f"a page holds at least one agent, not {limit}")
    start = 0 if after is None else bisect.bisect_right(agents, after, key=_name)
    taken: list[AgentRecord] = []
    total = 0
    for record in agents[start : start + limit]:
        total += size(record)
        if taken and total > max_bytes:
            break
        taken.append(record)
    more = start + len(taken) < len(agents)
    return AgentPage(taken, taken[-1].name if more else None)


def _name(record: AgentRecord) -> str:
    return record.name
