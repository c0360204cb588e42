"""A subject that is not UTF-8, stored by nats-server from a raw client, read by the broker.

nats-server takes any bytes for a subject; nats-py's own client raises on such a subject in
its read loop, which then stops without a word: the connection stays open, and every later
fetch times out. The broker's :class:`~broker.natsconn.Client` reads it with U+FFFD.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest
import sqlalchemy as sa

from broker.natsconn import open_client
from broker.settings import Settings
from broker.streams import provision
from tests._wait import wait_for

pytestmark = pytest.mark.integration

BAD_SUBJECT = b"msg.default.bad\xff\xfe"


def publish_raw(nats_url: str, subject: bytes, payload: bytes) -> None:
    """Publish with the bare protocol, as any client allowed on ``msg.>`` may."""
    host, port = nats_url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.recv(4096)  # INFO
        raw.sendall(
            b'CONNECT {"verbose":false,"pedantic":false}\r\n'
            + b"PUB "
            + subject
            + b" %d\r\n" % len(payload)
            + payload
            + b"\r\nPING\r\n"
        )
        answer = b""
        while b"PONG" not in answer:
            answer += raw.recv(4096)
        assert b"-ERR" not in answer, answer


async def stored_with_a_bad_subject(nats_url: str) -> None:
    """MESSAGES holds: one good message, the bad one, five good ones."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await provision(js, Settings())
    await js.publish("msg.default.before", b"{}")
    await nc.flush()
    publish_raw(nats_url, BAD_SUBJECT, b"{}")
    for n in range(5):
        await js.publish(f"msg.default.after{n}", b"{}")
    assert (await js.stream_info("MESSAGES")).state.messages == 7
    await nc.close()


async def test_a_consumer_reads_past_a_subject_that_is_not_utf8(nats_url: str) -> None:
    await stored_with_a_bad_subject(nats_url)
    nc = await open_client(servers=[nats_url])
    try:
        sub = await nc.jetstream().pull_subscribe("msg.>", durable="reader", stream="MESSAGES")
        subjects: list[str] = []
        while len(subjects) < 7:
            for message in await sub.fetch(7 - len(subjects), timeout=5):
                subjects.append(message.subject)
                await message.ack()
        assert subjects[1] == "msg.default.bad\ufffd\ufffd"
        assert subjects[2:] == [f"msg.default.after{n}" for n in range(5)]
        assert nc.is_connected
        await asyncio.wait_for(nc.flush(), 5)  # the read loop still answers
    finally:
        await nc.close()


def test_a_projection_worker_applies_every_message_around_it(nats_url: str, tmp_path: Path) -> None:
    """The replica gets all seven rows; before, it stopped at the first, while the worker's
    lag gauge said it had caught up."""
    asyncio.run(stored_with_a_bad_subject(nats_url))
    database = tmp_path / "replica.db"
    command = [sys.executable, "-m", "broker", "worker", "--nats-url", nats_url]
    command += ["--replica-url", f"sqlite:///{database}", "--projection", "replica_messages"]
    command += ["--data-dir", str(tmp_path), "--metrics-port", "0"]
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine = sa.create_engine(f"sqlite:///{database}")

    def rows() -> list[str]:
        try:
            with engine.connect() as db:
                query = sa.text("SELECT subject FROM replica_messages ORDER BY seq")
                return [str(subject) for (subject,) in db.execute(query)]
        except sa.exc.OperationalError:  # not created yet
            return []

    try:
        assert wait_for(lambda: len(rows()) == 7 or worker.poll() is not None, timeout=30)
        assert worker.poll() is None
        assert rows() == ["before", "bad\ufffd\ufffd", *(f"after{n}" for n in range(5))]
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
        engine.dispose()
    assert b"Traceback" not in err, err.decode(errors="replace")[-2000:]
