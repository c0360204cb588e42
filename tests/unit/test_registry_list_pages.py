"""The agent list a page at a time, without a server: which agents a page of
``GET /v1/agents`` holds, where the next one follows on, and how a reader follows it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.client import next_after
from broker.envelope import Tenant
from broker.registry.manifest import AgentManifest, AgentName, Capability
from broker.registry.pages import AgentPage, agent_page, manifest_bytes
from broker.registry.snapshot import AgentRecord, RegistrySnapshot

pytestmark = pytest.mark.unit

#: Agent names in the order the broker sorts them: code points, so "-" < digits < capitals
#: < "_" < lower case.
NAMES = ["-x", "0a", "9", "A", "Zed", "_u", "a", "a-b", "a_b", "ab", "b"]


def record(name: str, description: str = "Summarises.") -> AgentRecord:
    manifest = AgentManifest(
        name=name,
        version="1.0.0",
        description=description,
        capabilities=[Capability(action="summarize")],
    )
    return AgentRecord(Tenant("acme"), AgentName(name), manifest, 1, 1, None)


def read_all(
    agents: list[AgentRecord], limit: int, max_bytes: int = 1 << 20, size: int = 1
) -> list[list[str]]:
    """Every page, as the names each holds, following ``next_after`` as a client does."""
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        page = agent_page(
            agents, after=after, limit=limit, max_bytes=max_bytes, size=lambda _: size
        )
        pages.append([r.name for r in page.agents])
        if page.next_after is None:
            return pages
        assert page.next_after == page.agents[-1].name
        after = page.next_after


def test_the_broker_sorts_names_as_these_tests_expect() -> None:
    assert sorted(NAMES) == NAMES


def test_a_snapshot_lists_a_tenants_agents_by_name_and_sorts_them_once() -> None:
    """Every page of a list reads the whole sorted list: a snapshot never changes, so it
    sorts a tenant's agents at the first page only."""
    theirs = replace(record("b0"), tenant=Tenant("bolt"))
    mine = [record(n) for n in reversed(NAMES)]
    snapshot = RegistrySnapshot({(r.tenant, r.name): r for r in [*mine, theirs]}, 12)
    listed = snapshot.agents(Tenant("acme"))
    assert [r.name for r in listed] == NAMES
    assert snapshot.agents(Tenant("acme")) is listed
    assert snapshot.agents(Tenant("bolt")) == (theirs,)
    assert snapshot.agents(Tenant("cold")) == ()
    assert snapshot.past(13).agents(Tenant("acme")) == listed


def test_pages_hold_every_agent_once_in_name_order() -> None:
    """The whole list was one answer; it comes in pages of ``limit`` now, the last one
    saying so (``next_after`` null), which together hold each agent exactly once."""
    agents = [record(n) for n in NAMES]
    assert read_all(agents, limit=4) == [NAMES[0:4], NAMES[4:8], NAMES[8:]]
    assert read_all(agents, limit=100) == [NAMES]
    assert read_all(agents, limit=11) == [NAMES]  # a full last page is still the last


@given(st.sets(st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True), max_size=30))
def test_any_names_and_any_limit_read_each_agent_once(names: set[str]) -> None:
    agents = [record(n) for n in sorted(names)]
    for limit in (1, 2, 7):
        pages = read_all(agents, limit=limit)
        assert [n for page in pages for n in page] == sorted(names)
        assert all(0 < len(page) <= limit for page in pages if names)


def test_a_cursor_that_names_no_agent_starts_after_where_it_would_be() -> None:
    """The name read last may be deregistered before the next page is asked for."""
    agents = [record(n) for n in NAMES]
    page = agent_page(agents, after="Y", limit=3, max_bytes=1 << 20)
    assert [r.name for r in page.agents] == ["Zed", "_u", "a"]
    assert page.next_after == "a"
    assert agent_page(agents, after="zzz", limit=3, max_bytes=1 << 20) == AgentPage([], None)
    assert agent_page([], after=None, limit=3, max_bytes=1 << 20) == AgentPage([], None)


def test_an_agent_registered_between_pages_past_the_cursor_is_on_a_later_page() -> None:
    """Why the cursor is the last name read, not the next one to read: a name registered
    meanwhile between the two would otherwise be stepped over."""
    first = agent_page([record("a"), record("c")], after=None, limit=1, max_bytes=1 << 20)
    assert first.next_after == "a"
    rest = agent_page(
        [record("a"), record("b"), record("c")], after=first.next_after, limit=5, max_bytes=1 << 20
    )
    assert [r.name for r in rest.agents] == ["b", "c"]


def test_a_page_stops_before_the_manifest_that_would_pass_the_byte_bound() -> None:
    """100 manifests of 256 KiB made a 25 MiB answer: a page also stops at ``max_bytes``,
    holding fewer than ``limit`` agents while more follow, and never none."""
    agents = [record(n) for n in NAMES]
    assert read_all(agents, limit=100, max_bytes=30, size=10) == [
        NAMES[0:3],
        NAMES[3:6],
        NAMES[6:9],
        NAMES[9:],
    ]
    # one manifest past the bound alone is still a page, or the reader could not go on
    assert read_all(agents[:3], limit=100, max_bytes=5, size=10) == [[n] for n in NAMES[:3]]


def test_the_byte_bound_counts_each_manifest_as_json() -> None:
    small, large = record("small"), record("large", "x" * 1900)
    assert manifest_bytes(large) == len(large.manifest.model_dump_json().encode())
    assert manifest_bytes(large) > 1900 > manifest_bytes(small)
    page = agent_page([large, small], after=None, limit=10, max_bytes=manifest_bytes(large))
    assert (page.agents, page.next_after) == ([large], "large")


def test_a_page_holds_at_least_one_agent() -> None:
    with pytest.raises(ValueError, match="at least one"):
        agent_page([record("a")], after=None, limit=0, max_bytes=1 << 20)


@pytest.mark.parametrize(
    ("document", "after", "expected"),
    [
        ({"next_after": "b"}, None, "b"),
        ({"next_after": "b"}, "a", "b"),
        ({"next_after": None}, "a", None),
        ({}, None, None),  # a broker from before pages: its one answer is the whole list
        ({"next_after": "a"}, "a", None),  # not past the page before: it would never end
        ({"next_after": "A"}, "a", None),
        ({"next_after": 7}, None, None),
    ],
)
def test_a_reader_follows_next_after_only_forward(
    document: dict[str, object], after: str | None, expected: str | None
) -> None:
    assert next_after(document, after) == expected
