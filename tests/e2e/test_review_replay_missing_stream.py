"""A replay of a stream that is not there (deleted by an operator, not yet made again by
``broker serve``). Its own module: it deletes a stream of the module's nats-server."""

from __future__ import annotations

import httpx
import pytest
from nats.js import JetStreamContext

pytestmark = pytest.mark.e2e


async def test_a_replay_of_a_missing_stream_is_503_not_an_internal_error(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """It was a 500 ``internal_error`` saying "JetStream refused the write: stream not found",
    for a read, with no Retry-After: clients (BrokerClient, ``broker replay``) gave up at
    once. It is now what ``/readyz`` says of it: unavailable until the stream is made again."""
    await js.delete_stream("AUDIT")
    r = await client.get("/v1/streams/AUDIT/messages")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error_code"] == "nats_unavailable"
    assert "AUDIT" in body["message"]
    assert "write" not in body["message"]
    assert r.headers.get("retry-after")
