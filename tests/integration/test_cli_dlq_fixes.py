"""``broker dlq replay`` against a real nats-server: running it twice for one DLQ entry
stores one copy; the second run names the first copy's sequence and exits 0."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from broker.settings import Settings
from broker.streams import Stream, provision

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def replay(nats_url: str, dlq_seq: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "dlq", "replay", str(dlq_seq), "--nats-url", nats_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_replaying_one_dead_letter_twice_stores_one_copy(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, Settings())
        event = await js.publish(
            "msg.default.orders",
            b'{"n": 1}',
            headers={"Content-Type": "application/json", "Nats-Msg-Id": "default:k1"},
        )
        # What a projection that gave up on the event leaves in the DLQ.
        dead = await js.publish(
            "dlq.MESSAGES.replica_messages",
            b'{"n": 1}',
            headers={
                "Content-Type": "application/json",
                "Broker-Dlq-Projection": "replica_messages",
                "Broker-Dlq-Error": "boom",
                "Broker-Dlq-Stream": "MESSAGES",
                "Broker-Dlq-Seq": str(event.seq),
                "Broker-Dlq-Subject": "msg.default.orders",
                "Nats-Msg-Id": f"dlq:replica_messages:MESSAGES:{event.seq}",
            },
        )

        first = await asyncio.to_thread(replay, nats_url, dead.seq)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == f"replayed as seq {event.seq + 1}"
        second = await asyncio.to_thread(replay, nats_url, dead.seq)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == f"already replayed as seq {event.seq + 1}"

        info = await js.stream_info(Stream.MESSAGES)
        assert (info.state.last_seq, info.state.messages) == (event.seq + 1, 2)
        copy = await js.get_msg(Stream.MESSAGES, event.seq + 1)
        assert copy.data == b'{"n": 1}'
        headers = copy.headers or {}
        assert headers["Nats-Msg-Id"] == f"dlq-replay:{dead.seq}"
        assert headers["Broker-Replayed-From-Dlq"] == str(dead.seq)
        assert headers["Content-Type"] == "application/json"
        assert not any(name.startswith("Broker-Dlq-") for name in headers)
    finally:
        await nc.close()
