"""Cooldown: an agent that failed too often recently gets no new work for a while.

Failures are ``RouteFailed`` events; every router process sees all of them (see
:mod:`broker.routing.router`), so routers agree on who is cooling down. The rule comes from
the policy: ``errors`` failures within ``window_s`` seconds put the agent in cooldown for
``duration_s`` seconds. A failure is counted once: the same attempt at the same message
stored twice (its agent crashed after storing the failure and before its ack, ran the
message again and failed again) is one failure, not two.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Hashable

#: Failure ids remembered per agent (for counting a failure stored twice once).
MAX_REMEMBERED = 4096


class Cooldowns:
    """Failure windows and cooldown deadlines per ``(tenant, agent)``, on a monotonic clock."""

    def __init__(self, errors: int, window_s: float, duration_s: float) -> None:
        self.errors = errors
        self.window_s = window_s
        self.duration_s = duration_s
        self._failures: dict[tuple[str, str], deque[float]] = {}
        #: Per agent, the failures counted within the window (id -> when), oldest first.
        self._seen: dict[tuple[str, str], OrderedDict[Hashable, float]] = {}
        self._until: dict[tuple[str, str], float] = {}
        self._cooling: dict[str, frozenset[str]] = {}
        self._next_expiry = float("inf")

    def configure(self, errors: int, window_s: float, duration_s: float) -> None:
        """New limits for failures from now on; windows and cooldowns running stay."""
        self.errors, self.window_s, self.duration_s = errors, window_s, duration_s

    def record_failure(
        self, tenant: str, agent: str, now: float | None = None, failure: Hashable = None
    ) -> bool:
        """Count a failure; whether it starts a cooldown. ``failure`` identifies it (e.g. the
        message's seq and the attempt): one seen within the window already is not counted
        again."""
        now = time.monotonic() if now is None else now
        key = (tenant, agent)
        if failure is not None and self._seen_before(key, failure, now):
            return False
        window = self._failures.setdefault(key, deque())
        window.append(now)
        while window and window[0] < now - self.window_s:
            window.popleft()
        if len(window) < self.errors:
            return False
        window.clear()
        until = now + self.duration_s
        self._until[key] = until
        self._next_expiry = min(self._next_expiry, until)
        self._cooling.pop(tenant, None)
        return True

    def _seen_before(self, key: tuple[str, str], failure: Hashable, now: float) -> bool:
        """Whether ``failure`` was counted within the window; remembers it if not. Ids older
        than the window are let go first (oldest first, so each is looked at once), and at
        most :data:`MAX_REMEMBERED` per agent are kept: an agent that stores failures by the
        thousand costs the routers memory and time in proportion to nothing else."""
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = OrderedDict()
        oldest = now - self.window_s
        while seen and next(iter(seen.values())) < oldest:
            seen.popitem(last=False)
        if failure in seen:
            return True
        seen[failure] = now
        if len(seen) > MAX_REMEMBERED:
            seen.popitem(last=False)
        return False

    def cooling(self, tenant: str, now: float | None = None) -> frozenset[str]:
        """The tenant's agents in cooldown now (the same object until it changes)."""
        now = time.monotonic() if now is None else now
        if now >= self._next_expiry:
            self._expire(now)
        cached = self._cooling.get(tenant)
        if cached is None:
            cached = frozenset(a for (t, a) in self._until if t == tenant)
            self._cooling[tenant] = cached
        return cached

    def _expire(self, now: float) -> None:
        expired = [key for key, until in self._until.items() if until <= now]
        for key in expired:
            del self._until[key]
            self._cooling.pop(key[0], None)
        self._next_expiry = min(self._until.values(), default=float("inf"))
