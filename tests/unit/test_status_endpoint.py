"""``/v1/status`` when JetStream does not answer: every request answered 503 within its
deadline, one read shared by the requests for the same document, a failure remembered for
a moment; and the document again once JetStream answers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from broker.envelope import Tenant
from broker.errors import BrokerError
from broker.http import ui

pytestmark = pytest.mark.unit


class Status:
    """What ``collect`` returns: only its ``to_dict`` is used."""

    def to_dict(self) -> dict[str, Any]:
        return {"streams": []}


class JetStream:
    """``collect`` standing in for a JetStream that stalls until told to answer."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.answering = asyncio.Event()

    async def collect(self, nc: Any, **kwargs: Any) -> Status:
        self.reads.append(kwargs["recent"])
        await self.answering.wait()
        return Status()


def app_with(monkeypatch: pytest.MonkeyPatch, connected: bool = True) -> tuple[FastAPI, JetStream]:
    jetstream = JetStream()
    monkeypatch.setattr(ui, "collect", jetstream.collect)
    monkeypatch.setattr(ui, "_READ_SECONDS", 0.2)
    monkeypatch.setattr(ui, "_WAIT_SECONDS", 0.5)
    monkeypatch.setattr(ui, "_FAILURE_SECONDS", 0.3)
    monkeypatch.setattr(ui, "git_revision", lambda: "abc")
    state: Any = SimpleNamespace(
        tenant=Tenant("default"),
        publisher=SimpleNamespace(nc=SimpleNamespace(is_connected=connected), server_version="2"),
        registry=SimpleNamespace(snapshot=SimpleNamespace(agents=lambda tenant: [])),
        settings=SimpleNamespace(auth_configured=False, metrics_token=None, trace_url=None),
    )
    app = FastAPI()
    app.include_router(ui.ops_router(state))

    @app.exception_handler(BrokerError)
    async def refused(_: Request, e: BrokerError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.status)

    return app, jetstream


async def statuses(app: FastAPI, recents: list[int]) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        answers = await asyncio.gather(
            *(client.get("/v1/status", params={"recent": r}) for r in recents)
        )
    return [a.status_code for a in answers]


async def test_a_stalled_jetstream_answers_every_request_503_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, jetstream = app_with(monkeypatch)
    # Unbounded, these waited for ever; queued, each waited for the reads before it.
    answered = await asyncio.wait_for(statuses(app, [20, 20, 20, 20, 50, 80]), 10)
    assert answered == [503] * 6
    assert jetstream.reads[0] == 20
    assert jetstream.reads.count(20) == 1  # four requests, one shared read
    reads = len(jetstream.reads)
    assert await statuses(app, [20]) == [503]  # a failure just now: not read again
    assert len(jetstream.reads) == reads
    jetstream.answering.set()
    await asyncio.sleep(0.8)  # past the last failure's moment (reads of 50 and 80 came later)
    assert await statuses(app, [20, 20]) == [200, 200]
    assert jetstream.reads.count(20) == 2  # read again once, for both


async def test_without_a_nats_connection_the_status_is_503_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, jetstream = app_with(monkeypatch, connected=False)
    assert await statuses(app, [20]) == [503]
    assert jetstream.reads == []
