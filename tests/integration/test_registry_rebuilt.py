"""Registries rebuilt ``as_of`` a point are kept for the next pages of a list, against a
real server (each page rebuilt the tenant's registry from its whole history): requests for
one registry at once read its history once, a cancelled or failed rebuild leaves nothing
behind, and what is kept is what a rebuild would find now (a purged stream, or one made
again, is read again)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.envelope import Tenant
from broker.errors import Unavailable
from broker.publisher import Publisher
from broker.registry import commands
from broker.registry.commands import put_agent, registry_as_of
from broker.registry.manifest import AgentManifest
from broker.registry.snapshot import RebuiltRegistries, RegistrySnapshot
from broker.settings import Settings
from broker.streams import Stream, provision
from tests._wait import await_until

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


def names(snapshot: RegistrySnapshot, tenant: Tenant) -> list[tuple[str, str]]:
    return [(r.name, r.manifest.version) for r in snapshot.agents(tenant)]


def agent_names(snapshot: RegistrySnapshot, tenant: Tenant) -> list[str]:
    return [r.name for r in snapshot.agents(tenant)]


class Rebuilds:
    """Each read of a tenant's history, as (tenant, seq asked for); each waits for ``gate``
    when set, and the next ``failures`` of them fail as NATS going away would."""

    def __init__(self) -> None:
        self.seen: list[tuple[Tenant, int | None]] = []
        self.gate: asyncio.Event | None = None
        self.failures = 0
        self._rebuild = commands._rebuilt

    async def __call__(self, js: Any, tenant: Tenant, **kwargs: Any) -> Any:
        self.seen.append((tenant, kwargs["seq"]))
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise Unavailable("NATS went away")
        return await self._rebuild(js, tenant, **kwargs)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Rebuilds:
    rebuilds = Rebuilds()
    monkeypatch.setattr(commands, "_rebuilt", rebuilds)
    return rebuilds


def page_of_a(publisher: Publisher, seq: int, rebuilt: RebuiltRegistries) -> asyncio.Task[Any]:
    return asyncio.create_task(registry_as_of(publisher.js, A, seq=seq, rebuilt=rebuilt))


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def waiting(rebuilt: RebuiltRegistries, count: int) -> bool:
    async def reached() -> bool:
        return rebuilt.waiting == count

    return await await_until(reached, timeout=5)


async def test_the_next_pages_of_a_past_registry_are_read_once(
    publisher: Publisher, reads: Rebuilds
) -> None:
    await put_agent(publisher, A, manifest("a"))
    b = await put_agent(publisher, A, manifest("b"))
    await put_agent(publisher, A, manifest("a", "2.0.0"))
    rebuilt = RebuiltRegistries()
    first = await registry_as_of(publisher.js, A, seq=b.seq, rebuilt=rebuilt)
    assert first.last_seq == b.seq
    for _ in range(5):  # the next pages, as of the first page's seq
        assert await registry_as_of(publisher.js, A, seq=first.last_seq, rebuilt=rebuilt) is first
    assert reads.seen == [(A, b.seq)]
    assert names(first, A) == [("a", "1.0.0"), ("b", "1.0.0")]


async def test_a_registry_asked_for_by_time_is_kept_under_the_seq_it_runs_through(
    publisher: Publisher, reads: Rebuilds
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
    assert reads.seen == [(A, None)]


async def test_what_is_appended_later_changes_no_kept_registry(
    publisher: Publisher, reads: Rebuilds
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
    assert reads.seen == [(A, future), (A, future)]
    assert await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt) is before
    assert names(before, A) == [("a", "1.0.0")]


async def test_one_tenants_registry_is_never_anothers(
    publisher: Publisher, reads: Rebuilds
) -> None:
    a = await put_agent(publisher, A, manifest("a"))
    rebuilt = RebuiltRegistries()
    mine = await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt)
    theirs = await registry_as_of(publisher.js, B, seq=a.seq, rebuilt=rebuilt)
    assert theirs is not mine
    assert names(theirs, B) == []
    assert reads.seen == [(A, a.seq), (B, a.seq)]
    # an empty registry is kept too (under the seq it runs through: none of B's, 0)
    assert await registry_as_of(publisher.js, B, seq=theirs.last_seq, rebuilt=rebuilt) is theirs
    assert reads.seen == [(A, a.seq), (B, a.seq)]


async def test_registries_are_kept_a_while_and_a_few_at_most(
    publisher: Publisher, reads: Rebuilds
) -> None:
    seqs = [(await put_agent(publisher, A, manifest(f"n{i}"))).seq for i in range(3)]
    two = RebuiltRegistries(entries=2)
    for seq in seqs:
        await registry_as_of(publisher.js, A, seq=seq, rebuilt=two)
    await registry_as_of(publisher.js, A, seq=seqs[2], rebuilt=two)  # kept
    await registry_as_of(publisher.js, A, seq=seqs[1], rebuilt=two)  # kept
    await registry_as_of(publisher.js, A, seq=seqs[0], rebuilt=two)  # the oldest: gone
    assert reads.seen == [(A, seq) for seq in seqs] + [(A, seqs[0])]
    reads.seen.clear()
    expired = RebuiltRegistries(seconds=0)
    for _ in range(2):
        await registry_as_of(publisher.js, A, seq=seqs[0], rebuilt=expired)
    assert reads.seen == [(A, seqs[0])] * 2


async def test_pages_asked_for_at_once_read_the_history_once(
    publisher: Publisher, reads: Rebuilds
) -> None:
    await put_agent(publisher, A, manifest("a"))
    b = await put_agent(publisher, A, manifest("b"))
    rebuilt = RebuiltRegistries()
    pages = await asyncio.gather(
        *(registry_as_of(publisher.js, A, seq=b.seq, rebuilt=rebuilt) for _ in range(5))
    )
    assert reads.seen == [(A, b.seq)]
    assert all(page is pages[0] for page in pages)
    assert agent_names(pages[0], A) == ["a", "b"]


async def test_tenants_asked_for_at_once_each_read_their_own(
    publisher: Publisher, reads: Rebuilds
) -> None:
    await put_agent(publisher, A, manifest("a"))
    x = await put_agent(publisher, B, manifest("x"))
    rebuilt = RebuiltRegistries()
    mine, theirs = await asyncio.gather(
        registry_as_of(publisher.js, A, seq=x.seq, rebuilt=rebuilt),
        registry_as_of(publisher.js, B, seq=x.seq, rebuilt=rebuilt),
    )
    assert sorted(reads.seen) == [(A, x.seq), (B, x.seq)]
    assert (agent_names(mine, A), agent_names(mine, B)) == (["a"], [])
    assert (agent_names(theirs, A), agent_names(theirs, B)) == ([], ["x"])


async def test_a_past_seq_asked_for_again_is_not_read_again(
    publisher: Publisher, reads: Rebuilds
) -> None:
    """Kept under the seq asked for too, not only the tenant's last seq up to it."""
    a = await put_agent(publisher, A, manifest("a"))
    x = await put_agent(publisher, B, manifest("x"))  # another tenant's: A's last is a.seq
    rebuilt = RebuiltRegistries()
    first = await registry_as_of(publisher.js, A, seq=x.seq, rebuilt=rebuilt)
    assert first.last_seq == a.seq
    assert await registry_as_of(publisher.js, A, seq=x.seq, rebuilt=rebuilt) is first
    assert await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt) is first
    assert reads.seen == [(A, x.seq)]


