"""A replay's ``subject`` filter: what NATS reads as a wildcard, or a 422."""

from __future__ import annotations

import uuid

import httpx
import orjson
import pytest
from nats.js import JetStreamContext

pytestmark = pytest.mark.e2e

REPLAY = "/v1/streams/MESSAGES/messages"


@pytest.mark.parametrize("pattern", ["{topic}.creat*", "{topic}.*ed", "{topic}.c*d", "{topic}**"])
async def test_a_star_inside_a_token_is_refused_not_an_empty_replay(
    client: httpx.AsyncClient, js: JetStreamContext, pattern: str
) -> None:
    """NATS takes ``*`` as a wildcard only as a whole token: ``orders.creat*`` matched no
    stored subject (no subject holds a ``*``), so an auditor looking for ``orders.created``
    that way was answered 200 with nothing, as if there were no such events."""
    topic = f"filters{uuid.uuid4().hex[:8]}"
    await js.publish(f"msg.default.{topic}.created", b'{"n": 1}')
    r = await client.get(REPLAY, params={"subject": pattern.format(topic=topic)})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_code"] == "unprocessable"
    assert "*" in body["message"]


@pytest.mark.parametrize("pattern", ["{topic}.*", "*.created", "{topic}.>", "*.*", ">"])
async def test_whole_token_wildcards_still_match(
    client: httpx.AsyncClient, js: JetStreamContext, pattern: str
) -> None:
    topic = f"filters{uuid.uuid4().hex[:8]}"
    ack = await js.publish(f"msg.default.{topic}.created", b'{"n": 1}')
    r = await client.get(
        REPLAY, params={"subject": pattern.format(topic=topic), "start_seq": ack.seq, "limit": 1}
    )
    assert r.status_code == 200, r.text
    assert orjson.loads(r.text)["seq"] == ack.seq
