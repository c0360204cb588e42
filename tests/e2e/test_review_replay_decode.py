"""With ``decode=json``, a message that cannot be decoded is one record with its
``decode_error``: the replay goes on past it."""

from __future__ import annotations

import uuid

import httpx
import orjson
import pytest
from nats.js import JetStreamContext

pytestmark = pytest.mark.e2e

REPLAY = "/v1/streams/MESSAGES/messages"


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
async def test_a_schema_id_header_too_long_to_read_is_a_decode_error_not_a_failed_replay(
    client: httpx.AsyncClient, js: JetStreamContext, accept: str
) -> None:
    """A ``Broker-Schema-Id`` of more than 4,300 digits (stored by any NATS client that may
    write the stream, e.g. an agent's ``.failed`` in ROUTES) is more than Python's ``int()``
    reads: the decoded replay answered 500 (or was cut off, when the message came after the
    first batch) at every try, so nothing past that message could be replayed decoded."""
    subject = f"decode.{uuid.uuid4().hex[:8]}"
    json_headers = {"Content-Type": "application/json"}
    hostile = {"Content-Type": "application/avro", "Broker-Schema-Id": "9" * 5000}
    await js.publish(f"msg.default.{subject}", b'{"n": 1}', headers=json_headers)
    bad = await js.publish(f"msg.default.{subject}", b"\x02\x04", headers=hostile)
    await js.publish(f"msg.default.{subject}", b'{"n": 3}', headers=json_headers)
    r = await client.get(
        REPLAY, params={"subject": subject, "decode": "json"}, headers={"accept": accept}
    )
    assert r.status_code == 200, r.text
    if accept == "text/event-stream":
        lines = [event.split("\ndata: ", 1)[1] for event in r.text.split("\n\n") if event]
    else:
        lines = r.text.splitlines()
    records = [orjson.loads(line) for line in lines]
    assert [record.get("value") for record in records] == [{"n": 1}, None, {"n": 3}]
    assert records[1]["seq"] == bad.seq
    assert "Broker-Schema-Id" in records[1]["decode_error"]
