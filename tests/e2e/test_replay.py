"""Replay over HTTP/2: any point, filters, decoding, paging, and resuming after a cut."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest

from broker.client import BrokerClient, SyncBrokerClient
from tests.e2e._broker import BrokerProcess

pytestmark = pytest.mark.e2e


async def publish_many(client: BrokerClient, subject: str, n: int) -> list[int]:
    return [(await client.publish(subject, {"n": i})).seq for i in range(n)]


async def test_replay_returns_stored_messages_in_order(broker: BrokerProcess) -> None:
    subject = f"replay.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish_many(client, subject, 20)
        await client.publish(subject, b"\x00\xff", content_type="application/octet-stream")
        got = [m async for m in client.replay(subject=subject, decode=True, page=7)]
        assert [m.seq for m in got[:20]] == seqs
        assert [m.value for m in got[:20]] == [{"n": i} for i in range(20)]
        assert got[0].subject == f"msg.default.{subject}"
        assert got[0].headers["Content-Type"] == "application/json"
        assert got[20].payload == b"\x00\xff"
        assert got[20].decode_error is not None  # returned with its error, not dropped
        from_middle = [m.seq async for m in client.replay(subject=subject, start_seq=seqs[10])]
        assert from_middle[:10] == seqs[10:]
        assert [m async for m in client.replay(subject=f"{subject}.none")] == []


async def test_a_replay_of_a_stream_growing_faster_than_it_reads_ends(
    broker: BrokerProcess,
) -> None:
    """Every page was full while the producer kept ahead, so the replay never ended. It now
    ends at the stream's last sequence when it began (Broker-Stream-Last-Seq)."""
    subject = f"replay.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish_many(client, subject, 25)
        got: list[int] = []

        async def read_while_two_more_come_per_message() -> None:
            async for message in client.replay(subject=subject, page=5):
                got.append(message.seq)
                await publish_many(client, subject, 2)

        await asyncio.wait_for(read_while_two_more_come_per_message(), 30)
    assert got == seqs


async def test_replay_since_a_time(broker: BrokerProcess) -> None:
    subject = f"replay.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as client:
        await publish_many(client, subject, 3)
        await asyncio.sleep(0.05)
        moment = datetime.now(UTC)
        later = await publish_many(client, subject, 2)
        assert [m.seq async for m in client.replay(subject=subject, since=moment)] == later


@pytest.mark.parametrize(
    "query",
    [
        "/v1/streams/MESSAGES/messages?start_seq=0",
        "/v1/streams/SCHEMAS/messages",
        "/v1/streams/NOPE/messages",
        "/v1/streams/MESSAGES/messages?start_seq=1&start_time=2026-01-01T00:00:00Z",
        "/v1/streams/MESSAGES/messages?start_time=2026-01-01T00:00:00",
        "/v1/streams/MESSAGES/messages?subject=a%20b",
        "/v1/streams/MESSAGES/messages?limit=0",
        "/v1/streams/MESSAGES/messages?decode=xml",
    ],
)
async def test_bad_replay_requests_are_422(client: httpx.AsyncClient, query: str) -> None:
    r = await client.get(query)
    assert r.status_code == 422, r.text
    assert r.json()["error_code"] == "unprocessable"


