"""An agent's history read a page at a time against a real server, bounded in bytes as the
agent list is: a page holds at most ``limit`` events and stops before the event whose
manifest would take it past ``max_bytes`` (always holding one), and the ``from_seq`` it
answers for the next page is the first event it left out."""

from __future__ import annotations

import pytest

from broker.envelope import Tenant
from broker.publisher import Publisher
from broker.registry.commands import agent_history, delete_agent, put_agent
from broker.registry.events import RegistryEvent
from broker.registry.manifest import AgentManifest
from broker.registry.pages import manifest_bytes

pytestmark = pytest.mark.integration
T = Tenant("acme")
MIB = 1024 * 1024


def heavy(name: str, version: str) -> AgentManifest:
    """A manifest of about 190 KB as JSON: five fit in 1 MiB, six do not."""
    schema = {"type": "string", "description": "x" * 190_000}
    return AgentManifest.model_validate(
        {
            "name": name,
            "version": version,
            "description": "Summarises long documents.",
            "capabilities": [{"action": "summarize", "input_schema": schema}],
        }
    )


async def heavy_history(publisher: Publisher, name: str) -> list[int]:
    """Registered, updated six times, deregistered: the seqs of its eight events."""
    seqs = [(await put_agent(publisher, T, heavy(name, f"1.{n}.0"))).seq for n in range(7)]
    seqs.append((await delete_agent(publisher, T, name)).seq)
    return seqs


async def read_pages(
    publisher: Publisher, name: str, *, limit: int, max_bytes: int
) -> list[list[RegistryEvent]]:
    """Every page from the first, going on at each page's ``from_seq`` for the next."""
    pages: list[list[RegistryEvent]] = []
    start: int | None = 1
    while start is not None:
        events, after = await agent_history(
            publisher.js, T, name, from_seq=start, limit=limit, max_bytes=max_bytes
        )
        pages.append(events)
        if after is not None:
            assert events, "a page that leads on holds an event"
            assert after > events[-1].seq
        start = after
    return pages


async def test_a_history_page_stops_before_the_manifest_that_would_pass_a_mebibyte(
    publisher: Publisher,
) -> None:
    """100 manifests of 256 KiB made a 25 MiB page: five of about 190 KB are a page now,
    the sixth starts the next one, and every event is read once, in order."""
    seqs = await heavy_history(publisher, "big")
    await put_agent(publisher, T, heavy("other", "1.0.0"))  # another agent's: skipped
    pages = await read_pages(publisher, "big", limit=100, max_bytes=MIB)
    assert [[e.seq for e in page] for page in pages] == [seqs[:5], seqs[5:]]
    for page in pages:
        assert sum(manifest_bytes(e) for e in page) <= MIB
    assert pages[-1][-1].manifest is None  # the deregistration, which weighs nothing
    first, after = await agent_history(publisher.js, T, "big", limit=100, max_bytes=MIB)
    assert (len(first), after) == (5, seqs[5])


async def test_a_history_page_always_holds_one_event_however_large(
    publisher: Publisher,
) -> None:
    """An event whose manifest alone passes the bound is still a page, or a reader could
    never get past it."""
    seqs = await heavy_history(publisher, "huge")
    pages = await read_pages(publisher, "huge", limit=100, max_bytes=1)
    assert [[e.seq for e in page] for page in pages] == [[seq] for seq in seqs]
    # the deregistration weighs nothing, so it shares a page with the update before it
    together = await read_pages(publisher, "huge", limit=100, max_bytes=manifest_bytes(pages[0][0]))
    assert [[e.seq for e in page] for page in together] == [[s] for s in seqs[:6]] + [seqs[6:]]


async def test_the_count_and_the_byte_bound_together_read_each_event_once(
    publisher: Publisher,
) -> None:
    seqs = await heavy_history(publisher, "mixed")
    for limit in (1, 2, 3, 7, 100):
        pages = await read_pages(publisher, "mixed", limit=limit, max_bytes=MIB)
        assert [e.seq for page in pages for e in page] == seqs, limit
        assert all(0 < len(page) <= min(limit, 5) for page in pages), limit
