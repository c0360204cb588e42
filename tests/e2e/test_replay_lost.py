"""Replay of records that are gone: a start below the stream's first sequence is said.

Records age out (a stream's max age or max messages) or are purged; a replay asked to
start before the stream's first sequence used to answer from that first sequence on, with
no word that the records in between were gone, and a client paging through a stream lost
what aged out between two pages as silently. The answer now carries
``Broker-Stream-First-Seq``; the client reports a start below it (``RecordsLost``), and
``broker replay`` warns on stderr (or fails with ``--strict``).

The tests purge MESSAGES up to a sequence (``js.purge_stream(seq=...)``), which moves the
stream's first sequence as aging out does. They use this module's own broker and
nats-server (tests/e2e/conftest.py), so no other module's messages are purged.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from nats.js import JetStreamContext

from broker.client import BrokerClient, RecordsLost
from tests.e2e._broker import BrokerProcess

pytestmark = pytest.mark.e2e

REPLAY = "/v1/streams/MESSAGES/messages"
FIRST_SEQ = "Broker-Stream-First-Seq"


def fresh_subject() -> str:
    return f"lost.{uuid.uuid4().hex[:8]}"


async def publish(client: BrokerClient, subject: str, n: int) -> list[int]:
    return [(await client.publish(subject, {"n": i})).seq for i in range(n)]


async def purge_before(js: JetStreamContext, seq: int) -> None:
    """Every MESSAGES record before ``seq`` gone, as if it had aged out."""
    await js.purge_stream("MESSAGES", seq=seq)
    assert (await js.stream_info("MESSAGES")).state.first_seq == seq


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "replay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
async def test_a_replay_answer_carries_the_stream_first_seq(
    broker: BrokerProcess, client: httpx.AsyncClient, js: JetStreamContext, accept: str
) -> None:
    """NDJSON and SSE answers alike say where the stream begins now: a client asking from
    before it can tell that the records in between are gone."""
    subject = fresh_subject()
    async with BrokerClient(broker.base_url) as broker_client:
        seqs = await publish(broker_client, subject, 6)
    await purge_before(js, seqs[3])
    params = {"start_seq": str(seqs[0]), "subject": subject}
    r = await client.get(REPLAY, params=params, headers={"accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers[FIRST_SEQ] == str(seqs[3])
    assert r.headers["Broker-Stream-Last-Seq"] == str(seqs[5])
    if accept == "application/x-ndjson":
        assert [orjson.loads(line)["seq"] for line in r.text.splitlines()] == seqs[3:]
    else:
        assert [int(line[4:]) for line in r.text.splitlines() if line.startswith("id: ")] == (
            seqs[3:]
        )


async def test_the_client_reports_records_lost_before_its_start_seq(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """``start_seq`` below the stream's first sequence: the records that are left come, and
    ``on_lost`` is told once, before them, what was asked and where the stream begins."""
    subject = fresh_subject()
    said: list[RecordsLost | int] = []
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 6)
        await purge_before(js, seqs[3])
        async for message in client.replay(subject=subject, start_seq=seqs[0], on_lost=said.append):
            said.append(message.seq)
    assert said == [RecordsLost("MESSAGES", seqs[0], seqs[3]), *seqs[3:]]
    assert str(said[0]) == (
        f"replay of MESSAGES from seq {seqs[0]}: records before seq {seqs[3]} aged out or "
        "were purged (some may have been in range)"
    )


async def test_the_client_reports_records_that_aged_out_between_pages(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """Records gone while the previous page was read: the next page's start (last seq + 1)
    is below the stream's first sequence, and that is reported, not skipped in silence."""
    subject = fresh_subject()
    lost: list[RecordsLost] = []
    got: list[int] = []
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 12)
        async for message in client.replay(
            subject=subject, start_seq=seqs[0], page=4, on_lost=lost.append
        ):
            got.append(message.seq)
            if message.seq == seqs[3]:  # the first page's last record
                await purge_before(js, seqs[8])
    assert got == seqs[:4] + seqs[8:]
    assert lost == [RecordsLost("MESSAGES", seqs[4], seqs[8])]