async def _cutting_proxy(
    target_port: int, cut_after: int, connections: list[int]
) -> tuple[asyncio.Server, int]:
    """A TCP proxy whose first connection is cut after ``cut_after`` bytes from the server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limit = None if connections else cut_after
        connections.append(1)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, budget: int | None
        ) -> None:
            try:
                while data := await src.read(4096):
                    if budget is not None:
                        if budget <= 0:
                            break
                        data = data[:budget]
                        budget -= len(data)
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()
                writer.close()
                up_writer.close()

        await asyncio.gather(
            pipe(reader, up_writer, None), pipe(up_reader, writer, limit), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_replay_resumes_after_a_dropped_connection(broker: BrokerProcess) -> None:
    subject = f"replay.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish_many(client, subject, 200)
    connections: list[int] = []
    server, port = await _cutting_proxy(broker.port, 12_000, connections)
    try:
        async with BrokerClient(f"http://127.0.0.1:{port}") as through_proxy:
            got = [m.seq async for m in through_proxy.replay(subject=subject, page=500)]
    finally:
        server.close()
    assert len(connections) >= 2  # the first connection really was cut
    assert got == seqs  # nothing skipped, nothing repeated


async def test_replay_output_is_ndjson(broker: BrokerProcess, client: httpx.AsyncClient) -> None:
    async with BrokerClient(broker.base_url) as c:  # there are three, run alone too
        await publish_many(c, f"nd.{uuid.uuid4().hex[:8]}", 3)
    r = await client.get("/v1/streams/MESSAGES/messages", params={"limit": 3})
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 3
    assert {"stream", "seq", "subject", "time", "headers", "payload_base64"} <= set(lines[0])


async def test_a_decoded_replay_shows_an_integer_past_64_bits_with_every_digit(
    broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """``decode=json`` parsed with orjson, which reads such an integer as a float: an audit
    replay showed 1.8446744073709552e+24 where the stored message says
    1844674407370955161600007."""
    subject = f"bigint.{uuid.uuid4().hex[:8]}"
    big = 2**64 * 10**5 + 7
    body = b'{"id": %d}' % big
    async with BrokerClient(broker.base_url) as c:
        await c.publish(subject, body, content_type="application/json")
    r = await client.get(
        "/v1/streams/MESSAGES/messages", params={"subject": subject, "decode": "json"}
    )
    assert r.status_code == 200, r.text
    assert b'"value":{"id":%d}' % big in r.content


async def test_replay_as_server_sent_events_resumes_from_last_event_id(
    broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    subject = f"sse.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as c:
        seqs = await publish_many(c, subject, 4)
    sse = {"accept": "text/event-stream"}
    params = {"subject": subject, "decode": "json"}
    r = await client.get("/v1/streams/MESSAGES/messages", params=params, headers=sse)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [block for block in r.text.split("\n\n") if block]
    assert [int(e.split("\n")[0].removeprefix("id: ")) for e in events] == seqs
    first = orjson.loads(events[0].split("\n")[2].removeprefix("data: "))
    assert (first["seq"], first["value"]) == (seqs[0], {"n": 0})
    # A reconnecting EventSource sends the last id it saw: the replay goes on after it.
    resumed = await client.get(
        "/v1/streams/MESSAGES/messages",
        params=params,
        headers={**sse, "last-event-id": str(seqs[1])},
    )
    ids = [int(b.split("\n")[0].removeprefix("id: ")) for b in resumed.text.split("\n\n") if b]
    assert ids == seqs[2:]


async def test_an_answer_ends_at_16_mib_and_the_client_pages_on(
    broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """granian queues a streamed answer however slowly its reader reads (or after an HTTP/2
    reset): a replay of large messages held all of them in the broker's memory. One answer
    now ends once it holds 16 MiB, and the client pages on to the last message."""
    subject = f"big.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as c:
        # 64 x 333 kB of base64 (the test broker takes 256 KiB a message): 21 MB
        seqs = [(await c.publish(subject, bytes([i]) * 250_000)).seq for i in range(64)]
        one = await client.get(
            "/v1/streams/MESSAGES/messages", params={"subject": subject, "limit": 1000}
        )
        records = [orjson.loads(line) for line in one.text.splitlines()]
        assert 40 < len(records) < 64
        assert len(one.content) < 16 * 1024 * 1024 + 400_000  # one record past the cap
        assert [r["seq"] for r in records] == seqs[: len(records)]
        got = [m async for m in c.replay(subject=subject, page=1000)]
    assert [m.seq for m in got] == seqs
    assert [m.payload[:1] for m in got] == [bytes([i]) for i in range(64)]


async def test_large_and_small_records_mixed_keep_their_order_and_bytes(
    broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """A line of 64 KiB or more is written as a chunk of its own, the lines around it
    joined: in either form the answer holds every record once, in order, byte for byte."""
    subject = f"mixed.{uuid.uuid4().hex[:8]}"
    sizes = [10, 70_000, 20, 30, 120_000, 130_000, 5, 48_000, 49_200, 1]
    payloads = [bytes([i]) * size for i, size in enumerate(sizes)]
    async with BrokerClient(broker.base_url) as c:
        seqs = [(await c.publish(subject, payload)).seq for payload in payloads]
        got = [m async for m in c.replay(subject=subject)]
    assert [m.seq for m in got] == seqs
    assert [m.payload for m in got] == payloads
    answer = await client.get(
        "/v1/streams/MESSAGES/messages",
        params={"subject": subject},
        headers={"Accept": "text/event-stream"},
    )
    events = [e for e in answer.text.split("\n\n") if e]
    assert [int(e.split("\n")[0].removeprefix("id: ")) for e in events] == seqs
    data = [orjson.loads(e.split("\n")[2].removeprefix("data: ")) for e in events]
    assert [base64.b64decode(d["payload_base64"]) for d in data] == payloads


@pytest.mark.parametrize(
    ("accept", "sse"),
    [
        ("text/event-stream", True),
        ("TEXT/Event-Stream", True),
        ("application/x-ndjson, text/event-stream", True),
        ("text/event-stream;q=0, application/x-ndjson", False),
        ("text/event-stream;q=0.5, application/x-ndjson", False),
        ("*/*", False),
    ],
    ids=["sse", "any-case", "both", "sse-refused", "sse-lower-quality", "anything"],
)
async def test_replay_answers_sse_only_when_it_is_asked_for(
    client: httpx.AsyncClient, accept: str, sse: bool
) -> None:
    r = await client.get(
        "/v1/streams/MESSAGES/messages", params={"limit": 1}, headers={"accept": accept}
    )
    assert r.status_code == 200
    expected = "text/event-stream" if sse else "application/x-ndjson"
    assert r.headers["content-type"].startswith(expected)


def test_cli_replay_writes_ndjson(broker: BrokerProcess, tmp_path: Path) -> None:
    subject = f"replay.cli.{uuid.uuid4().hex[:6]}"
    with SyncBrokerClient(broker.base_url) as client:
        seqs = [client.publish(subject, {"n": n}).seq for n in range(5)]
    out = tmp_path / "audit.ndjson"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "replay",
            "MESSAGES",
            "--subject",
            subject,
            "--decode",
            "--to",
            str(out),
            "--url",
            broker.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    records = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in records] == seqs
    assert [r["value"] for r in records] == [{"n": n} for n in range(5)]
    refused = subprocess.run(
        [sys.executable, "-m", "broker", "replay", "SCHEMAS", "--url", broker.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1


def test_cli_replay_prints_a_table_for_people(broker: BrokerProcess) -> None:
    subject = f"replay.table.{uuid.uuid4().hex[:6]}"
    with SyncBrokerClient(broker.base_url) as client:
        seqs = [client.publish(subject, {"n": n}).seq for n in range(3)]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "replay",
            "--subject",
            subject,
            "--decode",
            "-o",
            "table",
            "--url",
            broker.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == seqs
    assert all(f"msg.default.{subject}" in line and "application/json" in line for line in lines)
    assert lines[2].endswith('{"n":2}')


def test_cli_replay_to_a_directory_is_refused_before_it_reads(tmp_path: Path) -> None:
    """``--to DIR`` ended in an IsADirectoryError traceback; it is a usage error (exit 2),
    said before any request (no broker needed)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "replay",
            "--to",
            str(tmp_path),
            "--url",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},  # the message on one line of the error box
    )
    assert result.returncode == 2, result.stderr
    assert "is a directory" in result.stderr
    assert "Traceback" not in result.stderr


