"""Observability overhead: ingress publish throughput with telemetry off and on, in one run.

One nats-server, one ``broker serve`` per configuration (one granian worker each, no
projection workers or routers, so only the ingress is measured), all started up front and
measured in interleaved rounds (off, metrics, traced, ... then again), so drift on a shared
machine hits every configuration alike. Configurations:

- ``off``: ``BROKER_METRICS=false``, tracing off (the baseline);
- ``metrics``: metrics on, tracing off (the default);
- ``traced 100%``: metrics on, ``OTEL_TRACES_EXPORTER=otlp`` to a local OTLP sink, every
  request sampled;
- ``traced 10%`` / ``1%`` / ``0%``: the same with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``
  (``0%``: tracing on, nothing sampled: the price of having it on).

Each round sends ``--messages`` single ``POST /v1/publish/{subject}`` requests (h2load when
installed, else the Python HTTP/2 client) and the stream is checked to hold every one. The
report gives each configuration's median rate and its ratio to ``off``; the target is an
overhead of at most 10 %. It also times the in-process calls a request makes, with
tracing off, against an empty function. Usage::

    python benchmarks/observability.py [--messages 20000] [--rounds 3] [--client h2load]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._h2load import LoadResult, h2load_available, run_h2load, run_python  # noqa: E402
from broker.embedded import NatsServer, ServerSpec, free_port  # noqa: E402

TARGET_OVERHEAD = 0.10


@dataclass
class Config:
    name: str
    env: dict[str, str]
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # broker CPU per message

    @property
    def key(self) -> str:
        return self.name.replace(" ", "_").replace("%", "pct")

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_us)


def configs(sink: str) -> list[Config]:
    traced = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
    }

    def ratio(r: str) -> dict[str, str]:
        return {
            **traced,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": r,
        }

    return [
        Config("off", {"BROKER_METRICS": "false"}),
        Config("metrics", {"BROKER_METRICS": "true"}),
        Config("traced 100%", traced),
        Config("traced 10%", ratio("0.1")),
        Config("traced 1%", ratio("0.01")),
        Config("traced 0%", ratio("0")),
    ]


class Sink:
    """An OTLP/HTTP endpoint that accepts and drops every export (a collector elsewhere)."""

    def __init__(self) -> None:
        self.spans_bytes = 0

        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                sink.spans_bytes += len(self.rfile.read(int(self.headers["content-length"])))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def start_broker(
    nats_url: str, config: Config, workdir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    directory = workdir / config.key
    directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OTEL_"))}
    env.update({"BROKER_LOG_LEVEL": "warning", "BROKER_LOG_FORMAT": "json", **config.env})
    log = (directory / "broker.log").open("wb")
    cmd = [sys.executable, "-m", "broker", "serve", "--port", str(port), "--workers", "1"]
    cmd += ["--nats-url", nats_url, "--data-dir", str(directory / "data")]
    cmd += ["--projection-workers", "0", "--routers", "0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    with httpx.Client(http1=False, http2=True) as c:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if c.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    return proc, port
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"broker {config.name} did not become ready; see {directory}/broker.log")


async def stored(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info("MESSAGES", subjects_filter=subject)
    await nc.close()
    return sum((info.state.subjects or {}).values())


def _cpu_seconds(root: int) -> float:
    """CPU time used so far by ``root`` and every process below it (Linux ``/proc``)."""
    parents: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(parents.get(pid, []))
    return total


def settle(window: float = 0.5, busy: float = 0.05, timeout: float = 120.0) -> None:
    """Wait until this benchmark's processes (the brokers, the sink) are idle again: a traced
    broker exports its backlog after a run, and that must not slow the next one down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_seconds(os.getpid())
        time.sleep(window)
        if _cpu_seconds(os.getpid()) - before < busy * window:
            return


def drive(client: str, url: str, body: bytes, total: int, connections: int, streams: int) -> Any:
    runner = run_h2load if client == "h2load" else run_python
    headers = {"content-type": "application/json"}
    return runner(url, body, headers, total=total, connections=connections, concurrency=streams)


async def in_process_costs() -> dict[str, float]:
    """Nanoseconds per call of what a request runs in-process (on an event loop, as in the
    ingress), tracing off, metrics on and off."""
    from broker.telemetry import metrics, tracing

    def empty() -> None:
        return None

    headers: dict[str, str] = {}

    def span_off() -> None:
        with tracing.span("append"):
            pass

    def inject_off() -> None:
        tracing.inject(headers)

    def request_metrics() -> None:
        metrics.observe_request("/v1/publish/{subject}", "POST", 200, 0.001)

    def request_spans() -> None:  # what the ingress does per publish: server, append, inject
        with (
            tracing.span("POST /v1/publish/{subject}", parent_headers=headers, start_trace=True),
            tracing.span("append"),
        ):
            tracing.inject({})

    n = 200_000
    costs = {}
    for name, fn in [
        ("empty function", empty),
        ("span() with tracing off", span_off),
        ("inject() with tracing off", inject_off),
        ("observe_request() metrics on", request_metrics),
    ]:
        costs[name] = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9
    metrics.set_enabled(False)
    costs["observe_request() metrics off"] = (
        min(timeit.repeat(request_metrics, number=n, repeat=5)) / n * 1e9
    )
    metrics.set_enabled(True)
    costs["request spans, tracing off"] = min(timeit.repeat(request_spans, number=n, repeat=5))
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    for label, ratio in (("not sampled", 0.0), ("sampled, export not counted", 1.0)):
        tracing.configure("bench", exporters=[Discard()], sampler_arg=ratio, sampler="traceidratio")
        runs = n // 10
        costs[f"request spans, {label}"] = min(timeit.repeat(request_spans, number=runs, repeat=5))
        costs[f"request spans, {label}"] *= 1e9 / runs
        tracing.disable()
    costs["request spans, tracing off"] *= 1e9 / n
    return costs


