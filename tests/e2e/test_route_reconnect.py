"""``POST /v1/route?wait=true`` across a lost connection between the ingress and NATS."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.agent import Request
from broker.client import BrokerClient
from broker.embedded import NatsServer
from tests.e2e._agents import manifest, running
from tests.e2e._broker import BrokerProcess, start_broker
from tests.e2e._tcpproxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def proxy(nats_server: NatsServer) -> Iterator[TcpProxy]:
    """Stands between the broker's processes and NATS."""
    proxy = TcpProxy("127.0.0.1", nats_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def broker(proxy: TcpProxy, tmp_path: Path) -> Iterator[BrokerProcess]:
    process = start_broker(
        tmp_path / "broker", nats_url=proxy.url, args=("--projection-workers", "0")
    )
    yield process
    process.stop()


async def test_a_reply_sent_while_the_ingress_was_cut_off_from_nats_is_answered(
    broker: BrokerProcess, proxy: TcpProxy, nats_url: str
) -> None:
    """The agent replies while the ingress's connection to NATS is stalled, then reset: the
    reply, sent on core NATS, never reaches the waiting request, though the agent stored it
    in ROUTES. Once its connection is back the request answers with the stored reply; it
    used to wait out its timeout and answer 504 deadline_exceeded for a reply stored
    seconds after it was asked for."""
    name = f"cut-{uuid.uuid4().hex[:8]}"

    def heal() -> None:
        proxy.reset()
        proxy.resume()

    async def handle(request: Request) -> Any:
        if request.deadline is not None:  # the request waiting for its reply
            proxy.stall()
            await asyncio.sleep(0.5)
            asyncio.get_running_loop().call_later(1.0, heal)
        return {"agent": name}

    async with running(
        manifest(name, "answers while the network fails", action="cut"), nats_url
    ) as (agent, _):
        agent.handler(handle)
        async with BrokerClient(broker.base_url, timeout=20) as client:
            for _ in range(100):  # until a router has seen the agent live
                if (await client.route("cut.in", "hi", intent="cut")).agent == name:
                    break
                await asyncio.sleep(0.1)
            started = time.monotonic()
            reply = await client.request("cut.in", "hello", intent="cut", timeout=10)
            took = time.monotonic() - started
    assert reply.json() == {"agent": name}
    assert took < 8.0, f"answered after {took:.1f} s"
