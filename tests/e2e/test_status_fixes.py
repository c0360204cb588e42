"""``/v1/status`` and ``broker status`` as an operator meets them: an agent heartbeating
absurd numbers, and a URL that answers 200 with something other than the broker's status
(a proxy's login page)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE
from broker.embedded import NatsServer
from tests._wait import await_until, wait_for
from tests.e2e._broker import BrokerProcess, free_port, start_broker

pytestmark = pytest.mark.e2e

#: An ASGI app standing in for what may sit at a wrong ``--url``: under ``/login`` a proxy's
#: login page (200, HTML), under ``/null`` a status document whose load numbers are null
#: (how a broker writes a number JSON cannot carry).
OTHER_SERVER = textwrap.dedent(
    """
    import json

    LOGIN = b"<!doctype html><title>Sign in</title><form>user <input name=u></form>"
    NULLS = json.dumps({
        "generated_at": "2026-01-01T00:00:00+00:00",
        "broker": {"version": "0", "git_revision": "x", "nats_server_version": None,
                   "tenant": "default"},
        "streams": [], "consumers": [], "dlq": [], "routes": [],
        "agents": [{"name": "buggy", "registered": False, "version": None,
                    "load": {"instances": 2, "in_flight": None, "qps": None,
                             "p99_ms": None, "error_rate": None}}],
    }).encode()


    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                await send({"type": event["type"] + ".complete"})
                if event["type"] == "lifespan.shutdown":
                    return
        status = 200
        if scope["path"].startswith("/null"):
            kind, body = b"application/json", NULLS
        elif scope["path"].startswith("/locked"):  # a broker with API keys, none sent
            status, kind = 401, b"application/json"
            body = b'{"error_code": "unauthenticated", "message": "no API key"}'
        else:
            kind, body = b"text/html; charset=utf-8", LOGIN
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})
    """
)


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    process = start_broker(
        tmp_path_factory.mktemp("status-fixes"),
        nats_url=module_nats.url,
        args=("--projection-workers", "0", "--routers", "0"),
    )
    yield process
    process.stop()


@pytest.fixture
def other_server(tmp_path: Path) -> Iterator[str]:
    """Base URL of :data:`OTHER_SERVER`, served by granian over h2c as the broker is."""
    (tmp_path / "other_server.py").write_text(OTHER_SERVER)
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "granian", "--interface", "asgi", "--http", "2"),
            *("--host", "127.0.0.1", "--port", str(port), "--working-dir", str(tmp_path)),
            "other_server:app",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with httpx.Client(http1=False, http2=True, timeout=1) as c:
                return c.get(f"{base}/login").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(answers, timeout=20, interval=0.1), "granian did not start"
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest_asyncio.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=broker.base_url, http1=False, http2=True, timeout=15
    ) as c:
        yield c


def beat(key: str, **load: float) -> bytes:
    """A heartbeat as agents store it under ``key`` (``<tenant>.<agent>.<instance>``)."""
    tenant, agent, instance = key.split(".", 2)
    return json.dumps({"tenant": tenant, "agent": agent, "instance": instance, **load}).encode()


def status_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "status", "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )


async def test_status_answers_for_everyone_while_an_agent_heartbeats_absurd_numbers(
    broker: BrokerProcess, client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    kv = await js.key_value("agent_load")

    async def heartbeat() -> None:  # again before each CLI run: entries older than the
        # load TTL count as gone, and a CLI start takes seconds on a loaded machine
        for instance in ("a", "b"):  # each finite; their sum is not
            huge = {"qps": 1.0e308, "in_flight": 1.0e308}
            await kv.put(f"default.buggy.{instance}", beat(f"default.buggy.{instance}", **huge))
        await kv.put("default.ocr.x", beat("default.ocr.x", qps=2, in_flight=1))

    await heartbeat()

    async def listed() -> bool:  # past the second the status is cached for
        response = await client.get("/v1/status")
        assert response.status_code == 200, response.text
        return {"buggy", "ocr"} <= {a["name"] for a in response.json()["agents"]}

    assert await await_until(listed, timeout=10)
    agents = {a["name"]: a["load"] for a in (await client.get("/v1/status")).json()["agents"]}
    assert agents["buggy"]["instances"] == 2
    assert isinstance(agents["buggy"]["qps"], float)
    assert agents["ocr"]["qps"] == 2.0

    await heartbeat()
    table = status_cli(broker.base_url)
    assert table.returncode == 0, table.stderr
    assert "buggy" in table.stdout
    assert "ocr" in table.stdout
    await heartbeat()
    as_json = status_cli(broker.base_url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert {"buggy", "ocr"} <= {a["name"] for a in json.loads(as_json.stdout)["agents"]}


def test_status_cli_says_a_200_login_page_is_not_the_brokers_status(other_server: str) -> None:
    for args in ((), ("--json",)):
        result = status_cli(f"{other_server}/login", *args)
        assert result.returncode == EXIT_UNAVAILABLE
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        assert f"the answer from {other_server}/login/v1/status" in result.stderr
        assert "is not the broker's: HTTP 200 (text/html" in result.stderr


def test_status_cli_shows_a_load_number_the_broker_wrote_as_null_as_a_question_mark(
    other_server: str,
) -> None:
    result = status_cli(f"{other_server}/null")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "buggy" in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells == ["buggy (unregistered)", "-", "2", "?", "?", "?", "?"]


def test_status_cli_refused_its_key_says_which_setting_sends_one(other_server: str) -> None:
    result = status_cli(f"{other_server}/locked")
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert "unauthenticated" in result.stderr
    assert "BROKER_API_KEY" in result.stderr
