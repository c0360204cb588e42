"""Agents for the routing tests: real :class:`broker.agent.Agent` instances, run in this
test's event loop or (``python -m tests.e2e._agents SPEC``) as separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.agent import Agent, Request

TEXT = ["text/plain", "application/json"]


def manifest(
    name: str,
    description: str,
    *,
    action: str = "handle",
    content_types: list[str] | None = None,
    examples: list[str] | None = None,
    labels: dict[str, str] | None = None,
    max_qps: float | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0.0",
        "description": description,
        "capabilities": [
            {
                "action": action,
                "description": description,
                "content_types": content_types or TEXT,
                "examples": examples or [],
            }
        ],
        "labels": labels or {},
        "limits": {"max_qps": max_qps} if max_qps else {},
    }


@dataclass
class Behaviour:
    """What a test agent does with a request: answer, fail, or take its time."""

    reply: str = "ok"
    fail: bool = False
    delay: float = 0.0
    #: Take its time only over a request with a deadline (``wait=true``): the probes that
    #: make an agent live answer at once, and the agent drains in no time at the block's end.
    delay_only_with_deadline: bool = False
    seen: list[Request] = field(default_factory=list)
    cancelled: int = 0

    async def __call__(self, request: Request) -> Any:
        self.seen.append(request)
        try:
            if self.delay and (request.deadline is not None or not self.delay_only_with_deadline):
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise RuntimeError("this agent always fails")
        return {"agent": self.reply, "attempt": request.attempt, "mirror": request.mirror}


@contextlib.asynccontextmanager
async def running(
    spec: dict[str, Any], nats_url: str, behaviour: Behaviour | None = None, **options: Any
) -> AsyncIterator[tuple[Agent, Behaviour]]:
    """Run an agent instance in this event loop until the block ends (then it drains)."""
    behaviour = behaviour or Behaviour(reply=spec["name"])
    agent = Agent(spec, nats_url=nats_url, heartbeat_interval=0.5, register=True, **options)
    agent.handler(behaviour)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent, behaviour
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def spawn(spec: dict[str, Any], nats_url: str, log: Path) -> subprocess.Popen[bytes]:
    """Run an echoing agent in its own process (for kill tests)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.e2e._agents", json.dumps(spec), nats_url],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _main() -> None:
    spec, nats_url = json.loads(sys.argv[1]), sys.argv[2]
    agent = Agent(spec, nats_url=nats_url, heartbeat_interval=0.5, register=True)
    agent.handler(Behaviour(reply=spec["name"]))
    agent.run_forever()


if __name__ == "__main__":
    _main()
