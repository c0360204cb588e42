"""Registry conditions over real HTTP/2 and the CLI: ``If-Match`` as RFC 9110 (section
13.1.1) has it (strong comparison, ``*``, lists), ``as_of`` as RFC 3339 and nothing else,
and ``broker agents apply`` stopping when it cannot read the agent it would change."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from tests.e2e._broker import BrokerProcess

pytestmark = pytest.mark.e2e


def manifest(name: str, version: str = "1.0.0") -> dict[str, object]:
    return {
        "name": name,
        "version": version,
        "description": "Checks preconditions.",
        "capabilities": [{"action": "check", "content_types": ["text/plain"]}],
    }


def unique() -> str:
    return f"cond-{uuid.uuid4().hex[:8]}"


async def put(
    client: httpx.AsyncClient, name: str, version: str, if_match: str | None = None
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if if_match is not None:
        headers["if-match"] = if_match
    return await client.put(
        f"/v1/agents/{name}", content=orjson.dumps(manifest(name, version)), headers=headers
    )


async def delete(client: httpx.AsyncClient, name: str, if_match: str) -> httpx.Response:
    return await client.delete(f"/v1/agents/{name}", headers={"if-match": if_match})


async def registered(client: httpx.AsyncClient, name: str) -> int:
    created = await put(client, name, "1.0.0")
    assert created.status_code == 201, created.text
    seq: int = created.json()["seq"]
    return seq


async def history(client: httpx.AsyncClient, name: str) -> list[str]:
    answer = await client.get(f"/v1/agents/{name}/history")
    return [e["type"] for e in answer.json()["events"]] if answer.status_code == 200 else []


async def test_a_weak_if_match_never_matches(client: httpx.AsyncClient) -> None:
    """``W/"<seq>"`` of the current seq used to pass as a match: strong comparison fails it."""
    name = unique()
    seq = await registered(client, name)
    updated = await put(client, name, "2.0.0", f'W/"{seq}"')
    assert updated.status_code == 409, updated.text
    assert updated.json()["error_code"] == "version_conflict"
    deleted = await delete(client, name, f'W/"{seq}"')
    assert deleted.status_code == 409, deleted.text
    assert deleted.json()["error_code"] == "version_conflict"
    still = await client.get(f"/v1/agents/{name}")
    assert (still.json()["seq"], still.json()["version"]) == (seq, "1.0.0")
    assert await history(client, name) == ["AgentRegistered"]


async def test_if_match_star_matches_a_registered_agent_only(client: httpx.AsyncClient) -> None:
    name = unique()
    absent = await put(client, name, "1.0.0", "*")
    assert absent.status_code == 409, absent.text
    assert absent.json()["error_code"] == "version_conflict"
    assert (await client.get(f"/v1/agents/{name}")).status_code == 404

    seq = await registered(client, name)
    updated = await put(client, name, "2.0.0", "*")
    assert updated.status_code == 200, updated.text
    assert updated.json()["event"] == "AgentUpdated"
    assert updated.json()["seq"] > seq
    deleted = await delete(client, name, " * ")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["changed"] is True
    assert (await delete(client, name, "*")).status_code == 404  # nothing registered to match
    gone = await put(client, name, "3.0.0", "*")
    assert gone.status_code == 409, gone.text
    assert await history(client, name) == ["AgentRegistered", "AgentUpdated", "AgentDeregistered"]


async def test_an_if_match_list_matches_when_any_member_does(client: httpx.AsyncClient) -> None:
    name = unique()
    first = await registered(client, name)
    updated = await put(client, name, "2.0.0", f'"1", W/"x", "{first}"')
    assert updated.status_code == 200, updated.text
    second = updated.json()["seq"]
    assert updated.headers["etag"] == f'"{second}"'
    stale = await put(client, name, "3.0.0", f'"{first}", W/"{second}"')
    assert stale.status_code == 409, stale.text
    assert stale.json()["error_code"] == "version_conflict"

    both = f'"{first}","{second}"'
    deleted = await delete(client, name, both)
    assert (deleted.status_code, deleted.json()["changed"]) == (200, True), deleted.text
    retried = await delete(client, name, both)  # its answer was lost: sent again
    assert retried.status_code == 200, retried.text
    assert retried.json() == {
        "seq": deleted.json()["seq"],
        "changed": False,
        "event": None,
        "agent": None,
    }
    assert (await delete(client, name, f'W/"{second}"')).status_code == 404
    assert (await delete(client, name, f'"{first}"')).status_code == 404


@pytest.mark.parametrize("header", ["abc", '"12', "W/12", '*, "1"', '"1" "2"', ",", 'w/"1"'])
async def test_a_malformed_if_match_is_422_and_changes_nothing(
    client: httpx.AsyncClient, header: str
) -> None:
    name = unique()
    seq = await registered(client, name)
    for answer in (await put(client, name, "2.0.0", header), await delete(client, name, header)):
        assert answer.status_code == 422, (header, answer.text)
        assert answer.json()["error_code"] == "unprocessable"
        assert "If-Match" in answer.json()["message"]
    assert (await client.get(f"/v1/agents/{name}")).json()["seq"] == seq


async def test_a_bare_seq_in_if_match_still_works(client: httpx.AsyncClient) -> None:
    name = unique()
    seq = await registered(client, name)
    updated = await put(client, name, "2.0.0", str(seq))
    assert updated.status_code == 200, updated.text
    assert updated.json()["event"] == "AgentUpdated"


async def test_as_of_takes_rfc_3339_in_any_offset_and_lowercase(
    client: httpx.AsyncClient,
) -> None:
    name = unique()
    await registered(client, name)
    await put(client, name, "2.0.0")
    events = (await client.get(f"/v1/agents/{name}/history")).json()["events"]
    registered_at = datetime.fromisoformat(events[0]["at"])
    india = registered_at.astimezone(timezone(timedelta(hours=5, minutes=30)))
    for as_of in (
        registered_at.astimezone(UTC).strftime("%Y-%m-%dt%H:%M:%S.%fz"),
        india.strftime("%Y-%m-%dT%H:%M:%S.%f") + "+05:30",
    ):
        then = await client.get("/v1/agents", params={"as_of": as_of})
        assert then.status_code == 200, (as_of, then.text)
        versions = {a["name"]: a["version"] for a in then.json()["agents"]}
        assert versions[name] == "1.0.0", as_of
    number = await client.get("/v1/agents", params={"as_of": str(events[0]["seq"])})
    assert {a["name"]: a["version"] for a in number.json()["agents"]}[name] == "1.0.0"


@pytest.mark.parametrize(
    "as_of",
    [
        "2026-W48-4",
        "20261126T120000Z",
        "2026-11-26",
        "2026-11-26T12:00Z",
        "2026-11-26T12:00:00+0100",
        "2026-11-26 12:00:00Z",
    ],
)
async def test_as_of_that_is_not_rfc_3339_is_422(client: httpx.AsyncClient, as_of: str) -> None:
    """``datetime.fromisoformat`` took ISO 8601 week dates, basic format, bare dates."""
    answer = await client.get("/v1/agents", params={"as_of": as_of})
    assert answer.status_code == 422, (as_of, answer.text)
    assert answer.json()["error_code"] == "unprocessable"
    assert "RFC 3339" in answer.json()["message"]


def test_apply_stops_when_it_cannot_read_the_agent(broker: BrokerProcess, tmp_path: Path) -> None:
    """A refused read (here 403: a tenant the caller does not hold) was taken for an agent
    not registered: apply showed it as new and put it without If-Match. It now stops at
    the read, shows the broker's answer and exits 1, as the CLI's other refusals do."""
    name = unique()
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(manifest(name)))
    env = {**os.environ, "BROKER_AS_TENANT": "not-this-callers"}
    env.pop("BROKER_API_KEY", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "agents",
            "apply",
            "-f",
            str(tmp_path),
            "--url",
            broker.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "tenant_forbidden" in done.stderr
    assert "Traceback" not in done.stderr
    assert f"+++ {tmp_path}" not in done.stdout  # no diff against an agent it could not read
    assert "change(s)" not in done.stdout
