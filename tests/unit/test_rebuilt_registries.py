"""The past registries kept for a list's next pages, without a server: bounded by count, by
estimated bytes and by time; dropped when the stream's history changes; never another
tenant's; one rebuild for requests at once."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import pytest

from broker.envelope import Tenant
from broker.registry.manifest import AgentManifest, AgentName
from broker.registry.snapshot import (
    AgentRecord,
    HistoryMark,
    Rebuilt,
    RebuiltRegistries,
    RegistrySnapshot,
    rebuilt_size,
)
from tests._wait import await_until

pytestmark = pytest.mark.unit
A, B = Tenant("acme"), Tenant("bolt")
NOW = HistoryMark(datetime(2026, 11, 28, tzinfo=UTC), 1, 0)
PURGED = HistoryMark(NOW.created, 40, 0)


def registry(tenant: Tenant, last_seq: int, size: int = 100) -> Rebuilt:
    agent = AgentManifest.model_validate(
        {
            "name": "a",
            "version": "1.0.0",
            "description": "Translates text.",
            "capabilities": [{"action": "translate"}],
        }
    )
    record = AgentRecord(tenant, AgentName("a"), agent, last_seq, last_seq, None)
    return Rebuilt(RegistrySnapshot({(tenant, "a"): record}, last_seq), size)


def kept(cache: RebuiltRegistries, tenant: Tenant, seq: int) -> bool:
    return cache.get(tenant, seq, NOW) is not None


def test_the_least_recently_used_leave_first_past_the_byte_budget() -> None:
    cache = RebuiltRegistries(max_bytes=250)
    cache.follow(NOW)
    for seq in (1, 2):
        cache.put(A, registry(A, seq), NOW)
    assert kept(cache, A, 1)  # used: 2 is now the least recently used
    cache.put(A, registry(A, 3), NOW)
    assert (kept(cache, A, 1), kept(cache, A, 2), kept(cache, A, 3)) == (True, False, True)
    assert cache.bytes == 200


def test_no_more_registries_than_entries() -> None:
    cache = RebuiltRegistries(entries=2)
    cache.follow(NOW)
    for seq in (1, 2, 3):
        cache.put(A, registry(A, seq, size=1), NOW)
    assert (len(cache), kept(cache, A, 1)) == (2, False)


def test_a_registry_larger_than_the_whole_budget_is_not_kept() -> None:
    cache = RebuiltRegistries(max_bytes=250)
    cache.follow(NOW)
    cache.put(A, registry(A, 1), NOW)
    cache.put(A, registry(A, 2, size=251), NOW)
    assert (kept(cache, A, 1), kept(cache, A, 2), cache.bytes) == (True, False, 100)


def test_a_registry_kept_under_the_seq_asked_for_counts_twice() -> None:
    cache = RebuiltRegistries()
    cache.follow(NOW)
    cache.put(A, registry(A, 5), NOW, asked=9)
    assert (kept(cache, A, 5), kept(cache, A, 9), cache.bytes) == (True, True, 200)


def test_one_tenant_never_finds_anothers_registry() -> None:
    cache = RebuiltRegistries()
    cache.follow(NOW)
    cache.put(A, registry(A, 5), NOW)
    assert (kept(cache, A, 5), kept(cache, B, 5)) == (True, False)


def test_another_history_drops_every_registry_and_refuses_those_of_the_old_one() -> None:
    cache = RebuiltRegistries()
    cache.follow(NOW)
    cache.put(A, registry(A, 5), NOW)
    assert cache.get(A, 5, PURGED) is None
    assert (len(cache), cache.bytes) == (0, 0)
    cache.put(A, registry(A, 6), NOW)  # rebuilt from the history before the purge
    assert cache.get(A, 6, PURGED) is None
    assert cache.get(A, 6, NOW) is None  # following the old history again drops, too


async def test_kept_registries_are_released_when_their_time_is_up_without_a_request() -> None:
    cache = RebuiltRegistries(seconds=0.05)
    cache.follow(NOW)
    cache.put(A, registry(A, 5), NOW)
    assert len(cache) == 1

    async def released() -> bool:
        return len(cache) == 0 and cache.bytes == 0

    assert await await_until(released, timeout=5, interval=0.01)


async def test_requests_at_once_share_one_rebuild() -> None:
    cache = RebuiltRegistries()
    gate, calls = asyncio.Event(), []

    async def rebuild() -> RegistrySnapshot:
        calls.append(1)
        await gate.wait()
        return registry(A, 5).snapshot

    pages = [asyncio.create_task(cache.once(A, 5, NOW, rebuild)) for _ in range(3)]
    other = asyncio.create_task(cache.once(B, 5, NOW, rebuild))
    later = asyncio.create_task(cache.once(A, 5, PURGED, rebuild))

    async def all_waiting() -> bool:
        return cache.waiting == 5

    assert await await_until(all_waiting, timeout=5, interval=0.01)
    gate.set()
    results = await asyncio.gather(*pages)
    assert all(r is results[0] for r in results)
    assert await other is not results[0]
    await later
    assert (len(calls), cache.waiting) == (3, 0)  # one per tenant and history


async def test_a_waiter_cancelled_alone_cancels_its_rebuild() -> None:
    cache = RebuiltRegistries()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def rebuild() -> RegistrySnapshot:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("never")

    page = asyncio.create_task(cache.once(A, 5, NOW, rebuild))
    await started.wait()
    page.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await page
    await asyncio.wait_for(cancelled.wait(), timeout=5)

    async def made() -> RegistrySnapshot:
        return registry(A, 5).snapshot

    assert (await cache.once(A, 5, NOW, made)).last_seq == 5


def test_the_estimate_counts_each_agent_and_its_stored_bytes() -> None:
    assert rebuilt_size([]) == 0
    assert rebuilt_size([100, 1000]) == 2 * 4096 + 4 * 1100
