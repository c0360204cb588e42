"""A broker process on its own nats-server, shared by the tests of a module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from broker.embedded import NatsServer, ServerSpec
from tests.e2e._broker import BrokerProcess, start_broker
from tests.e2e._browser import Chromium, DevTools, WebSocket, chromium_binary

#: Small limits make the 413 tests cheap.
E2E_ENV = {"BROKER_MAX_MESSAGE_BYTES": str(256 * 1024), "BROKER_MAX_BATCH_BYTES": str(1024 * 1024)}


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(ServerSpec(store_dir=tmp_path_factory.mktemp("nats"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    process = start_broker(tmp_path_factory.mktemp("broker"), nats_url=module_nats.url, env=E2E_ENV)
    yield process
    process.stop()


@pytest_asyncio.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP/2 client with prior knowledge (h2c), as ``curl --http2-prior-knowledge``."""
    async with httpx.AsyncClient(
        base_url=broker.base_url, http1=False, http2=True, timeout=15
    ) as c:
        yield c


@pytest_asyncio.fixture
async def js(module_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(module_nats.url)
    yield nc.jetstream()
    await nc.close()


def data_dir(tmp: Path) -> Path:
    return tmp / "data"


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
