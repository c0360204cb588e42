"""``GET /v1/agents`` a page at a time over real HTTP/2: the pages, their bounds, ``as_of``
across pages, and the client and the CLI reading every page.

The list was one answer holding every agent's manifest (up to 256 KiB each), however many
agents the tenant had. The tests share their module's broker, so each registers agents
under its own prefix and reads from just before it (``?after=<prefix>``: no agent name is
a proper prefix of the ones it registers) or filters by it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.client import BrokerClient, SyncBrokerClient
from tests.e2e._broker import BrokerProcess
from tests.e2e.test_agents import manifest, put

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def prefix() -> str:
    return f"lp{uuid.uuid4().hex[:8]}"


def heavy(name: str) -> dict[str, object]:
    """A manifest of about 190 KB as JSON: five fit in one page's 1 MiB, six do not."""
    schema = {"type": "string", "description": "x" * 190_000}
    return manifest(name, capabilities=[{"action": "summarize", "input_schema": schema}])


async def read_pages(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    """Every page from ``params``, following ``next_after`` to the end."""
    pages: list[dict[str, Any]] = []
    while True:
        answer = await client.get("/v1/agents", params=params)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        after = answer.json()["next_after"]
        if after is None:
            return pages
        assert after == answer.json()["agents"][-1]["name"]
        params = {**params, "after": after}


def names(pages: list[dict[str, Any]], start: str = "") -> list[str]:
    return [a["name"] for page in pages for a in page["agents"] if a["name"].startswith(start)]


async def test_pages_hold_every_agent_once_in_name_order(client: httpx.AsyncClient) -> None:
    """23 agents registered in no order come back by name, five a page, none twice, and
    the pages of any size hold the same list."""
    p = prefix()
    mine = [f"{p}-{n:02d}" for n in range(18)] + [f"{p}{s}" for s in ("-A", "-_", "-a-b", "_", "Z")]
    for name in random.Random(7).sample(mine, len(mine)):
        assert (await put(client, manifest(name))).status_code == 201
    pages = await read_pages(client, limit="5")
    listed = names(pages)
    assert listed == sorted(set(listed)), listed
    assert names(pages, p) == sorted(mine)
    assert len(pages) >= 5
    assert all(0 < len(page["agents"]) <= 5 for page in pages)
    assert names(await read_pages(client)) == listed
    assert names(await read_pages(client, limit="2", after=p), p) == sorted(mine)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"after": ""},
        {"after": "a" * 1025},
    ],
)
async def test_a_limit_out_of_bounds_or_a_cursor_that_is_no_name_is_422(
    client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    answer = await client.get("/v1/agents", params=params)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error_code"] == "unprocessable"
    assert next(iter(params)) in body["message"]


@pytest.mark.parametrize("after", ["../status", "a b", "\u00e9", "a~b", "a" * 65])
async def test_a_cursor_outside_the_name_pattern_is_compared_as_text(
    client: httpx.AsyncClient, after: str
) -> None:
    """A name stored outside today's pattern (an older release's, a raw NATS writer's) can be
    a page's last: the next page's cursor must not be refused, or paging stops there."""
    answer = await client.get("/v1/agents", params={"after": after, "limit": "1"})
    assert answer.status_code == 200, answer.text
    assert all(a["name"] > after for a in answer.json()["agents"])


async def test_a_cursor_that_names_no_agent_goes_on_after_where_it_would_be(
    client: httpx.AsyncClient,
) -> None:
    """The name read last may be deregistered before the next page is asked for."""
    p = prefix()
    for name in (f"{p}-a", f"{p}-c"):
        await put(client, manifest(name))
    page = (await client.get("/v1/agents", params={"after": f"{p}-b", "limit": "1"})).json()
    assert [a["name"] for a in page["agents"]] == [f"{p}-c"]
    past = (await client.get("/v1/agents", params={"after": "z" * 64})).json()
    assert (past["agents"], past["next_after"]) == ([], None)
    assert (await client.get("/v1/agents", params={"limit": "100"})).status_code == 200


async def test_pages_read_as_of_a_past_moment_are_all_of_that_registry(
    client: httpx.AsyncClient,
) -> None:
    """With ``as_of`` each page is rebuilt from the stream as it was then, so changes made
    between the pages (or before the first) are in none of them; the live list has them."""
    p = prefix()
    original = [f"{p}-{n}" for n in range(6)]
    for name in original:
        last = (await put(client, manifest(name))).json()
    seq, moment = last["seq"], last["agent"]["updated_at"]
    await put(client, manifest(f"{p}-1", "2.0.0"))
    assert (await client.delete(f"/v1/agents/{p}-2")).status_code == 200
    await put(client, manifest(f"{p}-3a"))

    for as_of in (str(seq), moment):
        first = await client.get("/v1/agents", params={"as_of": as_of, "after": p, "limit": "2"})
        assert first.status_code == 200, first.text
        await put(client, manifest(f"{p}-4a"))  # past the cursor, between two pages
        pages = [
            first.json(),
            *await read_pages(client, as_of=as_of, limit="2", after=first.json()["next_after"]),
        ]
        assert {page["seq"] for page in pages} == {seq}
        assert {page["as_of"] for page in pages} == {as_of}
        listed = [(a["name"], a["version"]) for page in pages for a in page["agents"]]
        assert [entry for entry in listed if entry[0].startswith(p)] == [
            (name, "1.0.0") for name in original
        ]
    live = {
        a["name"]: a["version"] for a in (await read_pages(client, after=p, limit="2"))[0]["agents"]
    }
    assert live == {f"{p}-0": "1.0.0", f"{p}-1": "2.0.0"}


async def test_a_live_list_read_in_pages_takes_in_what_is_registered_past_the_cursor(
    client: httpx.AsyncClient,
) -> None:
    """Each page of the live list is the registry when that page is read: an agent
    registered between two pages is on a later page when its name is past the cursor,
    and on none when it is before it; no agent is answered twice."""
    p = prefix()
    for name in (f"{p}-0", f"{p}-2", f"{p}-4"):
        await put(client, manifest(name))
    first = (await client.get("/v1/agents", params={"after": p, "limit": "2"})).json()
    assert first["next_after"] == f"{p}-2"
    await put(client, manifest(f"{p}-1"))
    await put(client, manifest(f"{p}-3"))
    rest = await read_pages(client, after=first["next_after"], limit="2")
    assert names([first, *rest], p) == [f"{p}-0", f"{p}-2", f"{p}-3", f"{p}-4"]


async def test_a_page_stops_at_a_mebibyte_of_manifests(client: httpx.AsyncClient) -> None:
    """100 manifests of 256 KiB were a 25 MiB answer: a page also stops before the manifest
    that would take it past 1 MiB, so it holds fewer than ``limit`` while more follow."""
    p = prefix()
    for n in range(7):
        assert (await put(client, heavy(f"{p}-{n}"))).status_code == 201, n
    pages = await read_pages(client, after=p)
    assert names(pages, p) == [f"{p}-{n}" for n in range(7)]
    for page in pages:
        sizes = [len(orjson.dumps(a["manifest"])) for a in page["agents"]]
        assert len(sizes) == 1 or sum(sizes) <= MIB, sizes
    first = [a for a in pages[0]["agents"] if a["name"].startswith(p)]
    assert len(first) == 5
    assert pages[0]["next_after"] == f"{p}-4"


@pytest.fixture
def heavy_agents(broker: BrokerProcess) -> Iterator[list[str]]:
    """Six agents of about 190 KB each: no page holds them all (deregistered after)."""
    p = prefix()
    registered = [f"{p}-{n}" for n in range(6)]
    with httpx.Client(base_url=broker.base_url, timeout=15) as http:
        for name in registered:
            assert http.put(f"/v1/agents/{name}", json=heavy(name)).status_code == 201
        yield registered
        for name in registered:
            http.delete(f"/v1/agents/{name}")


def more_than_one_page(broker: BrokerProcess) -> bool:
    return httpx.get(f"{broker.base_url}/v1/agents").json()["next_after"] is not None


def test_the_client_reads_every_page(broker: BrokerProcess, heavy_agents: list[str]) -> None:
    """``list_agents`` (and its sync twin) returns the whole list, however many pages."""
    assert more_than_one_page(broker)
    with SyncBrokerClient(broker.base_url) as sync:
        listed = [a["name"] for a in sync.list_agents()]
        assert [n for n in listed if n in heavy_agents] == heavy_agents
        assert listed == sorted(set(listed))
        then = [a["name"] for a in sync.list_agents(as_of=sync.get_agent(heavy_agents[-1])["seq"])]
        assert [n for n in then if n in heavy_agents] == heavy_agents


async def test_the_client_reads_the_pages_after_the_first_at_its_seq(
    broker: BrokerProcess, heavy_agents: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``as_of`` a time still to come would take in an agent registered while the pages are
    read; the client reads the pages after the first at the seq the first answered."""
    late = f"{heavy_agents[-1]}-late"  # after every heavy agent: past the first page
    queries: list[httpx.QueryParams] = []
    send = httpx.AsyncClient.send

    async def register_after_the_first_page(
        self: httpx.AsyncClient, request: httpx.Request, **options: Any
    ) -> httpx.Response:
        response = await send(self, request, **options)
        if request.method == "GET" and request.url.path == "/v1/agents":
            queries.append(request.url.params)
            if len(queries) == 1:
                async with httpx.AsyncClient(base_url=broker.base_url) as http:
                    assert (await put(http, manifest(late))).status_code == 201
        return response

    monkeypatch.setattr(httpx.AsyncClient, "send", register_after_the_first_page)
    async with BrokerClient(broker.base_url) as client:
        listed = [a["name"] for a in await client.list_agents(as_of="2999-01-01T00:00:00Z")]
        assert len(queries) > 1
        assert [n for n in listed if n in heavy_agents] == heavy_agents
        assert late not in listed
        assert queries[0]["as_of"] == "2999-01-01T00:00:00Z"
        pinned = {q["as_of"] for q in queries[1:]}
        assert len(pinned) == 1, pinned
        assert pinned.pop().isdigit()
        assert late in [a["name"] for a in await client.list_agents()]
        await client.delete_agent(late)


def test_the_cli_reads_every_page(broker: BrokerProcess, heavy_agents: list[str]) -> None:
    """``broker agents list`` prints the whole list, as json or as a table."""
    assert more_than_one_page(broker)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "agents", "list", *args, "--url", broker.base_url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "300"},
        )

    done = cli("-o", "json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert set(document) == {"seq", "as_of", "agents"}
    listed = [a["name"] for a in document["agents"]]
    assert [n for n in listed if n in heavy_agents] == heavy_agents
    assert listed == sorted(set(listed))
    table = cli()
    assert table.returncode == 0, table.stderr
    rows = [line.split()[1] for line in table.stdout.splitlines() if heavy_agents[0][:10] in line]
    assert rows == heavy_agents


def test_the_cli_reads_the_pages_after_the_first_at_its_seq(
    broker: BrokerProcess, heavy_agents: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the client does: the pages after the first at the seq the first answered."""
    late = f"{heavy_agents[-1]}-late"
    queries: list[httpx.QueryParams] = []
    get = httpx.Client.get

    def register_after_the_first_page(
        self: httpx.Client, url: str, **options: Any
    ) -> httpx.Response:
        response = get(self, url, **options)
        if url == "/v1/agents":
            queries.append(response.request.url.params)
            if len(queries) == 1:
                registered = httpx.put(f"{broker.base_url}/v1/agents/{late}", json=manifest(late))
                assert registered.status_code == 201
        return response

    monkeypatch.setattr(httpx.Client, "get", register_after_the_first_page)
    args = ["agents", "list", "--as-of", "2999-01-01T00:00:00Z", "-o", "json"]
    done = CliRunner().invoke(app, [*args, "--url", broker.base_url])
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    assert len(queries) > 1
    assert document["as_of"] == "2999-01-01T00:00:00Z"
    assert {q["as_of"] for q in queries[1:]} == {str(document["seq"])}
    assert late not in [a["name"] for a in document["agents"]]
    assert httpx.delete(f"{broker.base_url}/v1/agents/{late}").status_code == 200
