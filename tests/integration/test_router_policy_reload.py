"""``broker router`` with a policy file, on a real nats-server: decisions made after the file
was edited carry (and follow) the new policy, without a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from broker.envelope import Outbound
from broker.publisher import Publisher
from broker.routing.events import H_ROUTE_MODE, ROUTE_MODE_AUTO, RouteDecided
from broker.routing.service import RouterOptions, run_router
from broker.streams import Stream
from tests.integration.test_router import T, register_agents

pytestmark = pytest.mark.integration

POLICY = "version: {version}\nrequire_live: false\nthreshold: {threshold}\n"


async def test_decisions_follow_the_edited_policy_file(
    publisher: Publisher, nats_url: str, tmp_path: Path
) -> None:
    await register_agents(publisher)
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(version="lenient", threshold=-1.0))
    stop = asyncio.Event()
    router = asyncio.create_task(run_router(RouterOptions([nats_url], policy_path=path), stop))
    nc = await nats.connect(nats_url)
    decisions = await nc.jetstream().subscribe(
        f"route.{T}.>", stream=Stream.ROUTES, ordered_consumer=True
    )

    async def route(text: str) -> RouteDecided:
        auto = {H_ROUTE_MODE: ROUTE_MODE_AUTO}
        ack = await publisher.publish(Outbound(f"msg.{T}.chat", text.encode(), auto))
        while True:
            stored = await decisions.next_msg(timeout=10)
            decided = RouteDecided.from_headers(stored.headers or {})
            if decided.message_seq == ack.seq:
                return decided

    async def routed_under(version: str) -> RouteDecided:
        for _ in range(50):
            decided = await route("please translate this letter into German")
            if decided.decision.policy_version == version:
                return decided
            await asyncio.sleep(0.2)
        raise AssertionError(f"no decision under policy {version}")

    try:
        first = await routed_under("lenient")
        assert first.decision.agent == "translator"
        # Nothing is similar enough under the strict policy: below_threshold, no agent.
        path.write_text(POLICY.format(version="strict", threshold=0.99))
        strict = await routed_under("strict")
        assert strict.decision.agent is None
        # A broken edit is not applied: the router goes on with the last good policy.
        path.write_text("version: broken\nthreshold: [not, a, number]\n")
        await asyncio.sleep(3)  # more than a look at the file
        assert (await route("please translate this letter")).decision.policy_version == "strict"
        assert not router.done()
    finally:
        stop.set()
        await asyncio.wait_for(router, 15)
        await nc.close()
