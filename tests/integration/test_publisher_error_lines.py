"""While NATS is away the publisher retries every 0.25 s; each failed attempt used to be a
``nats_error`` warning (about four a second from every ingress worker and router). One line
per error text every 10 s now, with how many were held back."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from broker.embedded import NatsServer, free_port
from broker.publisher import Publisher

pytestmark = pytest.mark.integration


async def test_an_outage_is_one_error_line_per_text_not_one_per_attempt() -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens
    publisher = Publisher([url], name="error-lines")
    with capture_logs() as logs:
        publisher.start()
        try:
            await asyncio.sleep(2.5)  # some ten attempts
        finally:
            await publisher.close()
    errors = [e for e in logs if e["event"] == "nats_error"]
    assert len(errors) == 1, errors
    assert errors[0]["repeated"] == 0
    assert "127.0.0.1" in errors[0]["error"]


async def test_another_error_text_is_logged_at_once(nats_server: NatsServer) -> None:
    """A failure of another kind is not held back by the throttle of the first."""
    publisher = Publisher([nats_server.url], name="error-lines-2")
    with capture_logs() as logs:
        publisher.start()
        try:
            assert await publisher.wait_connected(10)
            await publisher._on_error(ConnectionRefusedError("first"))
            await publisher._on_error(ConnectionRefusedError("first"))
            await publisher._on_error(TimeoutError())
        finally:
            await publisher.close()
    lines = [e["error"] for e in logs if e["event"] == "nats_error"]
    assert len(lines) == 2, lines
    assert "first" in lines[0]
    assert "did not answer" in lines[1]
