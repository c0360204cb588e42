"""A lean HTTP/2 (h2c, prior knowledge) POST load generator on the ``h2`` package.

httpx cannot saturate a server from the same 2-core machine; this drives ``connections``
connections with up to ``concurrency`` open streams each, records each request's latency
and status, and runs in its own process so it never shares an event loop with what it
measures. ``h2load`` (Debian package nghttp2-client), when installed, is the faster option:
:func:`run_h2load` wraps it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import orjson


@dataclass
class LoadResult:
    requests: int
    elapsed: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    client: str = "python-h2"

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _connection(
    host: str,
    port: int,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    count: int,
    concurrency: int,
    result: LoadResult,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(2**30)
    request = [
        (":method", "POST"),
        (":path", path),
        (":scheme", "http"),
        (":authority", f"{host}:{port}"),
        ("content-length", str(len(body))),
        *headers,
    ]
    started: dict[int, float] = {}
    status: dict[int, int] = {}
    unsent: dict[int, memoryview] = {}  # bodies larger than the peer's window
    sent = done = 0

    def flush(stream_id: int) -> None:
        rest = unsent[stream_id]
        while rest:
            room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if room <= 0:
                unsent[stream_id] = rest
                return
            conn.send_data(stream_id, bytes(rest[:room]))
            rest = rest[room:]
        del unsent[stream_id]
        conn.end_stream(stream_id)

    def start() -> None:
        nonlocal sent
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, request)
        started[stream_id] = time.perf_counter()
        unsent[stream_id] = memoryview(body)
        flush(stream_id)
        sent += 1

    for _ in range(min(concurrency, count)):
        start()
    writer.write(conn.data_to_send())
    while done < count:
        data = await reader.read(1 << 16)
        if not data:
            raise ConnectionError("server closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status[event.stream_id] = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in list(unsent):
                    flush(stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                began = started.pop(event.stream_id)
                result.latencies_ms.append((time.perf_counter() - began) * 1000)
                result.statuses[status.pop(event.stream_id, 0)] += 1
                done += 1
                if sent < count:
                    start()
        writer.write(conn.data_to_send())
        await writer.drain()
    writer.close()


async def _drive(
    url: str, body: bytes, headers: dict[str, str], total: int, connections: int, concurrency: int
) -> LoadResult:
    match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
    if match is None:
        raise ValueError(f"need http://host:port/path, got {url}")
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    result = LoadResult(requests=total, elapsed=0.0)
    shares = [
        total // connections + (1 if i < total % connections else 0) for i in range(connections)
    ]
    began = time.perf_counter()
    await asyncio.gather(
        *(
            _connection(host, port, path, list(headers.items()), body, share, concurrency, result)
            for share in shares
            if share
        )
    )
    result.elapsed = time.perf_counter() - began
    return result


def run_python(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    total: int,
    connections: int = 4,
    concurrency: int = 32,
) -> LoadResult:
    """Run the load in this process (call it from a child process)."""
    try:
        import uvloop

        return uvloop.run(_drive(url, body, headers, total, connections, concurrency))
    except ImportError:
        return asyncio.run(_drive(url, body, headers, total, connections, concurrency))


def json_payload(size: int) -> bytes:
    """A JSON publish body of ``size`` bytes (``{"data": "xxx…"}``; cut short below 11)."""
    return orjson.dumps({"data": "x" * max(0, size - 11)})[:size]


def h2load_available() -> bool:
    return shutil.which("h2load") is not None


def run_h2load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    total: int,
    connections: int = 4,
    concurrency: int = 32,
    rate: float | None = None,
) -> LoadResult:
    """Run ``h2load`` and parse its summary (latency percentiles are not reported by it).

    ``rate``: offer about this many requests per second in all (h2load's ``--rps``, split
    evenly over the connections) instead of as many as the server answers."""
    with tempfile.NamedTemporaryFile() as data:
        data.write(body)
        data.flush()
        cmd = ["h2load", "-n", str(total), "-c", str(connections), "-m", str(concurrency)]
        if rate is not None:
            cmd += ["--rps", str(max(1, round(rate / connections)))]
        cmd += ["-d", data.name]
        for name, value in headers.items():
            cmd += ["-H", f"{name}: {value}"]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    finished = re.search(r"finished in ([\d.]+)(m?s)", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if finished is None or codes is None:
        raise RuntimeError(f"cannot read h2load output:\n{out}")
    elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    result = LoadResult(requests=total, elapsed=elapsed, client="h2load")
    for klass, n in zip((200, 300, 400, 500), codes.groups(), strict=True):
        if int(n):
            result.statuses[klass] += int(n)
    if mean is not None:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[mean.group(2)]
        result.latencies_ms = [float(mean.group(1)) * scale]
    return result
