"""``BROKER_METRICS=false`` turns ``/metrics`` off: a scrape is told so (404), instead of a
200 whose every value reads zero, which a dashboard shows as a broker with no traffic."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from broker.errors import BrokerError
from broker.http import ui
from broker.settings import Settings
from broker.telemetry import metrics

pytestmark = pytest.mark.unit


@pytest.fixture
def metrics_off() -> Iterator[None]:
    was = metrics.enabled()
    metrics.set_enabled(False)
    yield
    metrics.set_enabled(was)


def app(token: str | None = None) -> FastAPI:
    state: Any = SimpleNamespace(
        settings=Settings(metrics_token=SecretStr(token) if token else None),
    )
    application = FastAPI()
    application.include_router(ui.ops_router(state))

    @application.exception_handler(BrokerError)
    async def refused(_: Request, e: BrokerError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.status)

    return application


async def scrape(application: FastAPI, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        return await client.get("/metrics", headers=headers)


@pytest.mark.usefixtures("metrics_off")
async def test_metrics_turned_off_answer_404_not_a_page_of_zeros() -> None:
    answer = await scrape(app())

    assert answer.status_code == 404, answer.text[:300]
    assert answer.json()["error_code"] == "not_found"
    assert "BROKER_METRICS" in answer.json()["message"]


@pytest.mark.usefixtures("metrics_off")
async def test_metrics_turned_off_still_ask_a_stranger_for_the_token_first() -> None:
    answer = await scrape(app(token="scrape-token"))

    assert answer.status_code == 401


async def test_metrics_turned_on_answer_the_prometheus_text() -> None:
    assert metrics.enabled()

    answer = await scrape(app())

    assert answer.status_code == 200
    assert "broker_jetstream_ack_duration_seconds" in answer.text


@pytest.mark.usefixtures("metrics_off")
def test_a_standalone_endpoint_with_metrics_off_answers_404() -> None:
    """``broker worker --metrics-port`` with ``BROKER_METRICS=false`` says so, like the
    ingress, instead of a page of zeros."""
    from broker.telemetry.endpoint import serve_metrics

    server = serve_metrics("127.0.0.1", 0)
    try:
        answer = httpx.get(f"http://127.0.0.1:{server.server_address[1]}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert answer.status_code == 404
    assert answer.json()["error_code"] == "not_found"
    assert "BROKER_METRICS" in answer.json()["message"]