@contextlib.contextmanager
def running(
    args: argparse.Namespace, workdir: Path, cases: list[Config]
) -> Iterator[list[tuple[int, int]]]:
    server = NatsServer(ServerSpec(store_dir=workdir / "nats")).start()
    brokers: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for config in cases:
            proc, port = start_broker(server.url, config, workdir)
            brokers.append(proc)
            ports.append((port, proc.pid))
        args.nats_url = server.url
        yield ports
    finally:
        for proc in brokers:
            proc.send_signal(signal.SIGTERM)
        for proc in brokers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32, help="streams per connection")
    parser.add_argument("--client", choices=["auto", "python", "h2load"], default="auto")
    parser.add_argument("--only", action="append", help="run only these configurations")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.client == "auto":
        args.client = "h2load" if h2load_available() else "python"
    payload = orjson.dumps({"data": "x" * max(0, args.payload_bytes - 11)})[: args.payload_bytes]
    sink = Sink()
    cases = [c for c in configs(sink.url) if not args.only or c.name in args.only]
    with tempfile.TemporaryDirectory() as tmp, running(args, Path(tmp), cases) as ports:
        for config, (port, _) in zip(cases, ports, strict=True):  # warm-up
            url = f"http://127.0.0.1:{port}/v1/publish/obs.warm.{config.key}"
            drive(args.client, url, payload, 2000, args.connections, args.concurrency)
        settle()
        for round_ in range(args.rounds):
            order = cases if round_ % 2 == 0 else list(reversed(cases))
            for config in order:
                port, pid = ports[cases.index(config)]
                subject = f"obs.r{round_}.{config.key}"
                url = f"http://127.0.0.1:{port}/v1/publish/{subject}"
                cpu_before = _cpu_seconds(pid)
                result: LoadResult = drive(
                    args.client, url, payload, args.messages, args.connections, args.concurrency
                )
                if result.ok != args.messages:
                    raise SystemExit(f"{config.name}: {result.ok}/{args.messages} succeeded")
                count = asyncio.run(stored(args.nats_url, f"msg.default.{subject}"))
                if count != args.messages:
                    raise SystemExit(f"{config.name}: stream holds {count}/{args.messages}")
                settle()  # the export backlog of a traced run is part of its cost
                config.rates.append(result.rate)
                config.cpu_us.append((_cpu_seconds(pid) - cpu_before) / args.messages * 1e6)
                print(
                    f"round {round_ + 1} {config.name:<12} {result.rate:>8.0f} msgs/s "
                    f"{config.cpu_us[-1]:>6.1f} us CPU/msg",
                    file=sys.stderr,
                )
    costs = asyncio.run(in_process_costs())
    report(args, cases, costs, sink)


def report(
    args: argparse.Namespace, cases: list[Config], costs: dict[str, float], sink: Sink
) -> None:
    base = next((c for c in cases if c.name == "off"), cases[0])
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    if args.json:
        document = {
            "machine": machine,
            "client": args.client,
            "messages_per_round": args.messages,
            "rounds": args.rounds,
            "configs": {
                c.name: {
                    "median_msgs_per_s": round(c.rate),
                    "rounds_msgs_per_s": [round(r) for r in c.rates],
                    "ratio_to_off": round(c.rate / base.rate, 3),
                    "median_cpu_us_per_msg": round(c.cpu, 1),
                    "cpu_overhead": round(c.cpu / base.cpu - 1, 3),
                }
                for c in cases
            },
            "in_process_ns_per_call": {k: round(v, 1) for k, v in costs.items()},
            "otlp_bytes_exported": sink.spans_bytes,
        }
        print(json.dumps(document, indent=2))
        return
    print(
        f"\nobservability overhead: {args.messages} single publishes x {args.rounds} rounds per "
        f"configuration, {args.payload_bytes}-byte payloads, 1 granian worker, client "
        f"{args.client}; {machine}"
    )
    print(
        f"{'configuration':<14}{'msgs/s':>9}{'ratio':>7}{'CPU us/msg':>12}{'CPU +%':>8}"
        "  verdict  rounds msgs/s (target: overhead <= 10%)"
    )
    for c in cases:
        ratio = c.rate / base.rate
        extra_cpu = c.cpu / base.cpu - 1
        verdict = ""
        if c is not base:
            verdict = "ok" if max(1 - ratio, extra_cpu) <= TARGET_OVERHEAD else "over"
        rounds = ", ".join(f"{r:.0f}" for r in c.rates)
        print(
            f"{c.name:<14}{c.rate:>9.0f}{ratio:>7.2f}{c.cpu:>12.1f}{extra_cpu:>8.1%}"
            f"  {verdict:<7}  [{rounds}]"
        )
    print(f"OTLP bytes received by the sink: {sink.spans_bytes:,}")
    print("\nin-process cost per call (ns):")
    for name, ns in costs.items():
        print(f"  {name:<34}{ns:>8.0f}")


if __name__ == "__main__":
    main()
