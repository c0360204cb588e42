"""Replay benchmark: reading a stream back through the broker vs a raw pull consumer.

Both read the same N messages from the same nats-server in one run: raw is a nats-py pull
consumer (no acks, batches of 1024 messages or about 8 MiB); the broker is
``GET /v1/streams/MESSAGES/messages`` over HTTP/2 through ``BrokerClient.replay`` (NDJSON,
payloads base64, no decoding). Issue 5 sets the target: >= 0.8x. A second pair decodes the
JSON payloads: the raw side ``orjson.loads`` each message it fetched, the broker replays
with ``decode=json`` (lazy codecs on the server, with their bounds).

Usage: ``python benchmarks/replay.py [--messages 20000] [--payload-bytes 256]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._serve import start_serve  # noqa: E402
from broker.client import BrokerClient  # noqa: E402
from broker.embedded import NatsServer, ServerSpec  # noqa: E402

SUBJECT = "msg.default.bench.replay"


async def fill(url: str, n: int, payload: bytes) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    futures = [
        await js.publish_async(SUBJECT, payload, headers={"Content-Type": "application/json"})
        for _ in range(n)
    ]
    await asyncio.gather(*futures)
    await nc.close()


async def raw_read(url: str, n: int, payload_bytes: int, *, decode: bool = False) -> float:
    # Batches of up to 1 024 messages and about 8 MiB, as the broker's reader asks for: a
    # batch of 1 024 large messages would pass nats-py's 64 MiB pending limit and be lost.
    size = max(1, min(1024, (8 << 20) // max(1, payload_bytes)))
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        SUBJECT,
        stream="MESSAGES",
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, mem_storage=True),
    )
    began, got = time.perf_counter(), 0
    while got < n:
        batch = await sub.fetch(size, timeout=5)
        if decode:
            for message in batch:
                orjson.loads(message.data)
        got += len(batch)
    elapsed = time.perf_counter() - began
    await sub.unsubscribe()
    await nc.close()
    return got / elapsed


async def broker_read(base: str, n: int, *, decode: bool = False) -> float:
    async with BrokerClient(base) as client:
        began, got = time.perf_counter(), 0
        async for message in client.replay(
            "MESSAGES", subject="bench.replay", page=100_000, decode=decode
        ):
            if decode and message.value is None:
                raise SystemExit(f"seq {message.seq} did not decode: {message.decode_error}")
            got += 1
        elapsed = time.perf_counter() - began
    if got != n:
        raise SystemExit(f"replay returned {got} of {n} messages")
    return got / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--payload-bytes", type=int, default=256)
    args = parser.parse_args()
    payload = b'{"data":"' + b"x" * max(0, args.payload_bytes - 11) + b'"}'
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(ServerSpec(store_dir=Path(tmp) / "nats")).start()
        broker = start_serve(Path(tmp), ["--workers", "1", "--nats-url", server.url])
        try:
            broker.wait_ready()
            asyncio.run(fill(server.url, args.messages, payload))
            base = broker.url
            asyncio.run(broker_read(base, args.messages))  # warm-up
            raw = asyncio.run(raw_read(server.url, args.messages, len(payload)))
            through = asyncio.run(broker_read(base, args.messages))
            raw_decoded = asyncio.run(
                raw_read(server.url, args.messages, len(payload), decode=True)
            )
            decoded = asyncio.run(broker_read(base, args.messages, decode=True))
        finally:
            broker.stop()
            server.stop()
    print(f"\nreplay benchmark: {args.messages} messages of {args.payload_bytes} bytes")
    print(f"raw pull consumer        {raw:>10.0f} msgs/s")
    ratio = through / raw
    print(f"broker replay (HTTP/2)   {through:>10.0f} msgs/s   {ratio:.2f}x  (issue 5: >= 0.8x)")
    print(f"raw pull + orjson.loads  {raw_decoded:>10.0f} msgs/s")
    ratio = decoded / raw_decoded
    print(f"broker replay decode=json {decoded:>9.0f} msgs/s   {ratio:.2f}x")


if __name__ == "__main__":
    main()
