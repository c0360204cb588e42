"""The fault suite's stream audit itself: what it counts, against one real nats-server."""

from __future__ import annotations

import nats
import orjson
import pytest

from broker.settings import Settings
from broker.streams import Stream, provision
from tests.faults._audit import audit_stream

pytestmark = pytest.mark.faults


async def test_a_payload_no_client_sent_is_reported_with_its_sequence(nats_url: str) -> None:
    """A stored message that is not a scenario client's JSON is listed (sequence, key, first
    bytes), beside the losses and duplicates counted over the rest, instead of ending the
    audit with a decode error that names no message."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, Settings())
        subject = "msg.default.audit"
        sent = [
            ("a", orjson.dumps({"id": "a"})),
            ("b", b"\x00not json"),
            ("c", orjson.dumps({"id": "a"})),  # a second message with payload id "a"
        ]
        acked = {}
        for key, payload in sent:  # stored as the ingress stores them: <tenant>:<key>
            ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": f"default:{key}"})
            assert ack.stream == Stream.MESSAGES
            acked[key] = ack.seq
    finally:
        await nc.close()

    audit = await audit_stream(nats_url, {**acked, "lost": 99})

    assert audit.messages == 3
    assert audit.undecodable == [(2, "b", b"\x00not json")]
    assert audit.duplicate_ids == {"a": 2}
    assert audit.lost == ["lost"]