async def test_without_on_lost_the_client_logs_a_warning(
    broker: BrokerProcess, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that passed no ``on_lost`` still hears of the loss: a warning of the
    ``broker.client`` logger (on stderr where logging is not configured)."""
    subject = fresh_subject()
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 4)
        await purge_before(js, seqs[2])
        with caplog.at_level(logging.WARNING, logger="broker.client"):
            got = [m.seq async for m in client.replay(subject=subject, start_seq=seqs[0])]
    assert got == seqs[2:]
    warnings = [r for r in caplog.records if r.name == "broker.client"]
    assert [(r.levelno, r.getMessage()) for r in warnings] == [
        (
            logging.WARNING,
            f"replay of MESSAGES from seq {seqs[0]}: records before seq {seqs[2]} aged out "
            "or were purged (some may have been in range)",
        )
    ]


async def test_nothing_is_reported_when_nothing_was_lost(
    broker: BrokerProcess, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A start at or after the stream's first sequence, no start, or a time, and pages of a
    filtered replay whose sequences leave gaps (another subject's messages between): every
    record asked for is read, and nothing is reported or logged."""
    subject, other = fresh_subject(), fresh_subject()
    lost: list[RecordsLost] = []
    async with BrokerClient(broker.base_url) as client:
        await publish(client, subject, 2)
        ours: list[int] = []
        for _ in range(5):  # ours and another subject's, in turn: gaps in what we read
            ours += await publish(client, subject, 1)
            await publish(client, other, 1)
        await purge_before(js, ours[0])
        since = datetime.fromtimestamp(0, UTC)
        for start_seq, want in [(ours[0], ours), (ours[1], ours[1:]), (None, ours)]:
            replay = client.replay(
                subject=subject, start_seq=start_seq, page=2, on_lost=lost.append
            )
            assert [m.seq async for m in replay] == want
        replay = client.replay(subject=subject, since=since, page=2, on_lost=lost.append)
        assert [m.seq async for m in replay] == ours
        with caplog.at_level(logging.WARNING, logger="broker.client"):
            assert [m.seq async for m in client.replay(subject=subject, start_seq=ours[0])] == (
                ours
            )
    assert lost == []
    assert [r for r in caplog.records if r.name == "broker.client"] == []


async def test_cli_replay_warns_on_stderr_of_records_lost(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """``broker replay`` says on stderr that records before the stream's first sequence are
    gone, keeps stdout to the records (each line one JSON record) and exits 0; from the
    first sequence on, it says nothing."""
    subject = fresh_subject()
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 5)
    await purge_before(js, seqs[2])
    args = ("MESSAGES", "--subject", subject, "--url", broker.base_url)
    lossy = cli(*args, "--from-seq", str(seqs[0]))
    assert lossy.returncode == 0, lossy.stderr
    assert [orjson.loads(line)["seq"] for line in lossy.stdout.splitlines()] == seqs[2:]
    assert lossy.stderr.splitlines() == [
        f"warning: replay of MESSAGES from seq {seqs[0]}: records before seq {seqs[2]} aged "
        "out or were purged (some may have been in range)"
    ]
    whole = cli(*args, "--from-seq", str(seqs[2]))
    assert whole.returncode == 0, whole.stderr
    assert [orjson.loads(line)["seq"] for line in whole.stdout.splitlines()] == seqs[2:]
    assert whole.stderr == ""


async def test_cli_replay_strict_fails_on_records_lost_and_leaves_the_file(
    broker: BrokerProcess, js: JetStreamContext, tmp_path: Path
) -> None:
    """``--strict``: records lost are an error (exit 1), and a ``--to`` file stays as it
    was, not replaced by an export with a hole in it; with nothing lost it writes as ever."""
    subject = fresh_subject()
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 4)
    await purge_before(js, seqs[1])
    out = tmp_path / "audit.ndjson"
    out.write_text("kept\n")
    args = ("MESSAGES", "--subject", subject, "--url", broker.base_url, "--to", str(out))
    failed = cli(*args, "--from-seq", str(seqs[0]), "--strict")
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert f"error: replay of MESSAGES from seq {seqs[0]}: records before seq {seqs[1]}" in (
        failed.stderr
    )
    assert out.read_text() == "kept\n"
    done = cli(*args, "--from-seq", str(seqs[1]), "--strict")
    assert done.returncode == 0, done.stderr
    assert [orjson.loads(line)["seq"] for line in out.read_text().splitlines()] == seqs[1:]
