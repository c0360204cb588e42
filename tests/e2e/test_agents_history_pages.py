"""``GET /v1/agents/{name}/history`` a page at a time over real HTTP/2, bounded in bytes as
the agent list is, and the client and the CLI reading every event across such pages.

A page held up to 100 events whatever their manifests weighed (256 KiB each: about 25 MiB).
It now also stops before the event whose manifest would take it past 1 MiB, so a page can
hold fewer than ``limit`` events and still not be the last; readers go on at
``next_from_seq`` (the first event left out) until it is null."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.client import BrokerClient, SyncBrokerClient
from tests.e2e._broker import BrokerProcess
from tests.e2e.test_agents import manifest

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def heavy(name: str, version: str) -> dict[str, object]:
    """A manifest of about 190 KB as JSON: five fit in one page's 1 MiB, six do not."""
    schema = {"type": "string", "description": "x" * 190_000}
    return manifest(name, version, capabilities=[{"action": "summarize", "input_schema": schema}])


@dataclass(frozen=True)
class HeavyHistory:
    """An agent registered, updated six times and deregistered, with the seqs of its events."""

    name: str
    seqs: list[int]

    @property
    def path(self) -> str:
        return f"/v1/agents/{self.name}/history"


@pytest.fixture(scope="module")
def heavy_history(broker: BrokerProcess) -> HeavyHistory:
    """Eight events, seven of them with a manifest of about 190 KB: more than 1 MiB."""
    name = f"hp{uuid.uuid4().hex[:8]}"
    seqs: list[int] = []
    with httpx.Client(base_url=broker.base_url, timeout=15) as http:
        for n in range(7):
            answer = http.put(f"/v1/agents/{name}", json=heavy(name, f"1.{n}.0"))
            assert answer.status_code in (200, 201), answer.text
            seqs.append(answer.json()["seq"])
        gone = http.delete(f"/v1/agents/{name}")
        assert gone.status_code == 200, gone.text
        seqs.append(gone.json()["seq"])
    return HeavyHistory(name, seqs)


async def read_pages(client: httpx.AsyncClient, path: str, **params: str) -> list[dict[str, Any]]:
    """Every page from ``params``, going on at ``next_from_seq`` to the end."""
    pages: list[dict[str, Any]] = []
    while True:
        answer = await client.get(path, params=params)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        after = answer.json()["next_from_seq"]
        if after is None:
            return pages
        assert after > answer.json()["events"][-1]["seq"]
        params = {**params, "from_seq": str(after)}


def manifest_sizes(page: dict[str, Any]) -> list[int]:
    """Each event's manifest as JSON, in bytes (a deregistration's none: 0)."""
    return [len(orjson.dumps(e["manifest"])) if e["manifest"] else 0 for e in page["events"]]


async def test_a_history_page_stops_at_a_mebibyte_of_manifests(
    client: httpx.AsyncClient, heavy_history: HeavyHistory
) -> None:
    """Five manifests of about 190 KB are the first page though ``limit`` is 100; the sixth
    event starts the next page, which ``next_from_seq`` names; each event comes once."""
    seqs = heavy_history.seqs
    pages = await read_pages(client, heavy_history.path)
    assert [[e["seq"] for e in page["events"]] for page in pages] == [seqs[:5], seqs[5:]]
    assert pages[0]["next_from_seq"] == seqs[5]
    for page in pages:
        sizes = manifest_sizes(page)
        assert len(sizes) == 1 or sum(sizes) <= MIB, sizes
    events = [e for page in pages for e in page["events"]]
    assert [e["manifest"]["version"] for e in events[:-1]] == [f"1.{n}.0" for n in range(7)]
    assert (events[-1]["type"], events[-1]["manifest"]) == ("AgentDeregistered", None)


async def test_any_limit_and_start_read_each_event_once_within_a_mebibyte(
    client: httpx.AsyncClient, heavy_history: HeavyHistory
) -> None:
    """However the history is asked for, each event is on one page, in order, a page never
    holds more than ``limit`` events nor more than 1 MiB of manifests, and never none."""
    seqs = heavy_history.seqs
    for limit in ("1", "2", "3", "6", "100"):
        for start in (seqs[0], seqs[2], seqs[5]):
            pages = await read_pages(client, heavy_history.path, limit=limit, from_seq=str(start))
            read = [e["seq"] for page in pages for e in page["events"]]
            assert read == [s for s in seqs if s >= start], (limit, start)
            for page in pages:
                assert 0 < len(page["events"]) <= int(limit), (limit, start)
                assert sum(manifest_sizes(page)) <= MIB, (limit, start)


@dataclass
class Pages:
    """The history pages a reader asked for, as the ``from_seq`` of each."""

    starts: list[str]


@pytest.fixture
def pages_asked(monkeypatch: pytest.MonkeyPatch, heavy_history: HeavyHistory) -> Pages:
    """Records each history page the client or the CLI asks for (both send with httpx)."""
    asked = Pages([])
    send = httpx.AsyncClient.send
    send_sync = httpx.Client.send

    def note(request: httpx.Request) -> None:
        if request.url.path == heavy_history.path:
            asked.starts.append(request.url.params.get("from_seq", "1"))

    async def noting(self: httpx.AsyncClient, request: httpx.Request, **kw: Any) -> Any:
        note(request)
        return await send(self, request, **kw)

    def noting_sync(self: httpx.Client, request: httpx.Request, **kw: Any) -> Any:
        note(request)
        return send_sync(self, request, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "send", noting)
    monkeypatch.setattr(httpx.Client, "send", noting_sync)
    return asked


async def test_the_client_reads_every_event_of_a_history_paged_by_bytes(
    broker: BrokerProcess, heavy_history: HeavyHistory, pages_asked: Pages
) -> None:
    """A page of fewer than ``limit`` events is not the last: ``agent_history`` goes on at
    its ``next_from_seq``, and returns each event once, oldest first."""
    async with BrokerClient(broker.base_url) as client:
        history = await client.agent_history(heavy_history.name)
    assert [e["seq"] for e in history] == heavy_history.seqs
    assert pages_asked.starts == ["1", str(heavy_history.seqs[5])]


def test_the_sync_client_reads_every_event_of_a_history_paged_by_bytes(
    broker: BrokerProcess, heavy_history: HeavyHistory, pages_asked: Pages
) -> None:
    with SyncBrokerClient(broker.base_url) as client:
        history = client.agent_history(heavy_history.name)
    assert [e["seq"] for e in history] == heavy_history.seqs
    assert pages_asked.starts == ["1", str(heavy_history.seqs[5])]


def test_the_cli_reads_every_event_of_a_history_paged_by_bytes(
    broker: BrokerProcess, heavy_history: HeavyHistory, pages_asked: Pages
) -> None:
    """``broker agents history`` prints each event once, as json or as a table."""
    args = ["agents", "history", heavy_history.name, "--url", broker.base_url]
    done = CliRunner().invoke(app, [*args, "-o", "json"])
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    assert document["name"] == heavy_history.name
    assert [e["seq"] for e in document["events"]] == heavy_history.seqs
    assert pages_asked.starts == ["1", str(heavy_history.seqs[5])]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert [int(line.split()[0]) for line in table.stdout.splitlines()] == heavy_history.seqs
    assert pages_asked.starts == ["1", str(heavy_history.seqs[5])] * 2
