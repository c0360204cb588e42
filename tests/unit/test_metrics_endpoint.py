"""``/metrics`` of a worker or router started on its own, and the scrape token both it and
the ingress check."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError

from broker.settings import Settings
from broker.telemetry.endpoint import scrape_allowed, serve_metrics

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