async def test_a_cancelled_page_leaves_the_rebuild_to_the_others(
    publisher: Publisher, reads: Rebuilds
) -> None:
    a = await put_agent(publisher, A, manifest("a"))
    rebuilt = RebuiltRegistries()
    reads.gate = asyncio.Event()
    first = page_of_a(publisher, a.seq, rebuilt)
    second = page_of_a(publisher, a.seq, rebuilt)
    assert await waiting(rebuilt, 2)
    await cancel(first)
    reads.gate.set()
    page = await second
    assert agent_names(page, A) == ["a"]
    assert await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt) is page
    assert reads.seen == [(A, a.seq)]


async def test_a_rebuild_no_one_waits_for_is_dropped_and_the_next_page_reads_again(
    publisher: Publisher, reads: Rebuilds
) -> None:
    a = await put_agent(publisher, A, manifest("a"))
    rebuilt = RebuiltRegistries()
    reads.gate = asyncio.Event()
    only = page_of_a(publisher, a.seq, rebuilt)
    assert await waiting(rebuilt, 1)
    await cancel(only)
    assert (rebuilt.waiting, len(rebuilt)) == (0, 0)
    reads.gate.set()
    page = await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt)
    assert agent_names(page, A) == ["a"]
    assert reads.seen == [(A, a.seq), (A, a.seq)]


