"""Header values the broker cannot read are refused by the client before it sends anything:
``BadRequest`` naming the header, as the broker answers for a header it reads."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from broker.client import BrokerClient
from broker.embedded import NatsServer
from broker.errors import BadRequest
from tests.e2e._broker import BrokerProcess, stored_count

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("call", "options", "header"),
    [
        ("publish", {"headers": {"X-Note": "café"}}, "x-note"),
        ("publish", {"key": "clé-1"}, "idempotency-key"),
        ("publish", {"content_type": "text/plain; note=é"}, "content-type"),
        ("publish", {"headers": {"x-note": "two\nlines"}}, "x-note"),
        ("route", {"intent": "résumé"}, "broker-intent"),
        ("route", {"headers": {"x-note": "日本"}}, "x-note"),
        ("request", {"env": "cañary", "timeout": 1}, "x-env"),
    ],
)
async def test_a_header_value_outside_visible_ascii_is_refused_before_sending(
    broker: BrokerProcess,
    module_nats: NatsServer,
    call: str,
    options: dict[str, Any],
    header: str,
) -> None:
    """Not httpx's UnicodeEncodeError from deep inside: BadRequest naming the header, and
    nothing stored (the broker's server would have dropped an ``x-note`` it cannot read
    and stored the message)."""
    subject = f"client.header.{uuid.uuid4().hex[:6]}"
    async with BrokerClient(broker.base_url) as client:
        with pytest.raises(BadRequest) as raised:
            await getattr(client, call)(subject, "hello", **options)
    assert f"header {header!r}" in str(raised.value)
    assert raised.value.status == 400
    assert await stored_count(module_nats.url, f"msg.default.{subject}") == 0


@pytest.mark.parametrize(
    ("options", "header"),
    [
        ({"tenant": "café"}, "broker-tenant"),
        ({"api_key": "clé"}, "authorization"),
        ({"headers": {"x-client": "naïve"}}, "x-client"),
        ({"headers": {"x-nöte": "ok"}}, "x-nöte"),
    ],
)
def test_a_client_header_the_broker_cannot_read_is_refused_at_construction(
    options: dict[str, Any], header: str
) -> None:
    """A tenant, key or client-wide header is checked once, when the client is made; the
    message names the header, never the value (it may be a credential)."""
    with pytest.raises(BadRequest) as raised:
        BrokerClient("http://127.0.0.1:1", **options)
    assert repr(header) in str(raised.value)
    assert "clé" not in str(raised.value)


async def test_the_broker_answers_a_header_it_cannot_read_with_the_same_error(
    broker: BrokerProcess,
) -> None:
    """Sent anyway (UTF-8 bytes, past the client's check), an ``Idempotency-Key`` outside
    visible ASCII is the broker's 400 ``bad_request``: the class the client raises."""
    async with httpx.AsyncClient(base_url=broker.base_url, http1=False, http2=True) as http:
        answer = await http.post(
            "/v1/publish/client.header.raw",
            content=b"x",
            headers=[(b"content-type", b"text/plain"), (b"idempotency-key", "clé".encode())],
        )
    assert answer.status_code == 400
    assert answer.json()["error_code"] == BadRequest.error_code
