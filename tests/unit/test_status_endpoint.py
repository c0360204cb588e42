"""``/v1/status`` when JetStream does not answer: every request answered 503 within its
deadline (saying which deadline passed), one read shared by the requests for the tenant's
document whatever ``recent`` they ask for, a failure remembered for a moment; and the
document again once JetStream answers, with as many recent items as each request asks for."""

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
from broker.settings import Settings

pytestmark = pytest.mark.unit


class Status:
    """What ``collect`` returns: only its ``to_dict`` is used. Its lists of recent items
    hold as many as it was asked for, newest (highest ``seq``) first."""

    def __init__(self, recent: int) -> None:
        self.recent = recent

    def to_dict(self) -> dict[str, Any]:
        newest_first = range(1000, 1000 - self.recent, -1)
        return {
            "streams": [],
            "dlq": [{"seq": seq, "subject": "dlq.default.route"} for seq in newest_first],
            "routes": [{"seq": seq, "agent": "ocr"} for seq in newest_first],
        }


class JetStream:
    """``collect`` standing in for a JetStream that stalls until told to answer."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.answering = asyncio.Event()

    async def collect(self, nc: Any, **kwargs: Any) -> Status:
        self.reads.append(kwargs["recent"])
        await self.answering.wait()
        return Status(kwargs["recent"])


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
        settings=Settings(),
    )
    app = FastAPI()
    app.include_router(ui.ops_router(state))
    app.state.ingress = state  # a test may change its tenant between requests

    @app.exception_handler(BrokerError)
    async def refused(_: Request, e: BrokerError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.status)

    return app, jetstream


async def answers(app: FastAPI, recents: list[int]) -> list[httpx.Response]:
    """``GET /v1/status?recent=…`` for each of ``recents``, all at once."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        return await asyncio.gather(
            *(client.get("/v1/status", params={"recent": r}) for r in recents)
        )


async def statuses(app: FastAPI, recents: list[int]) -> list[int]:
    return [a.status_code for a in await answers(app, recents)]


async def test_a_stalled_jetstream_answers_every_request_503_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, jetstream = app_with(monkeypatch)
    # Unbounded, these waited for ever; queued, each waited for the reads before it.
    answered = await asyncio.wait_for(statuses(app, [20, 20, 20, 20, 50, 80]), 10)
    assert answered == [503] * 6
    assert jetstream.reads == [200]  # six requests, one shared read (of the most recent)
    assert await statuses(app, [20]) == [503]  # a failure just now: not read again
    assert jetstream.reads == [200]
    jetstream.answering.set()
    await asyncio.sleep(0.4)  # past the failure's moment
    assert await statuses(app, [20, 20]) == [200, 200]
    assert jetstream.reads == [200, 200]  # read again once, for both


async def test_without_a_nats_connection_the_status_is_503_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, jetstream = app_with(monkeypatch, connected=False)
    assert await statuses(app, [20]) == [503]
    assert jetstream.reads == []


