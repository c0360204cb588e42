"""``/readyz`` as a load balancer or a Kubernetes probe reads it: about this ingress's own
ability to append, answered within a probe's timeout, and saying whether a router runs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.embedded import NatsServer
from tests._wait import await_until
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e

#: Kubernetes' default ``timeoutSeconds`` for a probe.
PROBE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """An ingress without routers of its own, as compose runs it: routers are separate
    processes, started (and killed) by the tests."""
    process = start_broker(
        tmp_path_factory.mktemp("readyz"),
        nats_url=module_nats.url,
        args=("--routers", "0", "--projection-workers", "0"),
    )
    yield process
    process.stop()


@pytest.fixture
def router(module_nats: NatsServer, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``broker router`` on its own, against the broker's NATS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    command = [sys.executable, "-m", "broker", "router", "--nats-url", module_nats.url]
    with (tmp_path / "router.log").open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--embedder", "hashing"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


async def test_readyz_says_when_no_router_is_live_and_stays_ready(
    client: httpx.AsyncClient, router: subprocess.Popen[bytes]
) -> None:
    """Every router dead: the ingress still stores what it is sent, so it stays ready (a
    balancer keeps it), and ``routers_live`` turns false for the operator to see."""
    seen: list[dict[str, object]] = []

    async def routers_live(expected: bool) -> bool:
        answer = await client.get("/readyz")
        assert answer.status_code == 200, answer.text
        seen.append(answer.json())
        return seen[-1]["routers_live"] is expected

    assert await await_until(lambda: routers_live(True), timeout=30), seen[-3:]
    router.send_signal(signal.SIGKILL)
    router.wait(5)
    assert await await_until(lambda: routers_live(False), timeout=15), seen[-3:]
    assert seen[-1] == {
        "ready": True,
        "nats_connected": True,
        "missing_streams": [],
        "registry_ready": True,
        "routers_live": False,
    }
    stored = await client.post(
        "/v1/publish/readyz.still", content=b"x", headers={"content-type": "text/plain"}
    )
    assert stored.status_code == 200, stored.text


async def test_readyz_answers_503_within_a_probe_timeout_while_nats_hangs(
    client: httpx.AsyncClient, module_nats: NatsServer
) -> None:
    """A nats-server that stops answering (SIGSTOP) gets a clear 503 from every probe in
    under a second, not a probe timeout; once it answers again, 200."""
    pid = module_nats.pid
    assert pid is not None
    answers: list[tuple[float, httpx.Response]] = []

    async def unready() -> bool:
        started = time.monotonic()
        answer = await client.get("/readyz", timeout=10)
        answers.append((time.monotonic() - started, answer))
        return answer.status_code == 503

    os.kill(pid, signal.SIGSTOP)
    try:
        assert await await_until(unready, timeout=10)
    finally:
        os.kill(pid, signal.SIGCONT)
    took = [round(elapsed, 2) for elapsed, _ in answers]
    assert max(took) < PROBE_TIMEOUT, took
    body = answers[-1][1].json()
    assert body["ready"] is False
    assert body["routers_live"] is None
    assert body["error_code"] == "nats_unavailable"
    assert "did not answer" in body["message"]

    async def ready() -> bool:
        return (await client.get("/readyz")).status_code == 200

    assert await await_until(ready, timeout=20)


async def test_publishes_failing_alike_log_one_request_failed_line(
    broker: BrokerProcess, client: httpx.AsyncClient, module_nats: NatsServer
) -> None:
    """While NATS hangs every publish fails alike; each used to log its own
    ``request_failed`` line (thousands a second under load). One per error text every 10 s
    now, with how many were held back."""
    pid = module_nats.pid
    assert pid is not None
    logged_before = len(broker.log_path.read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/publish/readyz.failing",
                    content=b"x",
                    headers={"content-type": "text/plain"},
                    timeout=30,
                )
                for _ in range(20)
            )
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    assert {answer.status_code for answer in answers} == {503}
    failures = [
        line
        for line in broker.log_path.read_text()[logged_before:].splitlines()
        if '"event": "request_failed"' in line
    ]
    assert len({answer.json()["message"] for answer in answers}) == len(failures), failures
