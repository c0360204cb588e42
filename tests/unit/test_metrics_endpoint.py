"""``/metrics`` of a worker or router started on its own, and the scrape token both it and
the ingress check."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError

from broker.settings import Settings
from broker.telemetry.endpoint import REQUEST_TIMEOUT_SECONDS, scrape_allowed, serve_metrics

pytestmark = pytest.mark.unit

TOKEN = "t0ken-for-prometheus"


@pytest.mark.parametrize(
    ("authorization", "allowed"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),  # the scheme is case-insensitive (RFC 9110)
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer wrong", False),
        (f"Bearer {TOKEN}x", False),
        (f"Basic {TOKEN}", False),
        (TOKEN, False),
    ],
)
def test_a_scrape_is_allowed_only_with_the_token(authorization: str | None, allowed: bool) -> None:
    assert scrape_allowed(TOKEN, authorization) is allowed


def test_an_empty_token_never_matches() -> None:
    """``BROKER_METRICS_TOKEN=`` (a secret that never arrived) is refused at start; the
    check itself lets nothing through with it either."""
    assert not scrape_allowed("", "Bearer")
    assert not scrape_allowed("", "Bearer ")


@pytest.mark.parametrize("value", ["", "   ", " padded", "two words"])
def test_a_token_no_header_could_carry_is_refused_at_start(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_METRICS_TOKEN", value)
    with pytest.raises(ValidationError, match="BROKER_METRICS_TOKEN"):
        Settings()


def test_without_a_token_every_scrape_is_allowed() -> None:
    assert scrape_allowed(None, None)
    assert scrape_allowed(None, "Bearer anything")


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = serve_metrics("127.0.0.1", 0, TOKEN)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_standalone_endpoint_asks_for_the_token(endpoint: str) -> None:
    refused = httpx.get(f"{endpoint}/metrics")
    assert refused.status_code == 401
    assert refused.json()["error_code"] == "unauthenticated"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert (
        httpx.get(f"{endpoint}/metrics", headers={"authorization": "Bearer no"}).status_code == 401
    )
    scraped = httpx.get(f"{endpoint}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert httpx.get(f"{endpoint}/healthz").status_code == 200  # liveness stays open


STALL_TIMEOUT = 0.5


@pytest.fixture
def stall_endpoint() -> Iterator[tuple[str, int]]:
    """The standalone endpoint with a short per-connection timeout."""
    server = serve_metrics("127.0.0.1", 0, request_timeout=STALL_TIMEOUT)
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _closed_within(conn: socket.socket, deadline_s: float) -> float:
    """Seconds until the server closes ``conn`` (reads EOF); fails past ``deadline_s``."""
    started = time.monotonic()
    conn.settimeout(deadline_s)
    try:
        while conn.recv(4096):  # the server sends nothing to a stalled request
            pass
    except TimeoutError:
        pytest.fail(f"the server kept a stalled connection open past {deadline_s} s")
    except ConnectionResetError:
        pass  # closed, with unread bytes: as good as EOF
    return time.monotonic() - started


@pytest.mark.parametrize("sent", [b"", b"GET /metr"], ids=["nothing", "half-a-request-line"])
def test_a_stalled_connection_is_closed_after_the_request_timeout(
    stall_endpoint: tuple[str, int], sent: bytes
) -> None:
    """A client that connects and sends nothing, or half a request line, does not pin a
    server thread forever: the connection is closed once the timeout passes."""
    with socket.create_connection(stall_endpoint) as conn:
        conn.sendall(sent)
        waited = _closed_within(conn, deadline_s=10 * STALL_TIMEOUT)
    assert waited >= STALL_TIMEOUT * 0.8


def test_a_scrape_is_answered_while_another_connection_stalls(
    stall_endpoint: tuple[str, int],
) -> None:
    host, port = stall_endpoint
    with socket.create_connection(stall_endpoint) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        scraped = httpx.get(f"http://{host}:{port}/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        _closed_within(stalled, deadline_s=10 * STALL_TIMEOUT)


def test_the_request_timeout_defaults_to_ten_seconds() -> None:
    server = serve_metrics("127.0.0.1", 0)
    try:
        assert server.RequestHandlerClass.timeout == REQUEST_TIMEOUT_SECONDS == 10.0
    finally:
        server.shutdown()
        server.server_close()
