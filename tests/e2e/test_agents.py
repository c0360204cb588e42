"""The registry over real HTTP/2: commands, 409/404/413/422, time travel, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from tests.e2e._broker import BrokerProcess

pytestmark = pytest.mark.e2e


def manifest(name: str, version: str = "1.0.0", **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "version": version,
        "description": "Summarises long documents.",
        "capabilities": [
            {
                "action": "summarize",
                "content_types": ["text/plain", "application/pdf"],
                "modalities": ["text", "document"],
                "examples": ["give me the gist of this report"],
            }
        ],
        **extra,
    }


def unique() -> str:
    return f"agent-{uuid.uuid4().hex[:8]}"


async def put(client: httpx.AsyncClient, body: dict[str, object], **headers: str) -> httpx.Response:
    return await client.put(
        f"/v1/agents/{body['name']}",
        content=orjson.dumps(body),
        headers={"content-type": "application/json", **headers},
    )


async def test_register_update_noop_and_deregister(client: httpx.AsyncClient) -> None:
    name = unique()
    created = await put(client, manifest(name))
    assert created.status_code == 201, created.text
    assert created.json()["event"] == "AgentRegistered"
    seq = created.json()["seq"]
    assert created.headers["etag"] == f'"{seq}"'
    got = await client.get(f"/v1/agents/{name}")
    assert got.json()["manifest"]["name"] == name
    assert got.json()["seq"] == seq
    same = await put(client, manifest(name))
    assert same.status_code == 200
    assert (same.json()["changed"], same.json()["seq"]) == (False, seq)
    updated = await put(client, manifest(name, "1.1.0"), **{"if-match": f'"{seq}"'})
    assert updated.json()["event"] == "AgentUpdated"
    stale = await put(client, manifest(name, "1.2.0"), **{"if-match": f'"{seq}"'})
    assert stale.status_code == 409
    assert stale.json()["error_code"] == "version_conflict"
    gone = await client.delete(f"/v1/agents/{name}")
    assert gone.status_code == 200
    assert (await client.get(f"/v1/agents/{name}")).status_code == 404
    history = (await client.get(f"/v1/agents/{name}/history")).json()["events"]
    assert [e["type"] for e in history] == ["AgentRegistered", "AgentUpdated", "AgentDeregistered"]


async def test_a_conditional_delete_sent_again_answers_unchanged(
    client: httpx.AsyncClient,
) -> None:
    name = unique()
    seq = (await put(client, manifest(name))).json()["seq"]
    gone = await client.delete(f"/v1/agents/{name}", headers={"if-match": f'"{seq}"'})
    assert (gone.status_code, gone.json()["changed"]) == (200, True)
    again = await client.delete(f"/v1/agents/{name}", headers={"if-match": f'"{seq}"'})
    assert again.status_code == 200, again.text
    assert again.json() == {
        "seq": gone.json()["seq"],
        "changed": False,
        "event": None,
        "agent": None,
    }
    assert (await client.delete(f"/v1/agents/{name}")).status_code == 404


async def test_yaml_manifest_is_accepted(client: httpx.AsyncClient) -> None:
    name = unique()
    r = await client.put(
        f"/v1/agents/{name}",
        content=yaml.safe_dump(manifest(name)).encode(),
        headers={"content-type": "application/yaml"},
    )
    assert r.status_code == 201, r.text


async def test_time_travel_over_http(client: httpx.AsyncClient) -> None:
    name = unique()
    first = (await put(client, manifest(name))).json()["seq"]
    await put(client, manifest(name, "2.0.0"))
    then = (await client.get("/v1/agents", params={"as_of": str(first)})).json()
    versions = {a["name"]: a["version"] for a in then["agents"]}
    assert versions[name] == "1.0.0"
    now = (await client.get("/v1/agents")).json()
    assert {a["name"]: a["version"] for a in now["agents"]}[name] == "2.0.0"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "paths"),
    [
        (b"{", "application/json", 422, "invalid_manifest", []),
        (
            orjson.dumps({"name": "x"}),
            "application/json",
            422,
            "invalid_manifest",
            ["version", "description", "capabilities"],
        ),
        (
            orjson.dumps(manifest("x", "one")),
            "application/json",
            422,
            "invalid_manifest",
            ["version"],
        ),
        (
            orjson.dumps(manifest("x", capabilities=[{"action": "A B"}])),
            "application/json",
            422,
            "invalid_manifest",
            ["capabilities.0.action"],
        ),
        (orjson.dumps(manifest("y")), "application/json", 422, "unprocessable", []),
        (orjson.dumps(manifest("x")), "text/plain", 415, "unsupported_media_type", []),
        (b" " * (256 * 1024 + 1), "application/json", 413, "payload_too_large", []),
    ],
)
async def test_bad_manifests_get_clear_answers(
    client: httpx.AsyncClient,
    body: bytes,
    content_type: str,
    status: int,
    code: str,
    paths: list[str],
) -> None:
    r = await client.put("/v1/agents/x", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert r.json()["error_code"] == code
    for path in paths:
        assert path in [e["loc"] for e in r.json()["errors"]]


async def test_unknown_agent_is_404(client: httpx.AsyncClient) -> None:
    for r in (
        await client.get("/v1/agents/nobody"),
        await client.delete("/v1/agents/nobody"),
        await client.get("/v1/agents/nobody/history"),
    ):
        assert r.status_code == 404
        assert r.json()["error_code"] == "not_found"


def agents_cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``broker agents ARGS --url <broker>`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "agents", *args, "--url", broker.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_apply_shows_a_diff_and_is_idempotent(broker: BrokerProcess, tmp_path: Path) -> None:
    name = unique()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(manifest(name)))
    (tmp_path / "b.json").write_text(json.dumps(manifest(name + "-b")))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return agents_cli(broker, *args)

    dry = cli("apply", "-f", str(tmp_path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert '+  "name"' in dry.stdout or f'"name": "{name}"' in dry.stdout
    assert httpx.get(f"{broker.base_url}/v1/agents/{name}").status_code == 404
    applied = cli("apply", "-f", str(tmp_path))
    assert applied.returncode == 0, applied.stderr
    assert "AgentRegistered" in applied.stdout
    again = cli("apply", "-f", str(tmp_path))
    assert "0 change(s)" in again.stdout
    listed = cli("list", "--output", "json")
    assert name in {a["name"] for a in json.loads(listed.stdout)["agents"]}
    assert json.loads(cli("get", name).stdout)["name"] == name
    assert "AgentRegistered" in cli("history", name).stdout
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "c.yaml").write_text("name: x\n")
    refused = cli("apply", "-f", str(bad))
    assert refused.returncode == 1
    assert "version" in refused.stderr


def test_cli_refuses_a_name_that_is_not_an_agent_name_and_skips_folders(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    """`broker agents get ../status` printed the status document (the name went into the
    URL path as it was), and a folder named `sub.yaml` inside an applied folder was read
    as a manifest (IsADirectoryError, a traceback)."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return agents_cli(broker, *args)

    for args in (("get", "../status"), ("get", "x/history"), ("history", "../../v1/status")):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "is not an agent name" in done.stderr
        assert "streams" not in done.stdout
    (tmp_path / "sub.yaml").mkdir()
    (tmp_path / "sub.yaml" / "a.yaml").write_text(yaml.safe_dump(manifest(unique())))
    applied = cli("apply", "-f", str(tmp_path), "--dry-run")
    assert applied.returncode == 0, applied.stderr
    assert "Traceback" not in applied.stderr