async def test_a_failed_rebuild_fails_its_waiters_and_is_not_kept(
    publisher: Publisher, reads: Rebuilds
) -> None:
    a = await put_agent(publisher, A, manifest("a"))
    rebuilt = RebuiltRegistries()
    reads.gate, reads.failures = asyncio.Event(), 1
    pages = [page_of_a(publisher, a.seq, rebuilt) for _ in range(2)]
    assert await waiting(rebuilt, 2)
    reads.gate.set()
    outcomes = await asyncio.gather(*pages, return_exceptions=True)
    assert [type(o) for o in outcomes] == [Unavailable, Unavailable]
    assert len(rebuilt) == 0
    page = await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt)
    assert agent_names(page, A) == ["a"]
    assert await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=rebuilt) is page
    assert reads.seen == [(A, a.seq), (A, a.seq)]


async def test_a_purged_stream_is_read_again(publisher: Publisher, reads: Rebuilds) -> None:
    """What a purge took out is gone from a rebuild, so from what is kept too."""
    await put_agent(publisher, A, manifest("a"))
    b = await put_agent(publisher, A, manifest("b"))
    rebuilt = RebuiltRegistries()
    before = await registry_as_of(publisher.js, A, seq=b.seq, rebuilt=rebuilt)
    assert agent_names(before, A) == ["a", "b"]
    await publisher.js.purge_stream(Stream.REGISTRY)
    after = await registry_as_of(publisher.js, A, seq=b.seq, rebuilt=rebuilt)
    assert agent_names(after, A) == []
    assert reads.seen == [(A, b.seq), (A, b.seq)]


async def test_a_stream_made_again_is_read_again(publisher: Publisher, reads: Rebuilds) -> None:
    """A stream deleted and made again numbers its messages from 1 again: the same seq is
    another registry."""
    await put_agent(publisher, A, manifest("a"))
    b = await put_agent(publisher, A, manifest("b"))
    rebuilt = RebuiltRegistries()
    assert agent_names(await registry_as_of(publisher.js, A, seq=b.seq, rebuilt=rebuilt), A) == [
        "a",
        "b",
    ]
    await publisher.js.delete_stream(Stream.REGISTRY)
    await provision(publisher.js, Settings())
    await put_agent(publisher, A, manifest("x"))
    y = await put_agent(publisher, A, manifest("y"))
    assert y.seq == b.seq
    again = await registry_as_of(publisher.js, A, seq=b.seq, rebuilt=rebuilt)
    assert agent_names(again, A) == ["x", "y"]
    assert reads.seen == [(A, b.seq), (A, b.seq)]


async def test_a_registry_over_the_byte_budget_is_not_kept(
    publisher: Publisher, reads: Rebuilds
) -> None:
    a = await put_agent(publisher, A, manifest("a"))
    small = RebuiltRegistries(max_bytes=1)
    for _ in range(2):
        await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=small)
    assert (len(small), small.bytes) == (0, 0)
    assert reads.seen == [(A, a.seq)] * 2
    roomy = RebuiltRegistries()
    await registry_as_of(publisher.js, A, seq=a.seq, rebuilt=roomy)
    assert len(roomy) == 1
    assert 4096 < roomy.bytes < 16 * 1024  # one small manifest, its record and overhead
