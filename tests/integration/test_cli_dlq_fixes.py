"""``broker dlq replay`` against a real nats-server: running it twice for one DLQ entry
stores one copy; the second run names the first copy's sequence and exits 0."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nats
import pytest

from broker.natsconn import get_stored
from broker.routing.events import RouteDecided
from broker.settings import Settings
from broker.streams import Stream, dlq_subject, provision
from tests.unit.test_routing_plumbing import _decision

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


async def test_a_dead_letter_with_headers_beyond_ascii_replays_as_it_was_stored(
    nats_url: str,
) -> None:
    """nats-py reads a message got by sequence with :mod:`email`'s parser, which made every
    value beyond ASCII an ``email.header.Header`` of mangled bytes: a routed message whose
    agents' error (quoted in the decision's ``Broker-Route``) was German could not be
    replayed (``bad Broker-Route record``), and a Chinese ``Broker-Intent`` would have been
    stored again garbled."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, Settings())
        decision = replace(_decision(None), detail="agent 'ocr' failed (error: Übersetzung ✗)")
        route = RouteDecided("default", 7, "msg.default.scans", decision, attempt=2)
        intent = "翻译这封信 — naïve"
        headers = route.to_headers({"Content-Type": "text/plain", "Broker-Intent": intent})
        dead = await js.publish(dlq_subject("default"), b"scan me", headers=headers)

        done = await asyncio.to_thread(replay, nats_url, dead.seq)
        assert done.returncode == 0, done.stderr
        copy = await get_stored(js, Stream.MESSAGES, int(done.stdout.split()[-1]))
        assert (copy.subject, copy.data) == ("msg.default.scans", b"scan me")
        assert (copy.headers or {})["Broker-Intent"] == intent
        assert (copy.headers or {})["Broker-Route-Mode"] == "auto"
    finally:
        await nc.close()
