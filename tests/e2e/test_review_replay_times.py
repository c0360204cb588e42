"""A replay record's ``time`` is a time the replay can start from, that record included."""

from __future__ import annotations

import uuid

import httpx
import orjson
import pytest
from nats.js import JetStreamContext

pytestmark = pytest.mark.e2e

REPLAY = "/v1/streams/MESSAGES/messages"


async def test_a_replay_from_a_records_own_time_starts_at_that_record(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """NATS stores a message's time in nanoseconds; the record showed it rounded to the
    nearest microsecond, up about half of the time, past the message. An auditor replaying
    "from the time of this event" (``start_time`` = the record's ``time``) then got the
    events after it, without it (or nothing, for the last one)."""
    subject = f"times.{uuid.uuid4().hex[:8]}"
    for i in range(20):
        await js.publish(f"msg.default.{subject}", b'{"n": %d}' % i)
    r = await client.get(REPLAY, params={"subject": subject})
    assert r.status_code == 200, r.text
    records = [orjson.loads(line) for line in r.text.splitlines()]
    assert len(records) == 20
    started_at = []
    for record in records:
        r = await client.get(
            REPLAY, params={"subject": subject, "start_time": record["time"], "limit": 1}
        )
        assert r.status_code == 200, r.text
        started_at.append(orjson.loads(r.text)["seq"] if r.text else None)
    assert started_at == [record["seq"] for record in records]
