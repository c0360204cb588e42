"""``Agent(register=True)`` during a rolling upgrade: an instance of the version going out
that starts again leaves a newer registered manifest in place (and still serves its inbox);
a newer or equal version still registers as before."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.js.errors
import pytest
from nats.js import JetStreamContext

from broker.agent import Agent, Request
from broker.envelope import Tenant
from broker.publisher import Publisher
from broker.registry.commands import last_event, put_agent
from broker.registry.manifest import validate_manifest, version_order
from broker.streams import AGENT_LOAD_BUCKET
from tests._wait import await_until

pytestmark = pytest.mark.integration

NAME = "summarizer"


def manifest(version: str, description: str = "Summarises documents") -> dict[str, Any]:
    return {
        "name": NAME,
        "version": version,
        "description": description,
        "capabilities": [{"action": "summarize", "description": "summarize"}],
    }


async def registered(publisher: Publisher) -> tuple[str, str]:
    event = await last_event(publisher.js, Tenant("default"), NAME)
    assert event is not None
    assert event.manifest is not None
    return event.manifest.version, event.manifest.description


async def start_and_stop(
    js: JetStreamContext, nats_url: str, version: str, description: str
) -> Agent:
    """Run an instance with ``register=True`` until it heartbeats, then stop it."""
    agent = Agent(
        manifest(version, description), nats_url=nats_url, heartbeat_interval=0.2, register=True
    )

    @agent.handler
    async def handle(request: Request) -> str:
        return "ok"

    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))

    load = await js.key_value(AGENT_LOAD_BUCKET)

    async def heartbeating() -> bool:  # registering comes before the first heartbeat
        assert not task.done(), task
        with contextlib.suppress(nats.js.errors.NoKeysError):
            return any(key.startswith(f"default.{NAME}.") for key in await load.keys())
        return False

    try:
        assert await await_until(heartbeating, timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    return agent


@pytest.mark.parametrize(
    ("ours", "registers"),
    [("1.9.0", False), ("2.0.0-rc.1", False), ("2.0.0", True), ("2.0.1", True), ("10.0.0", True)],
)
async def test_an_older_instance_leaves_a_newer_registered_manifest_in_place(
    publisher: Publisher, nats_url: str, ours: str, registers: bool
) -> None:
    tenant = Tenant("default")
    await put_agent(publisher, tenant, validate_manifest(manifest("2.0.0", "the new one")))
    await start_and_stop(publisher.js, nats_url, ours, "instance of " + ours)
    expected = (ours, "instance of " + ours) if registers else ("2.0.0", "the new one")
    assert await registered(publisher) == expected


def test_versions_sort_by_semantic_versioning_precedence() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.2.0",
        "1.10.0",
        "2.0.0",
    ]
    assert sorted(reversed(ordered), key=version_order) == ordered
    assert version_order("1.0.0+build.5") == version_order("1.0.0")
    with pytest.raises(ValueError, match="not a semantic version"):
        version_order("1.0")
