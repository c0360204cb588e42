"""Streaming publish: one HTTP/2 request, ack lines flowing back while records flow in."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.js import JetStreamContext

from tests.e2e._broker import BrokerProcess, children, within
from tests.e2e._h2duplex import DuplexStream
from tests.e2e.conftest import E2E_ENV

pytestmark = pytest.mark.e2e


def open_stream(broker: BrokerProcess, subject: str) -> DuplexStream:
    """A streaming-publish request: NDJSON in, NDJSON acks out."""
    return DuplexStream(
        "127.0.0.1",
        broker.port,
        f"/v1/publish?subject={subject}",
        {"content-type": "application/x-ndjson", "accept": "application/x-ndjson"},
    )


async def test_acks_arrive_while_the_request_body_still_flows(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = f"stream.{uuid.uuid4().hex[:10]}"
    stream = open_stream(broker, subject)
    try:
        for i in range(20):
            stream.send(orjson.dumps({"data": {"i": i}}) + b"\n")
            # The ack for record i comes back before record i+1 is even sent.
            stream.read_until(lambda s, n=i + 1: len(s.lines()) >= n)
            assert not stream.ended
        assert stream.status == 200
        stream.send(b'{"subject": "bad.*"}\n{broken\n', end=True)
        stream.read_until(to_the_end)
    finally:
        stream.close()
    acks = [orjson.loads(line) for line in stream.lines()]
    assert [a["index"] for a in acks] == list(range(22))
    seqs = [a["seq"] for a in acks[:20]]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 20
    assert acks[20]["error_code"] == "invalid_subject"
    assert acks[21]["error_code"] == "bad_request"
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.default.{subject}")
    assert sum((info.state.subjects or {}).values()) == 20
    for i, seq in enumerate(seqs[:3]):
        assert (await js.get_msg("MESSAGES", seq)).data == orjson.dumps({"i": i})


async def test_an_oversized_streamed_line_fails_alone(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = f"stream.{uuid.uuid4().hex[:10]}"
    stream = open_stream(broker, subject)
    try:
        stream.send(b'{"data": 1}\n')
        huge = b'{"data": "' + b"z" * (600 * 1024) + b'"}\n'
        for start in range(0, len(huge), 16384):
            stream.send(huge[start : start + 16384])
        stream.send(b'{"data": 2}\n', end=True)
        stream.read_until(to_the_end)
    finally:
        stream.close()
    acks = [orjson.loads(line) for line in stream.lines()]
    assert [a.get("error_code") for a in acks] == [None, "payload_too_large", None]
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.default.{subject}")
    assert sum((info.state.subjects or {}).values()) == 2


async def test_a_streamed_line_over_the_limit_fails_when_its_newline_comes_with_it(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """A line whose newline arrived in the chunk that took it over the record limit was cut
    out and parsed: the limit held only between chunks. Padded with blanks, it stored."""
    limit = 2 * int(E2E_ENV["BROKER_MAX_MESSAGE_BYTES"]) + 4096  # record_limit()
    subject = f"stream.{uuid.uuid4().hex[:10]}"
    line = b'{"data": 1' + b" " * (limit + 100) + b"}\n"
    head, tail = line[: limit - 1000], line[limit - 1000 :]
    stream = open_stream(broker, subject)
    try:
        stream.send(b'{"data": 0}\n')
        for start in range(0, len(head), 16384):
            stream.send(head[start : start + 16384])
        stream.read_until(lambda s: len(s.lines()) >= 1)
        stream.send(tail)  # the chunk that crosses the limit holds the line's newline
        stream.send(b'{"data": 2}\n', end=True)
        stream.read_until(to_the_end)
    finally:
        stream.close()
    acks = [orjson.loads(line) for line in stream.lines()]
    assert [a.get("error_code") for a in acks] == [None, "payload_too_large", None]
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.default.{subject}")
    assert sum((info.state.subjects or {}).values()) == 2


def _keyed(key: str, data: object) -> bytes:
    return orjson.dumps({"idempotency_key": key, "data": data}) + b"\n"


def _stream_all(broker: BrokerProcess, subject: str, body: bytes) -> list[dict[str, Any]]:
    """Stream ``body`` in one go; the ack lines, read to the end."""
    stream = open_stream(broker, subject)
    try:
        stream.send(body, end=True)
        stream.read_until(to_the_end)
    finally:
        stream.close()
    return [orjson.loads(line) for line in stream.lines()]


async def test_a_stream_sent_again_answers_each_record_in_its_place(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """A resent stream's duplicates are compared with their stored copies side by side: each
    line still answers its own record, in order, a changed record under an old key refused."""
    subject = f"stream.{uuid.uuid4().hex[:10]}"
    run = uuid.uuid4().hex[:8]
    first = b"".join(_keyed(f"{run}-{i}", {"i": i}) for i in range(100))
    stored = _stream_all(broker, subject, first)
    assert [a.get("duplicate") for a in stored] == [False] * 100

    changed = {7, 40, 41, 99}
    again = b"".join(
        _keyed(f"{run}-{i}", {"i": i, "changed": True} if i in changed else {"i": i})
        for i in range(100)
    ) + _keyed(f"{run}-new", {"i": "new"})
    acks = _stream_all(broker, subject, again)
    assert [a["index"] for a in acks] == list(range(101))
    for i, ack in enumerate(acks[:100]):
        if i in changed:
            assert ack["error_code"] == "idempotency_key_reused", ack
        else:
            assert (ack["duplicate"], ack["seq"]) == (True, stored[i]["seq"]), ack
    assert acks[100]["duplicate"] is False
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.default.{subject}")
    assert sum((info.state.subjects or {}).values()) == 101


async def test_a_duplicate_is_answered_before_the_next_record_is_sent(
    broker: BrokerProcess,
) -> None:
    """A client that waits for each answer before sending on gets a duplicate's too (its
    check runs apart from the acks; the line must not wait for a record that never comes)."""
    subject = f"stream.{uuid.uuid4().hex[:10]}"
    run = uuid.uuid4().hex[:8]
    stream = open_stream(broker, subject)
    try:
        for i, key in enumerate(["a", "a", "b", "a", "b"]):
            stream.send(_keyed(f"{run}-{key}", {"key": key}))
            stream.read_until(lambda s, n=i + 1: len(s.lines()) >= n)
        stream.send(_keyed(f"{run}-a", {"key": "changed"}), end=True)
        stream.read_until(to_the_end)
    finally:
        stream.close()
    acks = [orjson.loads(line) for line in stream.lines()]
    assert [a.get("duplicate") for a in acks[:5]] == [False, True, False, True, True]
    assert acks[1]["seq"] == acks[3]["seq"] == acks[0]["seq"]
    assert acks[4]["seq"] == acks[2]["seq"]
    assert acks[5]["error_code"] == "idempotency_key_reused"


@pytest.mark.parametrize("failing", ["last", "first"])
async def test_a_stream_with_a_refused_record_ends_when_its_body_ends(
    broker: BrokerProcess, failing: str
) -> None:
    """A record JetStream refuses (here a sequence conflict; a full store or a timeout
    alike) gets its error line, and the response then ends: the stream used to stay open
    until the ingress's next cyclic garbage collection, the refused ack's traceback keeping
    the response transport alive, so clients waited out their own timeout."""
    subject = f"stream.{uuid.uuid4().hex[:10]}"
    ok = orjson.dumps({"data": {"i": 1}}) + b"\n"
    refused = orjson.dumps({"data": {"i": 2}, "expected_last_subject_sequence": 99999}) + b"\n"
    body = ok + refused if failing == "last" else refused + ok
    stream = open_stream(broker, subject)
    stream.sock.settimeout(3.0)  # a stream that does not end fails the test, not hangs it
    started = time.monotonic()
    try:
        stream.send(body, end=True)
        stream.read_until(to_the_end)
    finally:
        stream.close()
    acks = [orjson.loads(line) for line in stream.lines()]
    assert sorted(a["index"] for a in acks) == [0, 1]
    assert any(a.get("error_code") == "sequence_conflict" for a in acks), acks
    assert time.monotonic() - started < 2.0


def _cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def test_a_stream_whose_client_vanished_ends_and_costs_no_cpu(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """granian hands a body whose connection closed mid-way as empty chunks, for ever: each
    such stream stayed, its task reading in a loop (an idle ingress at a whole core after a
    few), and its idle timeout never came."""
    subject = f"stream.{uuid.uuid4().hex[:10]}"
    for _ in range(5):
        stream = open_stream(broker, subject)
        stream.send(orjson.dumps({"data": 1}) + b"\n")
        stream.read_until(lambda s: len(s.lines()) >= 1)
        stream.close()  # the connection, in the middle of the body
    assert within(10, lambda: broker.log_tail(400).count("publish_stream_client_gone") >= 5), (
        broker.log_tail()
    )
    ingress = children(broker.proc.pid)
    before = _cpu_seconds(ingress)
    await asyncio.sleep(3.0)  # a measure of CPU over a while: nothing to wait on
    assert _cpu_seconds(ingress) - before < 1.0
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.default.{subject}")
    assert sum((info.state.subjects or {}).values()) == 5


def to_the_end(stream: DuplexStream) -> bool:
    """A ``read_until`` predicate that reads until the stream ends."""
    return False


async def test_a_single_publish_whose_client_vanished_mid_body_costs_no_cpu(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """A publish with no ``Content-Length`` whose connection closes in the middle of its
    body: granian hands the rest as empty chunks, for ever, and the read counted them until
    its 30 s deadline, a core busy all that time for each such client. Nothing is stored."""
    subject = f"cut.{uuid.uuid4().hex[:10]}"
    ingress = children(broker.proc.pid)
    before = _cpu_seconds(ingress)
    for _ in range(5):
        stream = DuplexStream(
            "127.0.0.1", broker.port, f"/v1/publish/{subject}", {"content-type": "text/plain"}
        )
        stream.send(b"half of a body")
        await asyncio.sleep(0.2)  # the handler reads the first chunk
        stream.close()
    await asyncio.sleep(3.0)  # a measure of CPU over a while: nothing to wait on
    assert _cpu_seconds(ingress) - before < 1.0
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.default.{subject}")
    assert not info.state.subjects


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/v1/publish/{subject}", "application/json", b'{"order": 42, "lines": [1, 2, 3]}'),
        ("/v1/publish?subject={subject}", "application/x-ndjson", b'{"data": 1}\n{"data": 2}\n'),
        ("/v1/route/{subject}", "application/json", b'{"order": 42, "lines": [1, 2, 3]}'),
    ],
)
async def test_a_body_reset_with_no_error_short_of_its_content_length_is_not_stored(
    broker: BrokerProcess, js: JetStreamContext, path: str, content_type: str, body: bytes
) -> None:
    """A client that resets its stream with ``RST_STREAM(NO_ERROR)`` in the middle of a body
    it declared longer: granian hands what had arrived as the whole body (HTTP/1.1 refuses
    a body short of its ``Content-Length``, HTTP/2 did not), and that part was stored as if
    it were the message sent, the rest lost without a word."""
    subject = f"short.{uuid.uuid4().hex[:10]}"
    stream = DuplexStream(
        "127.0.0.1",
        broker.port,
        path.format(subject=subject),
        {"content-type": content_type, "content-length": str(len(body) + 50)},
    )
    try:
        stream.send(body)
        await asyncio.sleep(0.3)  # the handler is reading the body
        stream.conn.reset_stream(stream.stream_id, 0)  # NO_ERROR
        stream.sock.sendall(stream.conn.data_to_send())
        await asyncio.sleep(1.0)  # what the handler stores, it stores within this
    finally:
        stream.close()
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.default.{subject}")
    assert not info.state.subjects, info.state.subjects
