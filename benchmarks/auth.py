"""Authentication overhead: HTTP/2 publish with auth off, API keys and JWTs, in one run.

One nats-server and one ``broker serve`` per configuration (one granian worker each), all
started up front and measured in interleaved rounds so drift on a shared machine hits each
alike:

- ``open``: no auth file (the baseline; every request is the default tenant);
- ``api-key``: ``Authorization: Bearer <key>``, looked up by its SHA-256;
- ``jwt``: an HS256 bearer token, verified once and then served from the token cache.

Each round sends ``--messages`` single ``POST /v1/publish/{subject}`` requests and checks
that the stream holds every one. The report gives each configuration's median rate and its
ratio to ``open`` (target: at least 0.95x), and the in-process cost of one
``Authenticator.authenticate`` call against one bare ``hashlib.sha256`` of the key. Usage::

    python benchmarks/auth.py [--messages 20000] [--rounds 3] [--client python|h2load]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import jwt
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._h2load import h2load_available  # noqa: E402
from benchmarks._serve import Serve, start_serve  # noqa: E402
from benchmarks.ingress import load  # noqa: E402
from broker.auth import Authenticator  # noqa: E402
from broker.embedded import NatsServer, ServerSpec  # noqa: E402
from broker.settings import Settings  # noqa: E402

KEY = "bench-key-0123456789abcdefghijklmnop"
SECRET = "bench-secret-" + "x" * 40
AUTH = (
    "api_keys:\n  - id: bench\n"
    f"    sha256: {hashlib.sha256(KEY.encode()).hexdigest()}\n"
    "    tenant: bench\n    scopes: [publish]\n"
    "jwt:\n  algorithms: [HS256]\n  secret_env: BENCH_JWT_SECRET\n"
)
TARGET = 0.95


def token() -> str:
    claims = {"tenant": "bench", "scope": "publish", "exp": int(time.time()) + 3600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def in_process_costs() -> dict[str, float]:
    """Microseconds per call: sha256 of the key (the floor), an API key, a cached JWT."""
    os.environ["BENCH_JWT_SECRET"] = SECRET
    auth = Authenticator.from_settings(Settings(auth_config=AUTH))
    bearer = {"authorization": f"Bearer {KEY}"}
    jwt_headers = {"authorization": f"Bearer {token()}"}
    auth.authenticate(jwt_headers)  # fill the cache
    n = 200_000

    def per_call(fn: object) -> float:
        return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6  # type: ignore[arg-type]

    return {
        "sha256_us": per_call(lambda: hashlib.sha256(KEY.encode()).digest()),
        "api_key_us": per_call(lambda: auth.authenticate(bearer)),
        "jwt_cached_us": per_call(lambda: auth.authenticate(jwt_headers)),
    }


async def stored(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("MESSAGES")
        return int(info.state.messages)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--client",
        choices=["python", "h2load"],
        default="h2load" if h2load_available() else "python",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    costs = in_process_costs()
    configs = {
        "open": {},
        "api-key": {"authorization": f"Bearer {KEY}"},
        "jwt": {"authorization": f"Bearer {token()}"},
    }
    rates: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = NatsServer(ServerSpec(store_dir=work / "nats")).start()
        brokers: dict[str, Serve] = {}
        try:
            for name in configs:
                env = {} if name == "open" else {"BROKER_AUTH_CONFIG": AUTH}
                args_ = ["--workers", "1", "--nats-url", server.url]
                brokers[name] = start_serve(work / name, args_, env=env)
            for broker in brokers.values():
                broker.wait_ready()
            body = b'{"reading": 21.5, "unit": "C", "sensor": "bench-1"}'
            expected = 0
            for round_no in range(args.rounds):
                for name, headers in configs.items():
                    url = f"{brokers[name].url}/v1/publish/bench.{name}"
                    result = load(
                        args.client,
                        url=url,
                        body=body,
                        headers={"content-type": "application/json", **headers},
                        total=args.messages,
                        connections=args.connections,
                        concurrency=args.concurrency,
                    )
                    if result.ok != args.messages:
                        raise SystemExit(f"{name}: {result.ok} ok, {dict(result.statuses)}")
                    expected += args.messages
                    rates[name].append(args.messages / result.elapsed)
                    print(
                        f"round {round_no + 1} {name:8} {rates[name][-1]:9.0f} msg/s",
                        file=sys.stderr,
                    )
            if (held := asyncio.run(stored(server.url))) != expected:
                raise SystemExit(f"stream holds {held} messages, expected {expected}")
        finally:
            for broker in brokers.values():
                broker.stop()
            server.stop()

    base = statistics.median(rates["open"])
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}",
        "client": args.client,
        "messages_per_round": args.messages,
        "rounds": args.rounds,
        "median_rate": {k: round(statistics.median(v)) for k, v in rates.items()},
        "ratio_to_open": {k: round(statistics.median(v) / base, 3) for k, v in rates.items()},
        "target": TARGET,
        "in_process": {k: round(v, 3) for k, v in costs.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"machine: {report['machine']}; client {args.client}; ", end="")
    print(f"{args.rounds} rounds x {args.messages}")
    for name in configs:
        ratio = report["ratio_to_open"][name]
        verdict = "" if name == "open" else ("  ok" if ratio >= TARGET else "  BELOW TARGET")
        print(f"  {name:8} {report['median_rate'][name]:9} msg/s  {ratio:5.3f}x open{verdict}")
    c = report["in_process"]
    print(
        f"  in-process: sha256 {c['sha256_us']} us, API key {c['api_key_us']} us, "
        f"cached JWT {c['jwt_cached_us']} us per request"
    )


if __name__ == "__main__":
    main()
