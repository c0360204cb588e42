"""How full a registry page is, without a server: the bound a page of the agent list and a
page of an agent's history share (at most ``limit`` items, and no more than ``max_bytes``
of manifests unless the first alone is more), and what an event's manifest weighs."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import Tenant
from broker.registry.events import RegistryEvent, RegistryEventType
from broker.registry.manifest import AgentManifest, AgentName, Capability
from broker.registry.pages import PageFill, manifest_bytes

pytestmark = pytest.mark.unit


def pages(sizes: list[int], *, limit: int | None, max_bytes: int | None) -> list[list[int]]:
    """``sizes`` cut into pages as a reader that goes on at the first item left out does."""
    cut: list[list[int]] = []
    rest = sizes
    while rest:
        fill = PageFill(limit, max_bytes)
        taken = 0
        while taken < len(rest) and fill.take(rest[taken]):
            taken += 1
        cut.append(rest[:taken])
        rest = rest[taken:]
    return cut


def test_a_page_stops_before_the_item_that_would_pass_the_byte_bound() -> None:
    """Five items of 190 fit in 1000, the sixth would not: it starts the next page."""
    assert pages([190] * 8, limit=100, max_bytes=1000) == [[190] * 5, [190] * 3]
    assert pages([400, 600, 1], limit=100, max_bytes=1000) == [[400, 600], [1]]


def test_a_page_stops_at_its_limit_whatever_the_items_weigh() -> None:
    assert pages([0] * 7, limit=3, max_bytes=1000) == [[0] * 3, [0] * 3, [0]]


def test_a_page_always_holds_its_first_item_however_large() -> None:
    """Else a reader could never get past an item larger than the bound."""
    assert pages([5000, 1, 5000], limit=100, max_bytes=1000) == [[5000], [1], [5000]]
    fill = PageFill(limit=1, max_bytes=0)
    assert fill.take(10)
    assert not fill.take(0)
    assert (fill.items, fill.total_bytes) == (1, 10)


def test_no_bound_given_is_no_bound() -> None:
    assert pages([10**9] * 4, limit=None, max_bytes=None) == [[10**9] * 4]
    assert pages([10**9] * 4, limit=3, max_bytes=None) == [[10**9] * 3, [10**9]]
    assert pages([600] * 4, limit=None, max_bytes=1000) == [[600]] * 4


def test_a_page_holds_at_least_one_item() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PageFill(limit=0, max_bytes=1000)


@given(
    st.lists(st.integers(0, 3000), max_size=40),
    st.integers(1, 8),
    st.integers(0, 5000),
)
def test_any_items_are_each_on_one_page_within_its_bounds(
    sizes: list[int], limit: int, max_bytes: int
) -> None:
    cut = pages(sizes, limit=limit, max_bytes=max_bytes)
    assert [size for page in cut for size in page] == sizes
    assert all(0 < len(page) <= limit for page in cut)
    assert all(len(page) == 1 or sum(page) <= max_bytes for page in cut)
    # and a page only stops short of its limit where the next item would not have fitted
    for page, following in itertools.pairwise(cut):
        assert len(page) == limit or sum(page) + following[0] > max_bytes


def event(kind: RegistryEventType, description: str = "Summarises.") -> RegistryEvent:
    manifest = AgentManifest(
        name="doc",
        version="1.0.0",
        description=description,
        capabilities=[Capability(action="summarize")],
    )
    carried = None if kind is RegistryEventType.DEREGISTERED else manifest
    return RegistryEvent(kind, Tenant("acme"), AgentName("doc"), carried, seq=3)


def test_an_event_weighs_its_manifest_as_json_and_a_deregistration_nothing() -> None:
    updated = event(RegistryEventType.UPDATED, "x" * 1900)
    assert updated.manifest is not None
    assert manifest_bytes(updated) == len(updated.manifest.model_dump_json().encode()) > 1900
    assert manifest_bytes(event(RegistryEventType.DEREGISTERED)) == 0
