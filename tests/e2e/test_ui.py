"""The ``/ui`` status page in a real browser: headless Chromium driven over the DevTools
protocol (a minimal WebSocket client below; no browser-automation dependency).

The page must load, show the routing decision of a message just routed (agent, reason,
candidates' scores, trace link), and log no console error or uncaught exception. The
browser test skips when no Chromium binary is installed (Debian: ``apt-get install
chromium``; or set ``BROKER_CHROMIUM``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import pytest_asyncio

from broker.agent import Agent, Request
from broker.embedded import NatsServer
from tests._wait import await_until
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e

TRACE_URL = "http://traces.example/trace/{trace_id}"
CLIENT_TRACE = 0x3D1E9A7F00C24B6B9C6A0E5F1B2C3D4E


def chromium_binary() -> str | None:
    candidates = [os.environ.get("BROKER_CHROMIUM", ""), "chromium", "chromium-browser"]
    candidates += ["google-chrome", "google-chrome-stable"]
    for name in candidates:
        if name and (found := shutil.which(name)):
            return found
    return None


# --- a minimal WebSocket client (RFC 6455, client side) and DevTools session ---------------


class WebSocket:
    """Text frames over one TCP connection: enough for the DevTools protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> WebSocket:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket upgrade refused: {head[:200]!r}")
        return cls(reader, writer)

    async def send(self, text: str) -> None:
        payload = text.encode()
        size = len(payload)
        if size < 126:
            header = bytes([0x81, 0x80 | size])
        elif size < 2**16:
            header = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
        else:
            header = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big")
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def receive(self) -> str:
        message = b""
        while True:
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                size = int.from_bytes(await self.reader.readexactly(2), "big")
            elif size == 127:
                size = int.from_bytes(await self.reader.readexactly(8), "big")
            mask = await self.reader.readexactly(4) if second & 0x80 else b""
            data = await self.reader.readexactly(size)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode in (0x9, 0xA):  # ping / pong: nothing to do for this client
                continue
            message += data
            if first & 0x80:
                return message.decode()

    def close(self) -> None:
        self.writer.close()


class DevTools:
    """One page's DevTools session: commands, and the console errors it reported."""

    def __init__(self, socket: WebSocket) -> None:
        self.socket = socket
        self.next_id = 0
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                message = orjson.loads(await self.socket.receive())
                if "id" in message:
                    future = self.waiting.pop(message["id"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    self._event(message["method"], message.get("params", {}))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"uncaught: {text}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in params["args"]]
            self.errors.append(f"console.{params['type']}: {' '.join(args)}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry['text']} ({entry.get('url', '')})")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = future
        await self.socket.send(
            orjson.dumps({"id": self.next_id, "method": method, "params": params}).decode()
        )
        answer = await asyncio.wait_for(future, 20)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        self.socket.close()


class Chromium:
    """Headless Chromium with the DevTools protocol on a free port."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output: list[str] = []
        self.endpoint = threading.Event()
        self.port = 0
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.output.append(line)
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                self.endpoint.set()

    def page_websocket(self) -> str:
        if not self.endpoint.wait(30):
            raise AssertionError("Chromium did not start:\n" + "".join(self.output[-20:]))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=5).json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.1)
        raise AssertionError("Chromium has no page target")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


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


@pytest_asyncio.fixture
async def page(tmp_path: Path) -> AsyncIterator[DevTools]:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set BROKER_CHROMIUM)")
    browser = Chromium(binary, tmp_path / "profile")
    try:
        url = await asyncio.to_thread(browser.page_websocket)
        tools = DevTools(await WebSocket.connect(url))
        for domain in ("Runtime", "Log", "Page"):
            await tools.call(f"{domain}.enable")
        yield tools
        await tools.close()
    finally:
        browser.stop()


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
