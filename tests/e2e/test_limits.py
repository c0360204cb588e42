"""HTTP/2 limits against hostile clients: oversize headers, too many streams, slow and big bodies.

A real ``broker serve`` (granian) with small limits, driven by the ``h2`` package over a raw
socket, since httpx cannot open streams past the limit, trickle a body or stop mid-body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import httpx
import pytest

from broker.client import BrokerClient
from broker.embedded import NatsServer
from broker.errors import Unavailable
from tests.e2e._broker import BrokerProcess, children, start_broker

pytestmark = pytest.mark.e2e

MAX_STREAMS = 16
HEADER_LIST_BYTES = 64 * 1024  # the default BROKER_MAX_HEADER_LIST_BYTES
BODY_TIMEOUT = 2.0
STREAM_IDLE = 1.5
MESSAGE_BYTES = 256 * 1024
LIMITS_ENV = {
    "BROKER_MAX_CONCURRENT_STREAMS": str(MAX_STREAMS),
    "BROKER_BODY_READ_TIMEOUT": str(BODY_TIMEOUT),
    "BROKER_STREAM_IDLE_TIMEOUT": str(STREAM_IDLE),
    "BROKER_MAX_MESSAGE_BYTES": str(MESSAGE_BYTES),
}
#: How much a worker's resident memory may grow under one attack: far less than what the
#: attack sends, so nothing of it was buffered whole.
RSS_SLACK = 24 * 1024 * 1024


@pytest.fixture(scope="module")
def limited(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    process = start_broker(
        tmp_path_factory.mktemp("limits"), nats_url=module_nats.url, env=LIMITS_ENV
    )
    yield process
    process.stop()


def worker_pid(broker: BrokerProcess) -> int:
    """The granian worker: a ``granian_process`` whose parent is the granian supervisor."""
    pids = [
        pid
        for pid in children(broker.proc.pid)
        if b"broker.http.granian_process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    workers = [pid for pid in pids if _parent(pid) in pids]
    assert len(workers) == 1, f"granian processes {pids}"
    return workers[0]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: pure-Python Huffman takes minutes for a 1 MiB header."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


@dataclass
class Stream:
    status: int | None = None
    body: bytes = b""
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, when the server reset it

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


@dataclass
class H2Client:
    """One raw HTTP/2 connection: send exactly the frames a test wants, read what comes back."""

    port: int
    sock: socket.socket = field(init=False)
    conn: h2.connection.H2Connection = field(init=False)
    streams: dict[int, Stream] = field(default_factory=dict)
    server_settings: dict[int, int] = field(default_factory=dict)
    closed: bool = False
    goaway: int | None = None  # the GOAWAY error code, when the server sent one

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.encoder = _PlainEncoder()
        self.conn.initiate_connection()
        self._flush()

    def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        end: bool = True,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", method),
                (":path", path),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{self.port}"),
                *(headers or []),
            ],
            end_stream=end,
        )
        self.streams[stream_id] = Stream()
        self._flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> int:
        """Send ``data`` within flow control; stops early (returning what was sent) if the
        server answers or resets the stream first."""
        sent = 0
        while sent < len(data) and not self.streams[stream_id].done:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.read_once(timeout=5)
                continue
            chunk = data[sent : sent + window]
            self.conn.send_data(stream_id, chunk)
            self._flush()
            sent += len(chunk)
        if end and not self.streams[stream_id].done:
            self.conn.end_stream(stream_id)
            self._flush()
        return sent

    def read_once(self, timeout: float) -> bool:
        """Read what arrives within ``timeout`` seconds; False if nothing did."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._on(event)
        self._flush()
        return True

    def read_until(self, *stream_ids: int, timeout: float = 10.0) -> None:
        """Read until every stream named has ended or was reset, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not all(self.streams[s].done for s in stream_ids):
            left = deadline - time.monotonic()
            assert left > 0, f"streams not done in time: {self.streams}"
            assert not self.closed, f"connection closed: {self.streams}"
            self.read_once(timeout=left)

    def read_settings(self, timeout: float = 5.0) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        while not self.server_settings and time.monotonic() < deadline:
            self.read_once(timeout=deadline - time.monotonic())
        return self.server_settings

    def close(self) -> None:
        self.sock.close()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.server_settings |= {k: v.new_value for k, v in event.changed_settings.items()}
        elif isinstance(event, h2.events.ResponseReceived):
            self.streams[event.stream_id].status = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.streams[event.stream_id].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.streams[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset) and event.stream_id in self.streams:
            self.streams[event.stream_id].reset = int(event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = int(event.error_code) if event.error_code is not None else None
            self.closed = True

    def _flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)


def healthy(broker: BrokerProcess) -> bool:
    """Another client, on another connection, is served promptly."""
    with httpx.Client(http1=False, http2=True, timeout=2) as c:
        return c.get(f"{broker.base_url}/healthz").status_code == 200


def publish_headers(**extra: str) -> list[tuple[str, str]]:
    return [("content-type", "application/octet-stream"), *extra.items()]


# --- SETTINGS ---------------------------------------------------------------------------


def test_server_settings_advertise_the_configured_limits(limited: BrokerProcess) -> None:
    """SETTINGS carry BROKER_MAX_CONCURRENT_STREAMS and a 64 KiB header list, not 16 MiB."""
    client = H2Client(limited.port)
    try:
        settings = client.read_settings()
    finally:
        client.close()
    codes = h2.settings.SettingCodes
    assert settings[codes.MAX_CONCURRENT_STREAMS] == MAX_STREAMS
    assert settings[codes.MAX_HEADER_LIST_SIZE] == HEADER_LIST_BYTES
    assert settings[codes.INITIAL_WINDOW_SIZE] == 1024 * 1024
    # Frames up to a stream's window, not the protocol's 16 kB: a client sending a large
    # message pays per frame.
    assert settings[codes.MAX_FRAME_SIZE] == 1024 * 1024


def test_a_message_sent_in_one_large_frame_is_published(limited: BrokerProcess) -> None:
    client = H2Client(limited.port)
    try:
        client.read_settings()
        assert client.conn.max_outbound_frame_size == 1024 * 1024
        body = b"\x01" * 200_000
        stream = client.request("POST", "/v1/publish/big.frame", publish_headers(), end=False)
        assert client.send(stream, body, end=True) == len(body)
        client.read_until(stream)
        assert client.streams[stream].status == 200, client.streams[stream]
        assert json.loads(client.streams[stream].body)["duplicate"] is False
    finally:
        client.close()
    assert healthy(limited)


# --- headers ----------------------------------------------------------------------------


def test_oversize_header_list_gets_431_and_memory_stays_bounded(limited: BrokerProcess) -> None:
    """Header lists of 96 KiB (over the 64 KiB limit; granian's default is 16 MiB) get 431 and
    the same connection goes on serving; the worker did not keep what was sent."""
    pid = worker_pid(limited)
    before = rss_bytes(pid)
    client = H2Client(limited.port)
    try:
        for _ in range(64):
            big = client.request("GET", "/healthz", [("x-big", "a" * (96 * 1024))])
            client.read_until(big)
            assert client.streams[big].status == 431, client.streams[big]
        ok = client.request("GET", "/healthz")
        client.read_until(ok)
        assert client.streams[ok].status == 200
    finally:
        client.close()
    assert healthy(limited)
    growth = rss_bytes(pid) - before
    assert growth < RSS_SLACK, f"worker RSS grew by {growth} bytes after 6 MiB of headers"


def test_huge_header_block_closes_the_connection_and_the_server_keeps_serving(
    limited: BrokerProcess,
) -> None:
    """A 4 MiB header block (hundreds of CONTINUATION frames) makes granian give up on the
    connection rather than buffer it; the worker stays bounded and other clients are served."""
    pid = worker_pid(limited)
    before = rss_bytes(pid)
    client = H2Client(limited.port)
    try:
        client.request("GET", "/healthz", [("x-huge", "a" * (4 * 1024 * 1024))])
        deadline = time.monotonic() + 10
        while not client.closed:
            assert time.monotonic() < deadline, client.streams
            client.read_once(timeout=deadline - time.monotonic())
    except (BrokenPipeError, ConnectionResetError):
        client.closed = True  # closed while the block was still being sent
    finally:
        client.close()
    assert client.closed
    assert healthy(limited)
    growth = rss_bytes(pid) - before
    assert growth < RSS_SLACK, f"worker RSS grew by {growth} bytes after a 4 MiB header block"


def test_header_list_under_the_limit_is_served(limited: BrokerProcess) -> None:
    client = H2Client(limited.port)
    try:
        ok = client.request("GET", "/healthz", [("x-fine", "a" * (HEADER_LIST_BYTES // 2))])
        client.read_until(ok)
        assert client.streams[ok].status == 200
    finally:
        client.close()


# --- streams ----------------------------------------------------------------------------


def test_streams_past_the_limit_are_refused_and_the_rest_served(limited: BrokerProcess) -> None:
    """Opened before the client saw SETTINGS, the streams past the limit get REFUSED_STREAM;
    the others complete, and other connections are served meanwhile."""
    client = H2Client(limited.port)
    try:
        extra = 4
        ids = [
            client.request("POST", "/v1/publish/limits.streams", publish_headers(), end=False)
            for _ in range(MAX_STREAMS + extra)
        ]
        refused_code = h2.errors.ErrorCodes.REFUSED_STREAM
        client.read_until(*ids[-extra:], timeout=5)
        assert [client.streams[s].reset for s in ids[-extra:]] == [refused_code] * extra
        assert healthy(limited)  # while this connection holds every stream it may
        for stream_id in ids[:MAX_STREAMS]:
            client.send(stream_id, b"payload", end=True)
        client.read_until(*ids[:MAX_STREAMS])
        statuses = {client.streams[s].status for s in ids[:MAX_STREAMS]}
        assert statuses == {200}, client.streams
    finally:
        client.close()


# --- bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_slow_body_is_cut_off_with_408_without_blocking_others(
    limited: BrokerProcess, declared: bool
) -> None:
    """A body trickled a byte every 300 ms gets 408 after BROKER_BODY_READ_TIMEOUT; other
    requests are served while it trickles."""
    extra = [("content-length", "1000")] if declared else []
    client = H2Client(limited.port)
    try:
        start = time.monotonic()
        slow = client.request(
            "POST", "/v1/publish/limits.slow", publish_headers() + extra, end=False
        )
        served_meanwhile = False
        while not client.streams[slow].done:
            assert time.monotonic() - start < BODY_TIMEOUT + 5, "slow body never cut off"
            client.send(slow, b"x")
            if not served_meanwhile and time.monotonic() - start > BODY_TIMEOUT / 2:
                served_meanwhile = healthy(limited)
            client.read_once(timeout=0.3)  # the server's answer, or the next byte's turn
        elapsed = time.monotonic() - start
    finally:
        client.close()
    assert served_meanwhile
    assert client.streams[slow].status == 408, client.streams[slow]
    assert b'"request_timeout"' in client.streams[slow].body
    assert BODY_TIMEOUT - 0.1 <= elapsed < BODY_TIMEOUT + 3


def test_a_stalled_streaming_publish_is_ended_after_its_idle_time(limited: BrokerProcess) -> None:
    """A full-duplex NDJSON publish whose client sends records more slowly than
    BROKER_STREAM_IDLE_TIMEOUT runs for as long as it keeps sending (longer than the idle time
    and the whole-body timeout); once it stalls, the server acks what it got, adds a
    `request_timeout` line and ends the response."""
    client = H2Client(limited.port)
    headers = [("content-type", "application/x-ndjson"), ("accept", "application/x-ndjson")]
    try:
        stream = client.request("POST", "/v1/publish?subject=limits.idle", headers, end=False)
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < BODY_TIMEOUT + 1:  # past both limits, never idle
            client.send(stream, b'{"data": %d}\n' % sent)
            sent += 1
            client.read_once(timeout=STREAM_IDLE / 3)
        assert not client.streams[stream].done, client.streams[stream]
        stalled = time.monotonic()
        client.read_until(stream, timeout=STREAM_IDLE + 5)
        waited = time.monotonic() - stalled
    finally:
        client.close()
    assert client.streams[stream].status == 200
    lines = [json.loads(line) for line in client.streams[stream].body.splitlines()]
    assert [line["index"] for line in lines] == list(range(sent + 1))
    assert all("seq" in line for line in lines[:sent]), lines
    assert lines[-1]["error_code"] == "request_timeout"
    assert STREAM_IDLE - 0.5 <= waited < STREAM_IDLE + 3
    assert healthy(limited)


async def test_the_client_raises_when_the_broker_ends_an_idle_stream(
    limited: BrokerProcess,
) -> None:
    """The idle stream's last line is not a record's result: `publish_stream` yields the
    two acks, then raises Unavailable saying why, instead of a result for a record it never
    sent (or waiting for ever on the source)."""

    async def stalls() -> AsyncIterator[dict[str, object]]:
        yield {"data": 1}
        yield {"data": 2}
        await asyncio.sleep(STREAM_IDLE * 4)
        yield {"data": 3}

    results = []

    async def publish(client: BrokerClient) -> None:
        async with asyncio.timeout(STREAM_IDLE * 3):
            async for result in client.publish_stream(stalls(), subject="limits.idle"):
                results.append(result)

    async with BrokerClient(limited.base_url, timeout=STREAM_IDLE * 3) as client:
        with pytest.raises(Unavailable, match=r"no request data .* 2 of the 2 records sent"):
            await publish(client)
    assert [r.ok for r in results] == [True, True]


def test_oversized_declared_body_is_refused_before_it_is_sent(limited: BrokerProcess) -> None:
    """A Content-Length over the limit gets 413 while the client has sent no body at all."""
    client = H2Client(limited.port)
    try:
        big = client.request(
            "POST",
            "/v1/publish/limits.big",
            publish_headers(**{"content-length": str(64 * 1024 * 1024)}),
            end=False,
        )
        client.read_until(big, timeout=5)
        assert client.streams[big].status == 413
        assert b'"payload_too_large"' in client.streams[big].body
    finally:
        client.close()


@pytest.mark.parametrize(
    ("path", "declared", "status"),
    [
        ("/v1/publish/" + ".".join("t" * 17), 5, 422),  # a subject of 17 tokens
        ("/v1/publish/limits.over", MESSAGE_BYTES + 1, 413),
    ],
)
def test_a_refusal_reads_a_small_declared_body_first_and_ends_the_stream_cleanly(
    limited: BrokerProcess, path: str, declared: int, status: int
) -> None:
    """Refused before its body was read, a stream ended with the answer and then
    RST_STREAM(NO_ERROR): curl 7.88 reports that as error 92 and shows nothing. A body of a
    few MiB at most, declared, is read first; the answer ends the stream, no reset after."""
    client = H2Client(limited.port)
    try:
        sid = client.request(
            "POST", path, publish_headers(**{"content-length": str(declared)}), end=False
        )
        deadline = time.monotonic() + 1.5
        while (left := deadline - time.monotonic()) > 0 and not client.streams[sid].done:
            client.read_once(timeout=left)
        assert client.streams[sid].status is None  # waits for the body, as a reader would
        client.send(sid, b"x" * declared, end=True)
        client.read_until(sid, timeout=10)
        client.read_once(timeout=0.3)  # a reset would come right after the answer
        assert (client.streams[sid].status, client.streams[sid].reset) == (status, None)
        assert client.streams[sid].ended
    finally:
        client.close()


def test_oversized_undeclared_body_is_refused_while_it_streams(limited: BrokerProcess) -> None:
    """Without Content-Length the body is counted as it arrives: 413 comes while the client is
    still sending, long before 32 MiB went out, and the worker buffered none of it whole."""
    pid = worker_pid(limited)
    before = rss_bytes(pid)
    total = 32 * 1024 * 1024
    client = H2Client(limited.port)
    try:
        big = client.request("POST", "/v1/publish/limits.big", publish_headers(), end=False)
        sent = client.send(big, b"x" * total, end=True)
        client.read_until(big, timeout=5)
        assert client.streams[big].status == 413
        assert b'"payload_too_large"' in client.streams[big].body
    finally:
        client.close()
    # What a client can push before the answer is bounded by the flow-control windows.
    assert sent < 4 * 1024 * 1024, f"{sent} bytes accepted before the 413"
    assert healthy(limited)
    growth = rss_bytes(pid) - before
    assert growth < RSS_SLACK, f"worker RSS grew by {growth} bytes"


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        (b"[" + b",".join([b"{}"] * 5_000_000) + b"]", b"more than 10000 records"),
        (b"[[" + b",".join([b"[]"] * 5_000_000) + b"]]", b"record 0 exceeds"),
    ],
    ids=["a flood of empty records", "one record of millions of values"],
)
def test_a_dense_json_batch_is_refused_without_building_its_values(
    limited: BrokerProcess, body: bytes, refusal: bytes
) -> None:
    """15 MB of `[{},{},...]` (or one record of `[[],[],...]`), within the batch size limit:
    parsed whole, it raised the worker's peak memory by ~500 MB before its 413.

    A raw HTTP/2 client: the broker may answer before the whole body is in (and reset the
    stream, RFC 9113 8.1), which httpx takes for its own protocol error."""
    pid = worker_pid(limited)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak at the current RSS
    before = peak_rss_bytes(pid)
    client = H2Client(limited.port)
    try:
        sent = client.request(
            "POST", "/v1/publish", [("content-type", "application/json")], end=False
        )
        client.send(sent, body, end=True)
        client.read_until(sent, timeout=30)
        answer = client.streams[sent]
    finally:
        client.close()
    growth = peak_rss_bytes(pid) - before
    assert answer.status == 413, answer.body
    assert growth < 4 * len(body), f"worker peak RSS grew by {growth} bytes"
    assert refusal in answer.body


def test_body_within_limits_still_publishes(limited: BrokerProcess) -> None:
    with httpx.Client(http1=False, http2=True, timeout=10) as c:
        r = c.post(
            f"{limited.base_url}/v1/publish/limits.ok",
            content=b"x" * (MESSAGE_BYTES - 1),
            headers={"content-type": "application/octet-stream"},
        )
    assert r.status_code == 200, r.text


def test_raw_utf8_in_a_query_or_a_header_value_is_served_not_a_500(
    limited: BrokerProcess,
) -> None:
    """Clients do send unencoded UTF-8 (``curl 'http://…/v1/agents?q=€'``): the FastAPI
    routes used to fail re-encoding it as latin-1."""
    client = H2Client(limited.port)
    try:
        query = client.request("GET", "/v1/agents?note=caf\u00e9-\u20ac", [])
        header = client.request("GET", "/v1/agents", [("x-note", "prix: 5 \u20ac")])
        client.read_until(query)
        client.read_until(header)
        assert client.streams[query].status == 200
        assert client.streams[header].status == 200
    finally:
        client.close()
