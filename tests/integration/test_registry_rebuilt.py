"""Registries rebuilt ``as_of`` a point are kept for the next pages of a list, against a
real server: each page rebuilt the tenant's registry from its whole history."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.envelope import Tenant
from broker.publisher import Publisher
from broker.registry import commands
from broker.registry.commands import RebuiltRegistries, put_agent, registry_as_of
from broker.registry.manifest import AgentManifest
from broker.registry.snapshot import RegistrySnapshot

pytestmark = pytest.mark.integration
A, B = Tenant("acme"), Tenant("bolt")


def manifest(name: str, version: str = "1.0.0") -> AgentManifest:
    return AgentManifest.model_validate(
        {
            "name": name,
            "version": version,
            "description": "Translates text.",
            "capabilities": [{"action": "translate", "content_types": ["text/plain"]}],
        }
    )


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Tenant, int | None]]:
    """Each rebuild from the stream, as (tenant, seq asked for)."""
    seen: list[tuple[Tenant, int | None]] = []
    rebuild = commands._rebuilt

    async def counted(js: Any, tenant: Tenant, **kwargs: Any) -> RegistrySnapshot:
        seen.append((tenant, kwargs["seq"]))
        return await rebuild(js, tenant, **kwargs)

    monkeypatch.setattr(commands, "_rebuilt", counted)
    return seen


def names(snapshot: RegistrySnapshot, tenant: Tenant) -> list[tuple[str, str]]:
    return [(r.name, r.manifest.version) for r in snapshot.agents(tenant)]


async def test_the_next_pages_of_a_past_registry_are_read_once(
    publisher: Publisher, reads: list[tuple[Tenant, int | None]]
) -> None:
    await put_agent(publisher, A, manifest("a"))
    b = await put_agent(publisher, A, manifest("b"))
    await put_agent(publisher, A, manifest("a", "2.0.0"))
    rebuilt = RebuiltRegistries()
    first = await registry_as_of(publisher.js, A, seq=b.seq, rebuilt=rebuilt)
    assert first.last_seq == b.seq
    for _ in range(5):  # the next pages, as of the first page's seq
        assert await registry_as_of(publisher.js, A, seq=first.last_seq, rebuilt=rebuilt) is first
    assert reads == [(A, b.seq)]
    assert names(first, A) == [("a", "1.0.0"), ("b", "1.0.0")]


async def test_a_registry_asked_for_by_time_is_kept_under_the_seq_it_runs_through(
    publisher: Publisher, reads: list[tuple[Tenant, int | None]]
) -> None:
    await put_agent(publisher, A, manifest("a"))
    await asyncio.sleep(0.01)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await put_agent(publisher, A, manifest("a", "2.0.0"))
    rebuilt = RebuiltRegistries()
    by_time = await registry_as_of(publisher.js, A, time=moment, rebuilt=rebuilt)
    pinned = await registry_as_of(publisher.js, A, seq=by_time.last_seq, rebuilt=rebuilt)
    assert pinned is by_time
    assert names(pinned, A) == [("a", "1.0.0")]
    assert reads == [(A, None)]


async def test_what_is_appended_later_changes_no_kept_registry(
    publisher: Publisher, reads: list[tuple[Tenant, int | None]]
) -> None:
    """A point still to come (a seq past the stream's end) is rebuilt each time, and kept
    under the seq it ran through, which later changes do not reach."""
    a = await put_agent(publisher, A, manifest("a"))
    rebuilt = RebuiltRegistries()
    future = a.seq + 1000
    before = await registry_as_of(publisher.js, A, seq=future, rebuilt=rebuilt)
    assert before.last_seq == a.seq
    await put_agent(publisher, A, manifest("c"))
    after = await registry_as_of(publisher.js, A, seq=future, rebuilt=rebuilt)
    assert names(after, A) == [("a", "1.0.0"), ("c", "1.0.0")]
    assert reads == [(A, future), (A, future)]
    assert await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt) is before
    assert names(before, A) == [("a", "1.0.0")]


async def test_one_tenants_registry_is_never_anothers(
    publisher: Publisher, reads: list[tuple[Tenant, int | None]]
) -> None:
    a = await put_agent(publisher, A, manifest("a"))
    rebuilt = RebuiltRegistries()
    mine = await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt)
    theirs = await registry_as_of(publisher.js, B, seq=a.seq, rebuilt=rebuilt)
    assert theirs is not mine
    assert names(theirs, B) == []
    assert reads == [(A, a.seq), (B, a.seq)]
    # an empty registry is kept too (under the seq it runs through: none of B's, 0)
    assert await registry_as_of(publisher.js, B, seq=theirs.last_seq, rebuilt=rebuilt) is theirs
    assert reads == [(A, a.seq), (B, a.seq)]


async def test_registries_are_kept_a_while_and_a_few_at_most(
    publisher: Publisher, reads: list[tuple[Tenant, int | None]]
) -> None:
    seqs = [(await put_agent(publisher, A, manifest(f"n{i}"))).seq for i in range(3)]
    two = RebuiltRegistries(entries=2)
    for seq in seqs:
        await registry_as_of(publisher.js, A, seq=seq, rebuilt=two)
    await registry_as_of(publisher.js, A, seq=seqs[2], rebuilt=two)  # kept
    await registry_as_of(publisher.js, A, seq=seqs[1], rebuilt=two)  # kept
    await registry_as_of(publisher.js, A, seq=seqs[0], rebuilt=two)  # the oldest: gone
    assert reads == [(A, seq) for seq in seqs] + [(A, seqs[0])]
    reads.clear()
    expired = RebuiltRegistries(seconds=0)
    for _ in range(2):
        await registry_as_of(publisher.js, A, seq=seqs[0], rebuilt=expired)
    assert reads == [(A, seqs[0])] * 2
