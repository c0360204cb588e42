"""Replay of records that are gone: a start below the stream's first sequence is said.

Records age out (a stream's max age or max messages) or are purged; a replay asked to
start before the stream's first sequence used to answer from that first sequence on, with
no word that the records in between were gone, and a client paging through a stream lost
what aged out between two pages as silently. The answer now carries
``Broker-Stream-First-Seq`` and ``Broker-Stream-First-Time``; the client reports a start
below the first sequence, a replay from the start of a stream whose first sequence is above
1, and one from a time not after its first record's (``RecordsLost``), and ``broker
replay`` warns on stderr (or fails with ``--strict``).

The tests purge MESSAGES up to a sequence (``js.purge_stream(seq=...)``), which moves the
stream's first sequence as aging out does. They use this module's own broker and
nats-server (tests/e2e/conftest.py), so no other module's messages are purged; the test of
a stream nothing was removed from starts a broker of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from nats.js import JetStreamContext

from broker.client import BrokerClient, RecordsLost
from broker.embedded import NatsServer, ServerSpec
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e

REPLAY = "/v1/streams/MESSAGES/messages"
FIRST_SEQ = "Broker-Stream-First-Seq"
FIRST_TIME = "Broker-Stream-First-Time"
TICK = timedelta(microseconds=1)


def fresh_subject() -> str:
    return f"lost.{uuid.uuid4().hex[:8]}"


async def publish(client: BrokerClient, subject: str, n: int) -> list[int]:
    return [(await client.publish(subject, {"n": i})).seq for i in range(n)]


async def purge_before(js: JetStreamContext, seq: int) -> None:
    """Every MESSAGES record before ``seq`` gone, as if it had aged out."""
    await js.purge_stream("MESSAGES", seq=seq)
    assert (await js.stream_info("MESSAGES")).state.first_seq == seq


async def stored_time(client: BrokerClient, subject: str, seq: int) -> datetime:
    """The ``time`` a replay gives the record ``seq`` (to the microsecond, cut)."""
    async with contextlib.aclosing(client.replay(subject=subject, start_seq=seq, page=1)) as it:
        message = await anext(it)
    assert message.seq == seq
    assert message.time is not None
    return message.time


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
        records = [orjson.loads(line) for line in r.text.splitlines()]
    else:
        lines = r.text.splitlines()
        records = [orjson.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert [int(line[4:]) for line in lines if line.startswith("id: ")] == seqs[3:]
    assert [record["seq"] for record in records] == seqs[3:]
    # The first record's time, written as the record writes it (to the microsecond, cut):
    # a client compares its start_time with it exactly.
    assert r.headers[FIRST_TIME] == records[0]["time"]


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
    """A start at or after the stream's first sequence, or a time after its first record's,
    and pages of a filtered replay whose sequences leave gaps (another subject's messages
    between): every record asked for is read, and nothing is reported or logged."""
    subject, other = fresh_subject(), fresh_subject()
    lost: list[RecordsLost] = []
    async with BrokerClient(broker.base_url) as client:
        await publish(client, subject, 2)
        ours: list[int] = []
        for _ in range(5):  # ours and another subject's, in turn: gaps in what we read
            ours += await publish(client, subject, 1)
            await publish(client, other, 1)
        await purge_before(js, ours[0])
        for start_seq, want in [(ours[0], ours), (ours[1], ours[1:])]:
            replay = client.replay(
                subject=subject, start_seq=start_seq, page=2, on_lost=lost.append
            )
            assert [m.seq async for m in replay] == want
        since = await stored_time(client, subject, ours[1])  # after the first record's
        replay = client.replay(subject=subject, since=since, page=2, on_lost=lost.append)
        assert [m.seq async for m in replay] == ours[1:]
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


async def test_a_replay_from_the_start_reports_every_record_gone(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """No start is the whole stream, from seq 1: with the stream's first sequence above 1,
    records before it are gone (some may have been the caller's), and that is said once,
    before the records that are left."""
    subject = fresh_subject()
    said: list[RecordsLost | int] = []
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 4)
        await purge_before(js, seqs[2])
        async for message in client.replay(subject=subject, page=1, on_lost=said.append):
            said.append(message.seq)
    assert said == [RecordsLost("MESSAGES", 1, seqs[2]), *seqs[2:]]
    assert str(said[0]) == (
        f"replay of MESSAGES from seq 1: records before seq {seqs[2]} aged out or were "
        "purged (some may have been in range)"
    )


async def test_a_replay_since_a_time_reports_records_lost_unless_after_the_first_record(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """Records before the stream's first sequence were stored at or before its first
    record's time: a ``since`` at that time (to the microsecond, as the record gives it) or
    before it may have asked for some of them, and that is said; one a microsecond after
    it asked for none, and nothing is."""
    subject = fresh_subject()
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 4)
        await purge_before(js, seqs[2])
        first = await stored_time(client, subject, seqs[2])
        for since, want, gone in [
            (first - TICK, seqs[2:], True),
            (first, seqs[2:], True),
            (first + TICK, seqs[3:], False),
        ]:
            lost: list[RecordsLost] = []
            replay = client.replay(subject=subject, since=since, on_lost=lost.append)
            assert [m.seq async for m in replay] == want, since
            assert lost == ([RecordsLost("MESSAGES", None, seqs[2], since)] if gone else [])
    assert str(RecordsLost("MESSAGES", None, seqs[2], first)) == (
        f"replay of MESSAGES from {first.isoformat()}: records before seq {seqs[2]} aged "
        "out or were purged (some may have been in range)"
    )


async def test_with_no_record_left_a_time_is_compared_with_the_last_ones(
    broker: BrokerProcess, client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """A stream purged (or aged out) to its end holds no first record: every record gone
    was stored at or before the last one, whose time the answer gives then. A ``since`` at
    it reports the loss, one after it does not, and a replay from the start does."""
    subject = fresh_subject()
    async with BrokerClient(broker.base_url) as broker_client:
        seqs = await publish(broker_client, subject, 2)
        last = await stored_time(broker_client, subject, seqs[1])
        await js.purge_stream("MESSAGES")
        state = (await js.stream_info("MESSAGES")).state
        assert (state.messages, state.first_seq) == (0, seqs[1] + 1)
        r = await client.get(REPLAY, params={"subject": subject})
        assert (r.status_code, r.text) == (200, "")
        assert r.headers[FIRST_TIME] == last.isoformat()
        for since, gone in [(last, True), (last + TICK, False), (None, True)]:
            lost: list[RecordsLost] = []
            replay = broker_client.replay(subject=subject, since=since, on_lost=lost.append)
            assert [m.seq async for m in replay] == []
            start = 1 if since is None else None
            want = [RecordsLost("MESSAGES", start, seqs[1] + 1, since)] if gone else []
            assert lost == want, since


async def test_cli_replay_warns_of_records_lost_since_a_time_or_from_the_start(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """``broker replay --since`` (at or before the stream's first record) and ``broker
    replay`` with no start warn on stderr, or fail with ``--strict``; a ``--since`` after
    the first record says nothing, ``--strict`` or not."""
    subject = fresh_subject()
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish(client, subject, 3)
        await purge_before(js, seqs[1])
        first = await stored_time(client, subject, seqs[1])
    args = ("MESSAGES", "--subject", subject, "--url", broker.base_url)
    gone = "aged out or were purged (some may have been in range)"
    for start, said in [
        (("--since", first.isoformat()), first.isoformat()),
        ((), "seq 1"),
    ]:
        warned = cli(*args, *start)
        assert warned.returncode == 0, warned.stderr
        assert [orjson.loads(line)["seq"] for line in warned.stdout.splitlines()] == seqs[1:]
        assert warned.stderr.splitlines() == [
            f"warning: replay of MESSAGES from {said}: records before seq {seqs[1]} {gone}"
        ]
        failed = cli(*args, *start, "--strict")
        assert failed.returncode == 1, failed.stderr
        assert f"error: replay of MESSAGES from {said}: records before seq {seqs[1]}" in (
            failed.stderr
        )
    later = cli(*args, "--since", (first + TICK).isoformat(), "--strict")
    assert later.returncode == 0, later.stderr
    assert [orjson.loads(line)["seq"] for line in later.stdout.splitlines()] == seqs[2:]
    assert later.stderr == ""


@pytest.fixture
def untouched_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker on its own nats-server: nothing was ever removed from its streams."""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats")).start()
    try:
        (tmp_path / "broker").mkdir()
        process = start_broker(tmp_path / "broker", nats_url=server.url)
        try:
            yield process
        finally:
            process.stop()
    finally:
        server.stop()


async def test_a_stream_nothing_was_removed_from_reports_no_loss(
    untouched_broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """First sequence 1: the answer says so, with its first record's time, and a replay
    from the start, or since a time before every record, reports nothing; neither does
    ``broker replay --strict``."""
    subject = fresh_subject()
    lost: list[RecordsLost] = []
    async with BrokerClient(untouched_broker.base_url) as client:
        seqs = await publish(client, subject, 3)
        first = await stored_time(client, subject, seqs[0])
        async with httpx.AsyncClient(
            base_url=untouched_broker.base_url, http1=False, http2=True, timeout=15
        ) as http:
            r = await http.get(REPLAY, params={"subject": subject})
        assert r.status_code == 200, r.text
        assert r.headers[FIRST_SEQ] == "1"
        stream_first = datetime.fromisoformat(r.headers[FIRST_TIME])
        assert stream_first <= first
        with caplog.at_level(logging.WARNING, logger="broker.client"):
            for since in (None, stream_first - TICK, stream_first, datetime.fromtimestamp(0, UTC)):
                replay = client.replay(subject=subject, since=since, on_lost=lost.append)
                assert [m.seq async for m in replay] == seqs
            assert [m.seq async for m in client.replay(subject=subject)] == seqs
    assert lost == []
    assert [r for r in caplog.records if r.name == "broker.client"] == []
    args = ("MESSAGES", "--subject", subject, "--url", untouched_broker.base_url, "--strict")
    for start in [(), ("--since", "1970-01-01T00:00:00Z")]:
        done = cli(*args, *start)
        assert done.returncode == 0, done.stderr
        assert [orjson.loads(line)["seq"] for line in done.stdout.splitlines()] == seqs
        assert done.stderr == ""