async def test_requests_for_every_recent_share_one_read_and_each_gets_as_many_items(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read per ``recent`` let anyone force a full JetStream read per request by counting
    ``?recent=1``, ``?recent=2``, …: now one read serves them all."""
    app, jetstream = app_with(monkeypatch)
    monkeypatch.setattr(ui, "_CACHE_SECONDS", 60.0)
    # Not about deadlines: the read of 200 items and 20 answers at once may take a while on
    # a loaded machine (0.5 s were past once in a full run).
    monkeypatch.setattr(ui, "_READ_SECONDS", 20.0)
    monkeypatch.setattr(ui, "_WAIT_SECONDS", 30.0)
    jetstream.answering.set()

    together, alone = list(range(1, 21)), [*range(21, 201, 7), 200]
    answered = await answers(app, together)
    answered += [(await answers(app, [recent]))[0] for recent in alone]

    assert jetstream.reads == [200]
    for recent, answer in zip([*together, *alone], answered, strict=True):
        assert answer.status_code == 200, answer.text
        document = answer.json()
        newest = list(range(1000, 1000 - recent, -1))
        assert [d["seq"] for d in document["dlq"]] == newest
        assert [r["seq"] for r in document["routes"]] == newest
        assert document["streams"] == []


async def test_a_read_past_its_deadline_says_nats_did_not_answer_within_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, _ = app_with(monkeypatch)  # the read gives up after 0.2 s, a request after 0.5 s

    (answer,) = await asyncio.wait_for(answers(app, [20]), 10)

    assert answer.status_code == 503
    assert answer.json() == {
        "error_code": "nats_unavailable",
        "message": "NATS did not answer the status reads within 0.2 s",
    }


async def test_a_request_that_waits_past_its_deadline_says_the_status_was_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, _ = app_with(monkeypatch)
    monkeypatch.setattr(ui, "_READ_SECONDS", 5.0)  # the request's wait ends first

    (answer,) = await asyncio.wait_for(answers(app, [20]), 10)

    assert answer.status_code == 503
    assert answer.json() == {
        "error_code": "nats_unavailable",
        "message": "the status was not read within 0.5 s (NATS slow or busy)",
    }


async def test_pages_of_two_tenants_each_read_their_own_document_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache held one tenant's document: pages of two tenants polling in turn read
    JetStream at every request, each putting the other's document out."""
    app, jetstream = app_with(monkeypatch)
    monkeypatch.setattr(ui, "_CACHE_SECONDS", 60.0)
    monkeypatch.setattr(ui, "_READ_SECONDS", 20.0)
    monkeypatch.setattr(ui, "_WAIT_SECONDS", 30.0)
    jetstream.answering.set()
    state = app.state.ingress
    for tenant in ("acme", "shop", "acme", "shop", "acme"):
        state.tenant = Tenant(tenant)
        assert await statuses(app, [20]) == [200]
    assert jetstream.reads == [200, 200]


class FailingForOne(JetStream):
    """``collect`` answering at once, except for ``failing``'s document, which it stalls
    past the read's deadline."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing
        self.tenants: list[str] = []
        self.answering.set()

    async def collect(self, nc: Any, **kwargs: Any) -> Status:
        tenant = kwargs["build"].tenant
        self.tenants.append(tenant)
        if tenant == self.failing:
            await asyncio.Event().wait()  # never answers: the read's deadline ends it
        return await super().collect(nc, **kwargs)


async def test_one_tenants_failed_read_leaves_another_tenants_status_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The moment a read failed was one for the whole cache: any tenant's page asking
    within it was answered 503 "could not be read a moment ago" for another tenant's
    failure, without its own document being read."""
    app, _ = app_with(monkeypatch)
    monkeypatch.setattr(ui, "_FAILURE_SECONDS", 60.0)  # acme's failure is recent throughout
    jetstream = FailingForOne("acme")
    monkeypatch.setattr(ui, "collect", jetstream.collect)
    state = app.state.ingress

    state.tenant = Tenant("acme")
    (failed,) = await asyncio.wait_for(answers(app, [20]), 10)
    assert failed.status_code == 503
    assert "did not answer" in failed.json()["message"]

    state.tenant = Tenant("shop")
    (answer,) = await asyncio.wait_for(answers(app, [20]), 10)
    assert answer.status_code == 200, answer.text
    assert jetstream.tenants == ["acme", "shop"]

    state.tenant = Tenant("acme")  # its own failure is still remembered
    (again,) = await asyncio.wait_for(answers(app, [20]), 10)
    assert again.status_code == 503
    assert "a moment ago" in again.json()["message"]
    assert jetstream.tenants == ["acme", "shop"]


def test_the_cache_holds_at_most_max_tenants_and_forgets_what_is_past() -> None:
    """Every tenant's failure is remembered on its own, so the entries are bounded: at most
    ``_MAX_TENANTS`` (the least recently written out first), and none once nothing in them
    is fresh or recent any more."""
    cache = ui._StatusCache()
    document = ui._Encoded.of({"streams": []})
    for n in range(3 * ui._MAX_TENANTS):
        cache.failed(f"t{n}", now=100.0)
    assert len(cache.entries) == ui._MAX_TENANTS
    newest = f"t{3 * ui._MAX_TENANTS - 1}"
    assert cache.failed_lately(newest, now=100.5)
    assert not cache.failed_lately("t0", now=100.5)  # forgotten: it is read again

    cache.keep("acme", document, read_at=200.0)  # long after: the failures are past
    assert list(cache.entries) == ["acme"]
    assert cache.fresh("acme", now=200.5) is document
    assert cache.fresh("acme", now=201.5) is None