async def test_replay_since_a_time_past_nanosecond_range(broker: BrokerProcess) -> None:
    """NATS counts a start time in int64 nanoseconds (1678 to 2262): from 9999-12-31 the
    replay returned the whole stream (the count wrapped), where it holds nothing."""
    subject = f"replay.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as client:
        seqs = await publish_many(client, subject, 3)
        for since, expected in (
            (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), []),
            (datetime(2300, 1, 1, tzinfo=UTC), []),
            (datetime(1, 1, 1, tzinfo=UTC), seqs),
            (datetime(1600, 1, 1, tzinfo=UTC), seqs),
        ):
            got = [m.seq async for m in client.replay(subject=subject, since=since)]
            assert got == expected, since


async def test_a_decoded_replay_reads_text_with_unicode_line_separators(
    broker: BrokerProcess,
) -> None:
    """A text holding U+2028, U+2029 or NEL goes into a decoded replay's JSON unescaped;
    the client split its line there (``httpx``'s ``aiter_lines`` splits as
    ``str.splitlines`` does) and raised ``Unavailable`` ("not the broker's") at it."""
    subject = f"texts.{uuid.uuid4().hex[:8]}"
    texts = ["before", "one\u2028two\u2029three\x85four", "after"]
    async with BrokerClient(broker.base_url) as c:
        for text in texts:
            await c.publish(subject, text)
        got = [m async for m in c.replay(subject=subject, decode=True)]
    assert [m.value for m in got] == texts


async def test_a_decoded_replay_of_multibyte_text_pages_past_an_answer_ended_at_16_mib(
    broker: BrokerProcess,
) -> None:
    """The broker ends an answer at 16 MiB counted in bytes; the client counted characters,
    so a decoded answer of emoji (4 bytes, 1 character each) that the broker ended for its
    size looked like the stream's end, and the replay stopped there without a word."""
    subject = f"emoji.{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as c:
        # 40 x (320 kB of base64 + 240 kB of decoded text): 22 MB, 15 M characters
        seqs = [(await c.publish(subject, "\U0001f600" * 60_000)).seq for _ in range(40)]
        got = [m.seq async for m in c.replay(subject=subject, decode=True, page=1000)]
    assert got == seqs
