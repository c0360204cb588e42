"""The ``/ui`` status page in a real browser: headless Chromium driven over the DevTools
protocol (``tests/e2e/_browser.py``; no browser-automation dependency).

The page must load, show the routing decision of a message just routed (agent, reason,
candidates' scores, trace link), and log no console error or uncaught exception. The
browser test skips when no Chromium binary is installed (Debian: ``apt-get install
chromium``; or set ``BROKER_CHROMIUM``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from broker.agent import Agent, Request
from broker.embedded import NatsServer
from tests._wait import await_until
from tests.e2e._broker import BrokerProcess, start_broker
from tests.e2e._browser import DevTools

pytestmark = pytest.mark.e2e

TRACE_URL = "http://traces.example/trace/{trace_id}"
CLIENT_TRACE = 0x3D1E9A7F00C24B6B9C6A0E5F1B2C3D4E


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    workdir = tmp_path_factory.mktemp("ui")
    policy = workdir / "policy.yaml"
    policy.write_text("version: ui-1\nthreshold: 0.0\n")  # any live agent qualifies
    process = start_broker(
        workdir,
        nats_url=module_nats.url,
        args=("--routing-policy", str(policy)),
        env={"BROKER_TRACE_URL": TRACE_URL},
    )
    yield process
    process.stop()


@pytest_asyncio.fixture
async def ocr_agent(module_nats: NatsServer) -> AsyncIterator[Agent]:
    manifest = {
        "name": "uiocr",
        "version": "1.2.0",
        "description": "reads the text in scanned pages",
        "capabilities": [
            {
                "action": "extract_text",
                "description": "extract the text of a scanned page",
                "content_types": ["text/plain"],
            }
        ],
    }
    agent = Agent(manifest, nats_url=module_nats.url, heartbeat_interval=0.5, register=True)

    @agent.handler
    async def handle(request: Request) -> str:
        return request.text()

    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    yield agent
    stop.set()
    await asyncio.wait_for(task, 30)


# --- tests ---------------------------------------------------------------------------------


async def test_page_is_one_self_contained_file(client: httpx.AsyncClient) -> None:
    """Works offline: no script, style or font from anywhere but the page itself."""
    page = await client.get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
    assert "<script>" in page.text


async def test_page_shows_a_routed_messages_decision_without_console_errors(
    page: DevTools, client: httpx.AsyncClient, broker: BrokerProcess, ocr_agent: Agent
) -> None:
    decision: dict[str, Any] = {}

    async def routed() -> bool:  # until the router has seen the agent live
        nonlocal decision
        r = await client.post(
            "/v1/route/scans.page",
            content=b"page 1 of the contract",
            headers={
                "content-type": "text/plain",
                "traceparent": f"00-{CLIENT_TRACE:032x}-00f067aa0ba902b7-01",
            },
        )
        assert r.status_code == 200, r.text
        decision = r.json()["decision"]
        return decision["agent"] == "uiocr"

    assert await await_until(routed, timeout=20, interval=0.2), decision
    message_seq = decision["message_seq"]

    await page.call("Page.navigate", url=f"{broker.base_url}/ui")

    async def shown() -> bool:
        rows = "document.querySelector('#routes tbody')"  # null until the page has loaded
        text = await page.evaluate(f"{rows} ? {rows}.innerText : ''")
        return f"#{message_seq}" in str(text)

    assert await await_until(shown, timeout=20, interval=0.2), await page.evaluate(
        "document.body.innerText"
    )
    row = await page.evaluate(
        f"""(() => {{
            const rows = [...document.querySelectorAll('#routes tbody tr')];
            const row = rows.find(r => r.innerText.includes('#{message_seq}'));
            const link = row.querySelector('a[href*="traces.example"]');
            return {{text: row.innerText, trace: link && link.href}};
        }})()"""
    )
    assert "uiocr.extract_text" in row["text"]
    assert "scored" in row["text"]
    assert re.search(r"uiocr\.extract_text \d\.\d{3}", row["text"]), row["text"]  # its score
    assert row["trace"] == TRACE_URL.format(trace_id=f"{CLIENT_TRACE:032x}")
    streams = await page.evaluate("document.querySelector('#streams tbody').innerText")
    assert "MESSAGES" in streams
    assert "ROUTES" in streams
    agents = await page.evaluate("document.querySelector('#agents tbody').innerText")
    assert "uiocr" in agents
    assert await page.evaluate("document.body.dataset.loaded") == "true"
    assert page.errors == []


async def test_a_message_link_shows_that_message_or_says_it_is_no_longer_stored(
    page: DevTools, client: httpx.AsyncClient, broker: BrokerProcess, js: JetStreamContext
) -> None:
    """A decision's "message #N" link shows message N itself; once N is deleted (or aged
    out), the page says so instead of showing the next message stored after it."""

    async def routed(text: str, content_type: str = "text/plain") -> int:
        r = await client.post(
            "/v1/route/ui.linked", content=text.encode(), headers={"content-type": content_type}
        )
        assert r.status_code == 200, r.text
        seq: int = r.json()["seq"]
        return seq

    gone = await routed("deleted before anyone looked")
    kept = await routed("still stored")
    # JSON.parse then JSON.stringify showed this id as 12345678901234567000
    big = await routed('{"id": 12345678901234567890}', "application/json")
    await js.delete_msg("MESSAGES", gone)

    await page.call("Page.navigate", url=f"{broker.base_url}/ui")
    link = "document.querySelector('#routes a[data-message-seq=\"{seq}\"]')"

    async def linked() -> bool:
        found = " && ".join(f"!!{link.format(seq=seq)}" for seq in (gone, kept, big))
        return bool(await page.evaluate(found))

    assert await await_until(linked, timeout=20, interval=0.2), await page.evaluate(
        "document.body.innerText"
    )

    async def opened(seq: int) -> dict[str, Any]:
        await page.evaluate(f"{link.format(seq=seq)}.click()")
        shown: dict[str, Any] = {}

        async def loaded() -> bool:
            nonlocal shown
            shown = await page.evaluate(
                """(() => {
                    const box = document.getElementById('message');
                    return {hidden: box.hidden, seq: box.dataset.seq, state: box.dataset.state,
                            text: document.getElementById('message-state').textContent,
                            record: document.getElementById('message-record').textContent};
                })()"""
            )
            return shown["seq"] == str(seq) and shown["state"] != "loading"

        assert await await_until(loaded, timeout=10, interval=0.1), shown
        return shown

    missing = await opened(gone)
    assert not missing["hidden"]
    assert missing["state"] == "gone"
    assert f"message #{gone} is no longer stored" in missing["text"]
    assert missing["record"] == ""  # not message #kept, the next one stored

    stored = await opened(kept)
    assert stored["state"] == "stored"
    record = json.loads(stored["record"])
    assert (record["seq"], record["value"]) == (kept, "still stored")
    assert stored["record"] == json.dumps(record, indent=2, ensure_ascii=False)
    exact = await opened(big)
    assert '"id": 12345678901234567890' in exact["record"], exact["record"]
    assert json.loads(exact["record"])["value"] == {"id": 12345678901234567890}
    assert page.errors == []