def test_cli_imports_an_a2a_card_that_applies(broker: BrokerProcess, tmp_path: Path) -> None:
    card = {
        "name": f"card {uuid.uuid4().hex[:6]}",
        "description": "Answers billing questions.",
        "url": "https://agents.example/billing",
        "version": "2",
        "defaultInputModes": ["text/plain"],
        "skills": [
            {"id": "billing_faq", "name": "Billing FAQ", "examples": ["why was I charged twice?"]}
        ],
    }
    (tmp_path / "card.json").write_text(json.dumps(card))
    out = tmp_path / "manifests" / "billing.yaml"
    out.parent.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "agents",
            "import-a2a",
            str(tmp_path / "card.json"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    applied = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "agents",
            "apply",
            "-f",
            str(out.parent),
            "--url",
            broker.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    name = yaml.safe_load(out.read_text())["name"]
    assert httpx.get(f"{broker.base_url}/v1/agents/{name}").json()["version"] == "2.0.0"


@pytest.mark.parametrize("as_of", ["²", "yesterday", "2026-11-24T10:00:00", "2026-13-01T00:00:00Z"])
async def test_bad_as_of_is_422(client: httpx.AsyncClient, as_of: str) -> None:
    """Found by schemathesis: a non-ASCII digit once crashed the handler (500)."""
    r = await client.get("/v1/agents", params={"as_of": as_of})
    assert r.status_code == 422, r.text
    assert r.json()["error_code"] == "unprocessable"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("Application/JSON", 201),
        ("application/json; charset=utf-8", 201),
        ("application/vnd.example+json", 201),
        ("application/x-www-form-urlencoded; x=json", 415),  # "json" appears, not the type
        ("text/json-ish", 415),
    ],
)
async def test_a_manifests_media_type_is_compared_as_a_media_type(
    client: httpx.AsyncClient, content_type: str, status: int
) -> None:
    name = unique()
    body = orjson.dumps(manifest(name))
    r = await client.put(f"/v1/agents/{name}", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text


async def test_a_slow_yaml_manifest_does_not_hold_other_requests(
    client: httpx.AsyncClient,
) -> None:
    """A YAML manifest near the size limit takes seconds to parse (pure Python); parsed on
    the event loop, every other request of every tenant waited for it (a publish: 0.05 s
    alone, 3.5 s beside one such PUT)."""
    items = ",".join(["1"] * 120_000)
    document = (
        "name: slow\nversion: 1.0.0\ndescription: d\n"
        f"capabilities: [{{action: a, input_schema: {{enum: [{items}]}}}}]\n"
    ).encode()
    loop = asyncio.get_running_loop()
    began = loop.time()
    yaml_type = {"content-type": "application/yaml"}
    request = client.put("/v1/agents/slow", content=document, headers=yaml_type)
    putting = asyncio.create_task(request)
    waits = []
    while not putting.done():
        sent = loop.time()
        assert (await client.get("/healthz")).status_code == 200
        waits.append(loop.time() - sent)
        await asyncio.sleep(0.02)
    took = loop.time() - began
    assert (await putting).status_code == 201
    assert len(waits) >= 3, f"the PUT took {took:.2f} s"
    assert max(waits) < took / 2, f"a health check waited {max(waits):.2f} s of {took:.2f} s"


@pytest.mark.parametrize(
    ("timeout", "key", "refused"),
    [
        ("200", "k-window-1", True),
        ("119.5", "k-window-2", True),
        ("119", "k-window-3", False),
        ("200", None, False),
    ],
)
async def test_a_keyed_wait_longer_than_the_duplicate_window_is_refused(
    client: httpx.AsyncClient, timeout: str, key: str | None, refused: bool
) -> None:
    """Retries are known by JetStream's duplicate window (120 s); a keyed ``wait=true``
    request with a longer timeout had a retry sent at 130 s stored and routed again."""
    headers = {"content-type": "text/plain", "Broker-Intent": "nobody.offers.this"}
    if key is not None:
        headers["Idempotency-Key"] = key
    r = await client.post(
        f"/v1/route/window.test?wait=true&timeout={timeout}", content=b"x", headers=headers
    )
    if refused:
        assert r.status_code == 422, r.text
        assert "Idempotency-Key" in r.json()["message"]
    else:  # routed: nobody offers it
        assert r.status_code == 503, r.text
        assert r.json()["error_code"] == "no_route"


async def test_one_key_for_a_publish_and_then_a_route_is_a_reused_key(
    client: httpx.AsyncClient,
) -> None:
    """The request digest left out that a request was routed: a publish and then a route
    with the same key and body counted as one request, so the route answered a duplicate
    and nothing was ever routed (with ``wait``: a 409 naming a decision that did not
    exist)."""
    headers = {"content-type": "text/plain", "Idempotency-Key": "k-publish-then-route"}
    published = await client.post("/v1/publish/keyed.once", content=b"x", headers=headers)
    assert published.status_code == 200, published.text
    for query in ("", "?wait=true&timeout=5"):
        routed = await client.post(f"/v1/route/keyed.once{query}", content=b"x", headers=headers)
        assert routed.status_code == 422, routed.text
        assert routed.json()["error_code"] == "idempotency_key_reused"
    # another intent under one key is another request too
    intent = {**headers, "Idempotency-Key": "k-two-intents", "Broker-Intent": "summarize"}
    assert (await client.post("/v1/route/keyed.two", content=b"x", headers=intent)).is_success
    intent["Broker-Intent"] = "translate"
    again = await client.post("/v1/route/keyed.two", content=b"x", headers=intent)
    assert again.status_code == 422, again.text


async def test_history_is_answered_a_page_at_a_time_and_the_cli_reads_every_page(
    broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """The history was one answer however long (a manifest may be 256 KiB): 100 events a
    page now, ``next_from_seq`` leading on; ``broker agents history`` follows it."""
    name = unique()
    for n in range(103):
        assert (await put(client, manifest(name, f"1.{n}.0"))).status_code in (200, 201)
    first = (await client.get(f"/v1/agents/{name}/history")).json()
    assert len(first["events"]) == 100
    rest = await client.get(
        f"/v1/agents/{name}/history", params={"from_seq": first["next_from_seq"]}
    )
    assert [e["manifest"]["version"] for e in rest.json()["events"]] == [
        "1.100.0",
        "1.101.0",
        "1.102.0",
    ]
    assert rest.json()["next_from_seq"] is None
    small = await client.get(f"/v1/agents/{name}/history", params={"limit": 2})
    assert len(small.json()["events"]) == 2
    for bad in ({"limit": 0}, {"limit": 101}, {"from_seq": 0}, {"from_seq": "x"}):
        refused = await client.get(f"/v1/agents/{name}/history", params=bad)
        assert refused.status_code == 422, (bad, refused.text)
    done = agents_cli(broker, "history", name, "-o", "json")
    assert done.returncode == 0, done.stderr
    versions = [e["manifest"]["version"] for e in orjson.loads(done.stdout)["events"]]
    assert versions == [f"1.{n}.0" for n in range(103)]
    table = agents_cli(broker, "history", name)
    assert len(table.stdout.splitlines()) == 103


async def test_the_client_reads_every_page_of_a_history(broker: BrokerProcess) -> None:
    from broker.client import BrokerClient

    name = unique()
    async with BrokerClient(broker.base_url) as c:
        for n in range(101):
            await c.put_agent(manifest(name, f"2.{n}.0"))
        history = await c.agent_history(name)
    assert [e["manifest"]["version"] for e in history] == [f"2.{n}.0" for n in range(101)]
