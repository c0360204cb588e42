"""Ingress benchmark: HTTP/2 publish through the broker vs raw nats-py, in one run.

Phases, all against one nats-server this script starts:

1. raw: nats-py ``js.publish_async`` of N messages to the MESSAGES stream, all acks awaited;
2. single: N ``POST /v1/publish/{subject}`` over h2c, ``--connections`` x ``--concurrency``
   open streams (>= 64);
3. batch: the same N messages as NDJSON batches of ``--batch-size`` via ``POST /v1/publish``;
4. batch resent: one batch whose records carry idempotency keys, sent N / batch-size times:
   every record after the first sending is a duplicate, compared with its stored copy
   (``Broker-Request-Digest``), as a client retrying a batch makes it (no target; shown for
   what a retry costs);
5. stream and stream resent: phases 3 and 4 as streamed publishes (``Accept:
   application/x-ndjson``: records appended as their lines arrive, one ack line each back
   while the body flows; no target).

Each phase checks the stream really holds its N messages (the resent batches: one batch),
then the ratios to raw are printed next to the targets (single >= 0.25x, batch >= 0.7x).
Usage::

    python benchmarks/ingress.py [--messages 20000] [--workers 1] [--client python|h2load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._h2load import (  # noqa: E402
    LoadResult,
    h2load_available,
    json_payload,
    run_h2load,
    run_python,
)
from benchmarks._serve import ServeError, start_serve  # noqa: E402
from broker.embedded import NatsServer, ServerSpec  # noqa: E402
from broker.logs import configure_logging  # noqa: E402

NDJSON = "application/x-ndjson"
TARGETS = {"single": 0.25, "batch": 0.7}


@dataclass
class Phase:
    name: str
    messages: int
    elapsed: float
    p50_ms: float
    p99_ms: float
    client: str

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed


async def raw_publish(url: str, subject: str, payload: bytes, n: int) -> Phase:
    """The baseline: nats-py publish_async, pipelined, every ack awaited."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()

    def timed(began: float) -> Any:
        return lambda _: latencies.append((loop.time() - began) * 1000)

    began = time.perf_counter()
    futures = []
    for _ in range(n):
        future = await js.publish_async(subject, payload)
        future.add_done_callback(timed(loop.time()))
        futures.append(future)
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - began
    await nc.close()
    latencies.sort()
    return Phase(
        "raw nats-py publish_async",
        n,
        elapsed,
        latencies[n // 2],
        latencies[int(n * 0.99)],
        "nats-py",
    )


async def stream_count(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info("MESSAGES", subjects_filter=subject)
    await nc.close()
    return sum((info.state.subjects or {}).values())


def load(
    client: str,
    *,
    url: str,
    body: bytes,
    headers: dict[str, str],
    total: int,
    connections: int,
    concurrency: int,
) -> LoadResult:
    runner = run_h2load if client == "h2load" else run_python
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(
            runner,
            (url, body, headers),
            {"total": total, "connections": connections, "concurrency": concurrency},
        )


def http_phase(
    name: str,
    args: argparse.Namespace,
    url: str,
    body: bytes,
    content_type: str,
    *,
    requests: int,
    messages: int,
    concurrency: int,
    accept: str | None = None,
) -> Phase:
    """Drive ``requests`` POSTs and insist that every one of them succeeded."""
    headers = {"content-type": content_type}
    if accept is not None:
        headers["accept"] = accept
    result = load(
        args.client,
        url=url,
        body=body,
        headers=headers,
        total=requests,
        connections=min(args.connections, requests),
        concurrency=concurrency,
    )
    if result.ok != requests:
        raise SystemExit(f"{name}: {result.ok}/{requests} succeeded: {dict(result.statuses)}")
    p50, p99 = result.percentile(0.5), result.percentile(0.99)
    return Phase(name, messages, result.elapsed, p50, p99, result.client)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="messages per phase")
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32, help="open streams per connection")
    parser.add_argument("--workers", type=int, default=1, help="granian workers")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--client",
        choices=["auto", "python", "h2load"],
        default="auto",
        help="load generator; auto: h2load when installed (the Python one is client-bound)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    configure_logging("warning")  # the embedded server's debug lines would go to stdout
    if args.connections * args.concurrency < 64:
        parser.error("use at least 64 concurrent streams (connections x concurrency)")
    if args.client == "auto":
        args.client = "h2load" if h2load_available() else "python"
    if args.client == "h2load" and not h2load_available():
        parser.error("h2load is not installed (apt-get install nghttp2-client)")
    n = args.messages - args.messages % args.batch_size
    payload = json_payload(args.payload_bytes)
    record = orjson.dumps({"data": orjson.loads(payload)})
    batch_body = b"\n".join([record] * args.batch_size)
    keyed_body = b"\n".join(
        orjson.dumps({"data": orjson.loads(payload), "idempotency_key": f"bench-{i}"})
        for i in range(args.batch_size)
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = NatsServer(ServerSpec(store_dir=workdir / "nats")).start()
        broker = start_serve(workdir, ["--workers", str(args.workers), "--nats-url", server.url])
        try:
            broker.wait_ready()
        except ServeError as e:
            server.stop()
            raise SystemExit(str(e)) from None
        base = broker.url
        single_url = f"{base}/v1/publish/bench"
        try:
            # Warm-up: connections, imports, the stream's first blocks.
            asyncio.run(raw_publish(server.url, "msg.default.warm", payload, 2000))
            http_phase(
                "warm-up",
                args,
                f"{single_url}.warm",
                payload,
                "application/json",
                requests=2000,
                messages=2000,
                concurrency=args.concurrency,
            )

            raw = asyncio.run(raw_publish(server.url, "msg.default.bench.raw", payload, n))
            single = http_phase(
                "broker single publish (h2c)",
                args,
                f"{single_url}.single",
                payload,
                "application/json",
                requests=n,
                messages=n,
                concurrency=args.concurrency,
            )
            # NDJSON: a batch per request, buffered or streamed, sent once or again (keyed).
            streamed_keys = keyed_body.replace(b"bench-", b"stream-")
            batch, resent, *streamed = (
                http_phase(
                    f"broker {name} ({args.batch_size}{unit})",
                    args,
                    f"{base}/v1/publish?subject=bench.{subject}",
                    body,
                    "application/x-ndjson",
                    requests=n // args.batch_size,
                    messages=n,
                    concurrency=2,
                    accept=accept,
                )
                for name, unit, subject, body, accept in (
                    ("batch publish", "/request", "batch", batch_body, None),
                    ("batch resent", " keys", "resent", keyed_body, None),
                    ("stream", "/request", "stream", batch_body, NDJSON),
                    ("stream resent", " keys", "stream_resent", streamed_keys, NDJSON),
                )
            )
            subjects = ("raw", "single", "batch", "resent", "stream", "stream_resent")
            counts = {
                s: asyncio.run(stream_count(server.url, f"msg.default.bench.{s}")) for s in subjects
            }
            expected = dict.fromkeys(subjects, n) | {
                "resent": args.batch_size,
                "stream_resent": args.batch_size,
            }
            if counts != expected:
                raise SystemExit(f"stream holds {counts}, expected {expected}")
        finally:
            broker.stop()
            server.stop()
    report(args, raw, single, batch, resent, *streamed)


def report(
    args: argparse.Namespace,
    raw: Phase,
    single: Phase,
    batch: Phase,
    resent: Phase,
    stream: Phase,
    stream_resent: Phase,
) -> None:
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    ratios = {
        "single": single.rate / raw.rate,
        "batch": batch.rate / raw.rate,
        "resent": resent.rate / raw.rate,
        "stream": stream.rate / raw.rate,
        "stream_resent": stream_resent.rate / raw.rate,
    }
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine,
                    "workers": args.workers,
                    "phases": {
                        p.name: {
                            "msgs_per_s": round(p.rate),
                            "p50_ms": round(p.p50_ms, 2),
                            "p99_ms": round(p.p99_ms, 2),
                            "client": p.client,
                        }
                        for p in (raw, single, batch, resent, stream, stream_resent)
                    },
                    "ratios": {k: round(v, 3) for k, v in ratios.items()},
                },
                indent=2,
            )
        )
        return
    print(
        f"\ningress benchmark: {raw.messages} messages/phase, {args.payload_bytes}-byte "
        f"payloads, {args.workers} worker(s), client {args.client}; {machine}"
    )
    print(f"{'phase':<36}{'msgs/s':>10}{'p50 ms':>9}{'p99 ms':>9}  {'ratio':>7}  target")
    phases = (
        (raw, None),
        (single, "single"),
        (batch, "batch"),
        (resent, "resent"),
        (stream, "stream"),
        (stream_resent, "stream_resent"),
    )
    for phase, key in phases:
        ratio = f"{ratios[key]:.2f}x" if key else "1.00x"
        if key is None:
            target = "(baseline)"
        elif key in TARGETS:
            target = f">= {TARGETS[key]}x {'ok' if ratios[key] >= TARGETS[key] else 'MISSED'}"
        else:
            target = "(no target)"
        note = "" if phase.client != "h2load" else " (latency: mean)"
        numbers = f"{phase.rate:>10.0f}{phase.p50_ms:>9.2f}{phase.p99_ms:>9.2f}"
        print(f"{phase.name:<36}{numbers}  {ratio:>7}  {target}{note}")


if __name__ == "__main__":
    main()
