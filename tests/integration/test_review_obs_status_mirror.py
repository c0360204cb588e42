"""A routing policy's ``mirror`` sends a shadow agent a copy of each message routed to the
agent it shadows. The copy is stored in ``ROUTES`` like a decision (the shadow's inbox), but
the shadow was never chosen: ``/v1/status`` and ``broker status`` must say it is a copy,
not show one message routed to two agents."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from nats.aio.client import Client as NatsClient
from rich.console import Console

from broker.cli_status import render
from broker.routing.events import RouteDecided
from broker.routing.types import CandidateScore, Decision, DecisionReason
from broker.settings import Settings
from broker.streams import provision
from broker.telemetry.status import BuildInfo, collect

pytestmark = pytest.mark.integration

BUILD = BuildInfo("0.0.0", "test", None, "default")


async def routed_with_a_shadow_copy(nc: NatsClient) -> None:
    """Message #7 routed to ``summarizer``, and its copy to the shadow ``summarizer-next``,
    stored as the router stores them."""
    js = nc.jetstream()
    await provision(js, Settings())
    decision = Decision(
        agent="summarizer",
        capability="summarize",
        reason=DecisionReason.SCORED,
        detail="",
        candidates=(CandidateScore("summarizer", "summarize", 0.9, 1.0, 0.9),),
        policy_version="p1",
        mirror_to="summarizer-next",
    )
    route = RouteDecided(
        tenant="default", message_seq=7, message_subject="msg.default.docs", decision=decision
    )
    shadow = replace(route, mirror=True, decision=replace(decision, agent="summarizer-next"))
    for event in (route, shadow):
        await js.publish(event.subject, b"payload", headers=event.to_headers({}))


async def test_a_shadow_copy_is_shown_as_a_copy_not_as_a_decision(nc: NatsClient) -> None:
    await routed_with_a_shadow_copy(nc)

    document = (await collect(nc, build=BUILD)).to_dict()

    by_agent = {r["agent"]: r for r in document["routes"]}
    assert set(by_agent) == {"summarizer", "summarizer-next"}
    assert by_agent["summarizer"]["mirror"] is False
    assert by_agent["summarizer-next"]["mirror"] is True

    out = io.StringIO()
    Console(file=out, width=300).print(render(document))
    lines = [line for line in out.getvalue().splitlines() if "#7" in line]
    assert len(lines) == 2, lines
    shadow_line = next(line for line in lines if "summarizer-next" in line)
    chosen_line = next(line for line in lines if "summarizer-next" not in line)
    assert "shadow copy" in shadow_line
    assert "shadow copy" not in chosen_line
