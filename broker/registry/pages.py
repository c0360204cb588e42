"""Registry answers a page at a time: the tenant's agents in name order (``GET /v1/agents``)
and one agent's events in stream order (``GET /v1/agents/{name}/history``).

Either page stops at ``limit`` items, or before the item whose manifest would take it past
``max_bytes`` (it always holds one, however large), so it stays small whatever the
manifests weigh; :class:`PageFill` keeps that count for both.

A list page starts after a name (the last one the page before held) rather than at one:
names are not appended in order as stream sequences are, so an agent registered between
two reads under a name past the cursor is still found, where "the next page starts at the
name that came next" would step over it. A history page starts at a stream sequence (see
:func:`broker.registry.commands.agent_history`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.registry.manifest import AgentManifest
from broker.registry.snapshot import AgentRecord


class HasManifest(Protocol):
    """An agent as registered, or an event of one (a deregistration carries no manifest)."""

    @property
    def manifest(self) -> AgentManifest | None: ...


@dataclass(slots=True)
class PageFill:
    """What a page holds so far, against its bounds: at most ``limit`` items, and no more
    than ``max_bytes`` unless its first item alone is more (``None``: no such bound)."""

    limit: int | None
    max_bytes: int | None
    items: int = 0
    total_bytes: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"a page holds at least one item, not {self.limit}")

    def take(self, size: int) -> bool:
        """Count in one more item of ``size`` bytes and say ``True``; or, when it would take
        the page past a bound, count nothing and say ``False``: the page ends before it."""
        full = self.limit is not None and self.items >= self.limit
        over = self.max_bytes is not None and self.total_bytes + size > self.max_bytes
        if full or (over and self.items > 0):
            return False
        self.items += 1
        self.total_bytes += size
        return True


@dataclass(frozen=True, slots=True)
class AgentPage:
    """Agents in name order, and the name the next page follows (``None``: no more)."""

    agents: list[AgentRecord]
    next_after: str | None


def manifest_bytes(item: HasManifest) -> int:
    """How many bytes the manifest of an agent or of an event takes as JSON (none: 0)."""
    return 0 if item.manifest is None else len(item.manifest.model_dump_json().encode())


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
    fill = PageFill(limit, max_bytes)
    start = 0 if after is None else bisect.bisect_right(agents, after, key=_name)
    taken: list[AgentRecord] = []
    for record in agents[start : start + limit]:
        if not fill.take(size(record)):
            break
        taken.append(record)
    more = start + len(taken) < len(agents)
    return AgentPage(taken, taken[-1].name if more else None)


def _name(record: AgentRecord) -> str:
    return record.name
