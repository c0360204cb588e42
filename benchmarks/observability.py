"""Observability overhead: ingress publish throughput with telemetry off and on, in one run.

One nats-server, one ``broker serve`` per configuration (one granian worker each, no
projection workers or routers, so only the ingress is measured), all started up front and
measured in interleaved rounds, so drift on a shared machine hits every configuration
alike. Configurations:

- ``off``: ``BROKER_METRICS=false``, tracing off (the baseline);
- ``metrics``: metrics on, tracing off (the default);
- ``traced 100%``: metrics on, ``OTEL_TRACES_EXPORTER=otlp`` to a local OTLP sink, every
  request sampled;
- ``traced 10%`` / ``1%`` / ``0%``: the same with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``
  (``0%``: tracing on, nothing sampled: the price of having it on).

Each round sends ``--messages`` single ``POST /v1/publish/{subject}`` requests (h2load when
installed, else the Python HTTP/2 client) and the stream is checked to hold every one. Per
configuration and round it records the throughput and the CPU time of the broker's
processes per message (``/proc``, from before the load until the broker is idle again and
its sampled spans of the round have reached the sink, so the export of a traced round is
its own cost, never the next configuration's; less the broker's idle CPU, measured before
the rounds, over that wait after the load, which a traced round spends waiting up to 5 s
for the export timer and an untraced one does not). The report gives each configuration's
median rate and CPU, and its CPU overhead over ``off`` as the median of the per-round
ratios (each round's ``off`` is its pair); the target is an overhead of at most 10 %.

The order of the configurations rotates by one every round (a Latin square: with
``--rounds`` a multiple of the number of configurations, each runs in every position
equally often, and none runs twice in a row). An earlier version reversed the order every
other round; the configurations at the two ends then ran twice in a row at each turn, and
an A/A run (three identical brokers) measured the one in the middle 7 to 14 % costlier than
the ends, as large as the overheads being measured.

The sink decodes what it receives and counts the spans of each configuration (each exports
to its own path), so the report shows what was sampled. At the end it times, in this
process with tracing off and on, what a request runs: the spans of one publish and the
OTLP export of sampled spans, and the spans again right after 16 MB of other memory were
written (caches cold, as a sparsely sampled request finds them in a loaded broker). Usage::

    python benchmarks/observability.py [--messages 20000] [--rounds 6] [--client h2load] [--threads]
        [--compression gzip] [--rate 6000] [--instances 3]

``--rate N`` offers N publishes per second (h2load's ``--rps``) instead of as many as the
broker answers. Throughput is then the same for every configuration, and the CPU per
message says what telemetry costs at that load: a broker below its capacity serves fewer
requests per wake-up, so its CPU per message is higher than at saturation, and what
telemetry adds is a smaller share of it. A configuration that cannot keep up with the rate
in a round is marked ``behind``.

``--baseline-tree DIR`` also runs every configuration from another checkout (``git worktree
add DIR <commit>``), named ``base <configuration>``, in the same rounds: an A/B of two code
versions on the same machine at the same time; overheads are then against ``base off``.
The brokers import ``broker`` from their own tree (their working directory); copy the built
C module (``broker/codecs/_lazy*.so``) into DIR, or both sides do not run the same codecs.

``--instances N`` starts N brokers per configuration, which take the rounds in turn. A
broker process has a CPU per message of its own: on 2026-11-27 two ``off`` brokers whose
request paths differed only in two calls made cheaper measured 7 % apart (the median of
20 rounds' ratios; their median CPU on the event loop's thread 23 %), the cheaper one the
slower, while callgrind counted 1 % fewer instructions for it. With one broker per
configuration that offset is in every round and no number of rounds removes it; with
several, the report gives each instance's median, and the offsets average out over the
rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import timeit
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._h2load import (  # noqa: E402
    LoadResult,
    h2load_available,
    json_payload,
    run_h2load,
    run_python,
)
from benchmarks._serve import Serve, ServeError, start_serve  # noqa: E402
from broker.embedded import NatsServer, ServerSpec  # noqa: E402
from broker.logs import configure_logging  # noqa: E402

TARGET_OVERHEAD = 0.10
#: The batch span processor's default schedule delay (5 s), and a margin.
EXPORT_WAIT_S = 7.0
#: Rounds for a 95 % interval of a median: with fewer, the whole range covers it less often.
MIN_ROUNDS_FOR_CI = 6
#: With ``--rate``, a round at under this share of the offered rate did not keep up.
KEPT_UP = 0.95


@dataclass
class Config:
    name: str
    env: dict[str, str]
    sampled: float | None = None  # the sampling ratio when traced
    tree: Path = ROOT  # the checkout whose broker runs it
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # broker CPU per message
    cpu_ratios: list[float] = field(default_factory=list)  # to ``off`` of the same round
    rate_ratios: list[float] = field(default_factory=list)  # throughput, to the same round's
    raw_cpu_ratios: list[float] = field(default_factory=list)  # the same, idle CPU included
    threads: list[dict[str, float]] = field(default_factory=list)  # us/msg by thread, a round
    threads_system: list[dict[str, float]] = field(default_factory=list)  # of it, in the kernel
    spans_per_message: float = 0.0  # spans the sink received
    behind: int = 0  # rounds (with --rate) whose throughput fell short of the offered rate
    instances: list[int] = field(default_factory=list)  # which of its brokers ran each round

    @property
    def key(self) -> str:
        return self.name.replace(" ", "_").replace("%", "pct")

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_us)

    @property
    def cpu_overhead(self) -> float:
        """Median over rounds of this configuration's CPU per message to ``off``'s, minus 1."""
        return statistics.median(self.cpu_ratios) - 1

    @property
    def rate_ratio(self) -> float:
        """Median over rounds of this configuration's throughput to ``off``'s."""
        return statistics.median(self.rate_ratios)

    @property
    def raw_cpu_overhead(self) -> float:
        """:attr:`cpu_overhead` with the brokers' idle CPU after the load left in."""
        return statistics.median(self.raw_cpu_ratios) - 1


def configs(sink: str, compression: str = "none") -> list[Config]:
    def traced(key: str, ratio: float) -> dict[str, str]:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"{sink}/{key}",  # the sink tells them apart
            "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": compression,
        }
        if ratio < 1:
            env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            env["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
        return env

    cases = [
        Config("off", {"BROKER_METRICS": "false"}),
        Config("metrics", {"BROKER_METRICS": "true"}),
    ]
    for ratio in (1.0, 0.1, 0.01, 0.0):
        name = f"traced {ratio:.0%}"
        case = Config(name, {}, sampled=ratio)
        case.env = traced(case.key, ratio)
        cases.append(case)
    return cases


def with_baseline(cases: list[Config], tree: Path, sink: str) -> list[Config]:
    """The same configurations, run from ``tree`` (each exporting to a path of its own)."""
    if not (tree / "broker" / "__init__.py").is_file():
        raise SystemExit(f"--baseline-tree {tree}: no broker package there")
    out = []
    for case in cases:
        twin = Config(f"base {case.name}", dict(case.env), sampled=case.sampled, tree=tree)
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in twin.env:
            twin.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"{sink}/{twin.key}"
        out.append(twin)
    return out


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A confidence interval for the median of ``values`` that assumes nothing of their
    distribution: the k-th smallest and the k-th largest value, k the largest for which a
    median outside them is no likelier than ``1 - confidence`` (the binomial tail; with 6
    rounds the whole range, 96.9 %; with 12 the 3rd to the 10th, 96.1 %). Fewer than 6
    values give the whole range, at less than the confidence asked."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    tail, k, below = (1 - confidence) / 2, 1, 0.0
    for j in range(n // 2):
        below += math.comb(n, j) / 2**n  # P(fewer than j + 1 values below the median)
        if below > tail:
            break
        k = j + 1
    return ordered[k - 1], ordered[n - k]


def reference(cases: list[Config]) -> Config:
    """What overheads are measured against: ``base off``, else ``off``, else the first."""
    names = {c.name: c for c in cases}
    return names.get("base off") or names.get("off") or cases[0]


_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
}


class Sink:
    """An OTLP/HTTP endpoint that decodes every export, counts its spans by the path it was
    sent to (one per configuration) and drops them (a collector elsewhere)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.spans: dict[str, int] = {}
        self.exports: dict[str, int] = {}
        self.lock = threading.Lock()

        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                encoding = (self.headers.get("content-encoding") or "").lower()
                decoded = _DECODERS.get(encoding, bytes)(body)
                request = ExportTraceServiceRequest.FromString(decoded)
                count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                key = self.path.strip("/").split("/")[0]
                with sink.lock:
                    sink.bytes += len(body)
                    sink.spans[key] = sink.spans.get(key, 0) + count
                    sink.exports[key] = sink.exports.get(key, 0) + 1
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

    def exported(self, key: str) -> int:
        with self.lock:
            return self.exports.get(key, 0)

    def received(self, key: str) -> int:
        with self.lock:
            return self.spans.get(key, 0)


def start_broker(
    nats_url: str,
    config: Config,
    workdir: Path,
    *,
    prefix: Sequence[str] = (),
    ready_timeout: float = 60.0,
) -> Serve:
    """One configuration's ``broker serve``: one granian worker, only the ingress (run by
    ``prefix``, e.g. valgrind, when given)."""
    args = ["--workers", "1", "--nats-url", nats_url, "--projection-workers", "0"]
    broker = start_serve(
        workdir / config.key,
        [*args, "--routers", "0"],
        env=config.env,
        cwd=config.tree,
        prefix=prefix,
    )
    try:
        broker.wait_ready(ready_timeout)
    except ServeError as e:
        raise SystemExit(f"broker {config.name}: {e}") from None
    return broker


async def stored(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info("MESSAGES", subjects_filter=subject)
    await nc.close()
    return sum((info.state.subjects or {}).values())


def _tree(root: int) -> list[int]:
    """``root`` and every process below it, parents before children (Linux ``/proc``)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    order, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        order.append(pid)
        todo.extend(sorted(parents.get(pid, [])))
    return order


def _stat_times(path: Path) -> tuple[float, float]:
    """utime and stime of a ``/proc/.../stat`` file, in seconds (0 once it is gone)."""
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _stat_seconds(path: Path) -> float:
    """utime + stime of a ``/proc/.../stat`` file, in seconds (0 once it is gone)."""
    return sum(_stat_times(path))


def _cpu_seconds(root: int) -> float:
    """CPU time used so far by ``root`` and every process below it."""
    return sum(_stat_seconds(Path("/proc", str(pid), "stat")) for pid in _tree(root))


def _thread_seconds(root: int) -> dict[str, tuple[float, float]]:
    """User and system CPU time used so far by each thread of ``root``'s processes, labelled
    ``p<i>/t<j>``: the i-th process of the tree (``p0`` is ``broker serve``, the granian
    worker follows), its j-th thread by id (``t0`` is its main thread, where the event loop
    runs)."""
    out = {}
    for i, pid in enumerate(_tree(root)):
        try:
            tids = sorted(int(t.name) for t in Path("/proc", str(pid), "task").iterdir())
        except OSError:
            continue
        for j, tid in enumerate(tids):
            out[f"p{i}/t{j}"] = _stat_times(Path("/proc", str(pid), "task", str(tid), "stat"))
    return out


def settle(window: float = 0.5, busy: float = 0.05, timeout: float = 120.0) -> None:
    """Wait until this benchmark's processes (the brokers, the sink) are idle again: a traced
    broker exports its backlog after a run, and that must not slow the next one down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_seconds(os.getpid())
        time.sleep(window)
        if _cpu_seconds(os.getpid()) - before < busy * window:
            return


def idle_rates(pids: list[int], seconds: float = 10.0) -> dict[int, float]:
    """CPU seconds per second each (idle) broker spends on its own: timers, heartbeats (over
    ``seconds``: ``/proc`` counts in 10 ms ticks)."""
    before = {pid: _cpu_seconds(pid) for pid in pids}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {pid: (_cpu_seconds(pid) - before[pid]) / elapsed for pid in pids}


def wait_for_export(sink: Sink, config: Config, exports_before: int, timeout: float) -> None:
    """Wait until a traced broker has exported after its round (its batch processor exports
    what is left every ``OTEL_BSP_SCHEDULE_DELAY``, 5 s by default), so that export is
    measured with the round it belongs to."""
    if not config.sampled:
        return
    deadline = time.monotonic() + timeout
    while sink.exported(config.key) <= exports_before and time.monotonic() < deadline:
        time.sleep(0.05)


def drive(
    client: str,
    url: str,
    body: bytes,
    total: int,
    connections: int,
    streams: int,
    rate: float | None = None,
) -> Any:
    """``total`` publishes to ``url``, as fast as answered or at ``rate`` per second (h2load)."""
    headers = {"content-type": "application/json"}
    if client == "h2load":
        return run_h2load(
            url, body, headers, total=total, connections=connections, concurrency=streams, rate=rate
        )
    return run_python(url, body, headers, total=total, connections=connections, concurrency=streams)


#: The attributes of a publish's ``append`` span (broker/publisher.py); the server span's
#: are the edge wrapper's own (broker/telemetry/http.py).
APPEND_ATTRIBUTES = (
    "messaging.system",
    "nats",
    "messaging.destination.name",
    "msg.default.obs.inproc",
    "messaging.nats.stream",
    "MESSAGES",
    "messaging.nats.stream_sequence",
    123456,
    "messaging.nats.duplicate",
    False,
)


async def in_process_costs(sink: Sink) -> dict[str, float]:
    """Nanoseconds of CPU per call of what a request runs in-process (on an event loop, as in
    the ingress): tracing off, metrics on and off; then the spans of one publish and their
    OTLP export (encoding and the HTTP request to the sink), tracing on."""
    from broker.telemetry import metrics, tracing
    from broker.telemetry.http import _answered as answered

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

    # The server span ends as the ingress's edge wrapper ends it (its attributes, the
    # path's card scan among them, since 2026-11-29); the append span as the publisher's.
    scope = SimpleNamespace(path="/v1/publish/obs.inproc", method="POST", http_version="2")
    route = "/v1/publish/{subject}"

    def request_spans() -> None:  # what the ingress does per publish: server, append, inject
        timing = tracing.edge_timing(route, headers)
        if timing is None:  # tracing off or not sampled, as the ingress checks
            tracing.inject({})
            return
        append = tracing.child_timing("append", tracing.SpanKind.PRODUCER, current=False)
        assert append is not None
        tracing.inject({}, append)
        tracing.end_timing(append, APPEND_ATTRIBUTES)
        answered(timing, scope, scope.path, route, 200, error=None)

    n = 200_000
    costs = {}
    for name, fn in [
        ("empty function", empty),
        ("span() with tracing off", span_off),
        ("inject() with tracing off", inject_off),
        ("observe_request() metrics on", request_metrics),
    ]:
        costs[name] = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9
    costs["metrics flush, per request and its ack"] = flush_cost()
    metrics.set_enabled(False)
    costs["observe_request() metrics off"] = (
        min(timeit.repeat(request_metrics, number=n, repeat=5)) / n * 1e9
    )
    metrics.set_enabled(True)
    costs["request spans, tracing off"] = (
        min(timeit.repeat(request_spans, number=n, repeat=5)) / n * 1e9
    )
    costs.update(traced_costs(request_spans, sink))
    costs.update(cold_costs(request_spans))
    return costs


#: Bytes written before each call of :func:`cold_costs`: more than this machine's caches.
COLD_BYTES = 16 * 1024 * 1024


def cold_costs(request_spans: Callable[[], None], runs: int = 2000) -> dict[str, float]:
    """Median nanoseconds of one publish's spans, not sampled and sampled, each after
    :data:`COLD_BYTES` of other memory were written (no export: the recording only). In a
    loaded ingress sampling a tenth of the requests, a sampled request comes after several
    others and other processes have run: its code and data are out of the caches, and on
    2026-11-27 it cost the event loop 2-3x what a request sampled every time did."""
    from broker.telemetry import tracing

    other = bytearray(COLD_BYTES)
    clock = time.perf_counter_ns

    def median_after_eviction(fn: Callable[[], None]) -> float:
        took = []
        for _ in range(runs):
            # A load of every cache line (the strided copy), then a store to each: storing a
            # zero bytes object made once evicts less (sampled spans 8.5 µs instead of 13.5).
            other[::64] = bytes(len(other[::64]))
            started = clock()
            fn()
            took.append(clock() - started)
        return statistics.median(took)

    costs = {}
    for label, ratio in (("not sampled", 0.0), ("sampled", 1.0)):
        tracing.configure("bench", sampler_arg=ratio, sampler="traceidratio")  # no exporter
        try:
            empty = median_after_eviction(lambda: None)
            costs[f"request spans, {label}, caches cold"] = (
                median_after_eviction(request_spans) - empty
            )
        finally:
            tracing.disable()
    return costs


def flush_cost(requests: int = 8000) -> float:
    """Nanoseconds per request of the timer's flush: the hot paths only buffer a request and
    its ack, and the flush (every 0.5 s) folds them into the metric values."""
    from broker.telemetry import metrics

    best = float("inf")
    for _ in range(5):
        for i in range(requests):
            metrics.observe_request("/v1/publish/{subject}", "POST", 200, i * 1e-7)
            metrics.observe_ack(i * 1e-7, "MESSAGES", 256)
        started = time.perf_counter()
        metrics.flush()
        best = min(best, time.perf_counter() - started)
    return best / requests * 1e9


def traced_costs(request_spans: Callable[[], None], sink: Sink) -> dict[str, float]:
    """CPU per request of ``request_spans`` with tracing on, not sampled and sampled, and of
    the OTLP export of the sampled spans to ``sink``. Nothing is exported until the flush,
    which runs on this thread, so thread CPU time tells the request's part from the export."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from broker.telemetry import tracing

    costs = {}
    batch = {
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
        "OTEL_BSP_MAX_QUEUE_SIZE": "8192",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8192",
    }
    saved = {k: os.environ.get(k) for k in batch}
    os.environ.update(batch)
    runs = 4000  # 8000 spans: below the batch size
    try:
        for label, ratio in (("not sampled", 0.0), ("sampled", 1.0)):
            exporter = OTLPSpanExporter(endpoint=f"{sink.url}/inprocess/v1/traces")
            tracing.configure(
                "bench", exporters=[exporter], sampler_arg=ratio, sampler="traceidratio"
            )
            spans, export = [], []
            for _ in range(5):
                started = time.thread_time()
                for _ in range(runs):
                    request_spans()
                ran = time.thread_time()
                tracing.force_flush()
                spans.append((ran - started) / runs * 1e9)
                export.append((time.thread_time() - ran) / runs * 1e9)
            tracing.disable()
            costs[f"request spans, {label}"] = min(spans)
            if ratio:
                costs[f"OTLP export of those spans, {label}"] = min(export)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return costs


@contextlib.contextmanager
def running(
    args: argparse.Namespace, workdir: Path, cases: list[Config]
) -> Iterator[list[list[tuple[int, int]]]]:
    """One nats-server and ``--instances`` brokers per configuration, all started up front;
    yields each configuration's brokers as (port, pid)."""
    server = NatsServer(ServerSpec(store_dir=workdir / "nats")).start()
    brokers: list[Serve] = []
    try:
        for instance in range(args.instances):
            for config in cases:
                own = workdir / f"instance-{instance}" if instance else workdir  # data dirs
                brokers.append(start_broker(server.url, config, own))
        args.nats_url = server.url
        yield [[(b.port, b.pid) for b in brokers[i :: len(cases)]] for i in range(len(cases))]
    finally:
        for broker in brokers:  # all signalled at once, then waited for
            broker.terminate()
        for broker in brokers:
            broker.stop()
        server.stop()


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="requests per round")
    parser.add_argument(
        "--rounds", type=int, default=6, help="best a multiple of the configurations run"
    )
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32, help="streams per connection")
    parser.add_argument("--client", choices=["auto", "python", "h2load"], default="auto")
    parser.add_argument("--only", action="append", help="run only these configurations")
    parser.add_argument(
        "--compression",
        choices=["none", "gzip", "deflate"],
        default="none",
        help="OTEL_EXPORTER_OTLP_TRACES_COMPRESSION of the traced configurations",
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run every configuration from this checkout, as 'base <name>' (an A/B)",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="also report CPU per message by thread (p<process>/t<thread>, t0 = main thread), "
        "how much of it was in the kernel, and what a sampled publish costs the event loop's "
        "thread",
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="offer this many publishes per second (h2load --rps) instead of as many as the "
        "broker answers: the CPU per message at one load, the same for every configuration",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="brokers per configuration, taking the rounds in turn (a broker process has a CPU "
        "per message of its own, 5-20 %% off its twin's: more instances average it out); "
        "with more than one, the report gives each one's median",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.client == "auto":
        args.client = "h2load" if h2load_available() else "python"
    if args.rate is not None and (args.client != "h2load" or args.rate <= 0):
        parser.error("--rate needs h2load (--client h2load) and a rate above 0")
    return args


def main() -> None:
    args = _arguments()
    configure_logging("warning")  # the embedded server's debug lines would go to stdout
    payload = json_payload(args.payload_bytes)
    sink = Sink()
    cases = [c for c in configs(sink.url, args.compression) if not args.only or c.name in args.only]
    if args.baseline_tree is not None:
        cases = with_baseline(cases, args.baseline_tree.resolve(), sink.url) + cases
    with tempfile.TemporaryDirectory() as tmp, running(args, Path(tmp), cases) as brokers:
        for config, instances in zip(cases, brokers, strict=True):  # warm-up
            for port, _ in instances:
                url = f"http://127.0.0.1:{port}/v1/publish/obs.warm.{config.key}"
                drive(
                    args.client, url, payload, 2000, args.connections, args.concurrency, args.rate
                )
        for config in cases:
            wait_for_export(sink, config, 0, EXPORT_WAIT_S)
        settle()
        idle = idle_rates([pid for instances in brokers for _, pid in instances])
        print(
            "idle CPU per broker (ms/s): "
            + ", ".join(
                f"{c.name} {idle[pid] * 1e3:.2f}"
                for c, instances in zip(cases, brokers, strict=True)
                for _, pid in instances
            ),
            file=sys.stderr,
        )
        spans_before = {c.key: sink.received(c.key) for c in cases}
        for round_ in range(args.rounds):
            shift = round_ % len(cases)  # rotate: every position, never twice in a row
            instance = round_ % args.instances  # each broker of a configuration in turn
            cpu: dict[str, tuple[float, float]] = {}  # CPU per message, and with idle CPU
            for config in cases[shift:] + cases[:shift]:
                broker = brokers[cases.index(config)][instance]
                cpu[config.name] = measure(args, config, broker, round_, payload, sink, idle)
                config.instances.append(instance)
            ref = reference(cases)
            base, raw_base = cpu[ref.name]
            for config in cases:
                config.cpu_ratios.append(cpu[config.name][0] / base)
                config.raw_cpu_ratios.append(cpu[config.name][1] / raw_base)
                config.rate_ratios.append(config.rates[-1] / ref.rates[-1])
        for config in cases:
            config.spans_per_message = (sink.received(config.key) - spans_before[config.key]) / (
                args.rounds * args.messages
            )
    costs = asyncio.run(in_process_costs(sink))
    report(args, cases, costs, sink)


def measure(
    args: argparse.Namespace,
    config: Config,
    broker: tuple[int, int],
    round_: int,
    payload: bytes,
    sink: Sink,
    idle: dict[int, float],
) -> tuple[float, float]:
    """One configuration's load in one round: its throughput (kept in ``config``) and the
    CPU per message of its broker, less its idle CPU over the wait after the load, and
    with it. The stream must hold every message, and the round's spans reach the sink."""
    port, pid = broker
    subject = f"obs.r{round_}.{config.key}"
    url = f"http://127.0.0.1:{port}/v1/publish/{subject}"
    cpu_before = _cpu_seconds(pid)
    threads_before = _thread_seconds(pid) if args.threads else {}
    result: LoadResult = drive(
        args.client, url, payload, args.messages, args.connections, args.concurrency, args.rate
    )
    loaded_until = time.monotonic()
    exports = sink.exported(config.key)
    if result.ok != args.messages:
        raise SystemExit(f"{config.name}: {result.ok}/{args.messages} succeeded")
    if args.rate is not None and result.rate < KEPT_UP * args.rate:
        config.behind += 1  # not the offered load: its CPU is a saturated one
    count = asyncio.run(stored(args.nats_url, f"msg.default.{subject}"))
    if count != args.messages:
        raise SystemExit(f"{config.name}: stream holds {count}/{args.messages}")
    # The spans left in the batch processor are exported on its timer; that and the
    # backlog of a traced run are part of its cost.
    wait_for_export(sink, config, exports, EXPORT_WAIT_S)
    settle()
    waited = (time.monotonic() - loaded_until) * idle[pid]
    used = _cpu_seconds(pid) - cpu_before
    raw = used / args.messages * 1e6
    cpu = (used - waited) / args.messages * 1e6
    if args.threads:
        us_per_message = 1e6 / args.messages
        after = _thread_seconds(pid)
        before = {label: threads_before.get(label, (0.0, 0.0)) for label in after}
        config.threads.append(
            {label: (sum(t) - sum(before[label])) * us_per_message for label, t in after.items()}
        )
        config.threads_system.append(
            {label: (t[1] - before[label][1]) * us_per_message for label, t in after.items()}
        )
    config.rates.append(result.rate)
    config.cpu_us.append(cpu)
    print(
        f"round {round_ + 1} {config.name:<12} {result.rate:>8.0f} msgs/s "
        f"{cpu:>6.1f} us CPU/msg ({raw:.1f} with idle)",
        file=sys.stderr,
    )
    return cpu, raw


def report(
    args: argparse.Namespace, cases: list[Config], costs: dict[str, float], sink: Sink
) -> None:
    base = reference(cases)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    if args.json:
        document = {
            "machine": machine,
            "client": args.client,
            "messages_per_round": args.messages,
            "rounds": args.rounds,
            "instances": args.instances,
            "offered_rate": args.rate,
            "configs": {
                c.name: {
                    "median_msgs_per_s": round(c.rate),
                    "rounds_msgs_per_s": [round(r) for r in c.rates],
                    "ratio_to_off": round(c.rate_ratio, 3),
                    "ratio_to_off_95ci": [round(x, 3) for x in median_interval(c.rate_ratios)],
                    "rounds_ratio_to_off": [round(r, 3) for r in c.rate_ratios],
                    "median_cpu_us_per_msg": round(c.cpu, 1),
                    "rounds_cpu_us_per_msg": [round(u, 1) for u in c.cpu_us],
                    "cpu_overhead": round(c.cpu_overhead, 3),
                    "cpu_overhead_95ci": [round(x - 1, 3) for x in median_interval(c.cpu_ratios)],
                    "rounds_cpu_ratio_to_off": [round(r, 3) for r in c.cpu_ratios],
                    "cpu_overhead_idle_included": round(c.raw_cpu_overhead, 3),
                    "rounds_cpu_us_per_msg_by_thread": [
                        {label: round(us, 2) for label, us in r.items() if us} for r in c.threads
                    ],
                    "rounds_system_cpu_us_per_msg_by_thread": [
                        {label: round(us, 2) for label, us in r.items() if us}
                        for r in c.threads_system
                    ],
                    "spans_per_message": round(c.spans_per_message, 4),
                    "rounds_behind_offered_rate": c.behind,
                    "rounds_instance": c.instances,
                    "verdict": verdict(args, c, base),
                }
                for c in cases
            },
            "in_process_ns_per_call": {k: round(v, 1) for k, v in costs.items()},
            "otlp_bytes_exported": sink.bytes,
        }
        print(json.dumps(document, indent=2))
        return
    load = "as fast as answered" if args.rate is None else f"offered at {args.rate:.0f}/s"
    print(
        f"\nobservability overhead: {args.messages} single publishes x {args.rounds} rounds per "
        f"configuration ({load}), {args.payload_bytes}-byte payloads, 1 granian worker, client "
        f"{args.client}; {machine}"
    )
    print(
        f"{'configuration':<18}{'msgs/s':>9}{'ratio':>7}{'(95% CI)':>13}{'CPU us/msg':>12}"
        f"{'CPU +%':>8}{'(95% CI)':>14}{'idle in':>9}{'spans/msg':>11}  verdict  rounds msgs/s "
        "(target: overhead <= 10%)"
    )
    for c in cases:
        low, high = median_interval(c.rate_ratios)
        cpu_low, cpu_high = median_interval(c.cpu_ratios)
        rounds = ", ".join(f"{r:.0f}" for r in c.rates)
        print(
            f"{c.name:<18}{c.rate:>9.0f}{c.rate_ratio:>7.2f}{f'{low:.2f}..{high:.2f}':>13}"
            f"{c.cpu:>12.1f}{c.cpu_overhead:>8.1%}{f'{cpu_low - 1:+.0%}..{cpu_high - 1:+.0%}':>14}"
            f"{c.raw_cpu_overhead:>9.1%}{c.spans_per_message:>11.3f}  "
            f"{verdict(args, c, base):<7}  [{rounds}]"
        )
    print(
        f"ratio, CPU +%: medians over rounds of the throughput and of the CPU per message to "
        f"{base.name}'s in the same round, with a 95 % confidence interval of each median "
        "(distribution-free); CPU less each broker's idle CPU over the wait after the load "
        "('idle in': with it). Verdict: ok when the whole interval meets the target, over "
        "when none of it does, unclear between"
    )
    if args.rounds < MIN_ROUNDS_FOR_CI:
        print(
            f"fewer than {MIN_ROUNDS_FOR_CI} rounds: each interval is the rounds' whole range, "
            "with less than 95 % confidence"
        )
    if args.rate is not None:
        print(
            f"offered {args.rate:.0f} publishes/s: 'behind N' marks a configuration that fell "
            f"below {KEPT_UP:.0%} of it in N rounds (its CPU per message is then a saturated "
            "broker's, not comparable)"
        )
    print(f"OTLP bytes received by the sink: {sink.bytes:,}")
    if args.instances > 1:
        print(
            "\nCPU us/msg by broker instance, median over its rounds (an instance's own offset "
            "shows as a gap between twins):"
        )
        for c in cases:
            by_instance = [
                statistics.median(u for u, i in zip(c.cpu_us, c.instances, strict=True) if i == n)
                for n in range(args.instances)
                if n in c.instances
            ]
            print(f"  {c.name:<18}" + "  ".join(f"{u:6.1f}" for u in by_instance))
    if args.threads:
        print(
            "\nCPU us/msg by thread, median over rounds, and (in brackets) its median in the "
            "kernel (p0 = broker serve; t0 = main thread; /proc counts 10 ms ticks):"
        )
        for c in cases:
            print(
                f"  {c.name:<18}"
                + "  ".join(
                    f"{label} {thread_median(c.threads, label):5.1f} "
                    f"({thread_median(c.threads_system, label):4.1f})"
                    for label in busiest_threads(c)[:4]
                )
            )
        per_sampled_publish(cases)
    print("\nin-process CPU per call (ns):")
    for name, ns in costs.items():
        print(f"  {name:<46}{ns:>8.0f}")


def thread_median(rounds: list[dict[str, float]], label: str) -> float:
    """A thread's median µs/msg over rounds (0 in a round it did not run in)."""
    return statistics.median(r.get(label, 0.0) for r in rounds)


def busiest_threads(config: Config) -> list[str]:
    """A configuration's thread labels, the busiest (median over rounds) first."""
    labels = {label for round_ in config.threads for label in round_}
    return sorted(labels, key=lambda label: -thread_median(config.threads, label))


def per_sampled_publish(cases: list[Config]) -> None:
    """With ``--threads``: what a sampled publish costs the event loop's thread (the busiest
    thread of the unsampled configuration it is compared with), per configuration that
    sampled. At 10 % it was 4-6x what it was at 100 % in the runs of 2026-11-28 (the cold
    path): the figure that says whether a change made the sampled path smaller."""
    by_name = {c.name: c for c in cases}
    lines = []
    for c in cases:
        own = "base " if c.name.startswith("base ") else ""
        reference = by_name.get(f"{own}traced 0%") or by_name.get(f"{own}off")
        if reference is None or reference is c or not c.spans_per_message or not c.threads:
            continue
        loop = busiest_threads(reference)[0]
        added = thread_median(c.threads, loop) - thread_median(reference.threads, loop)
        sampled = c.spans_per_message / 2  # a sampled publish exports two spans
        lines.append(f"  {c.name:<18}{added / sampled:8.1f} us  ({loop}, against {reference.name})")
    if lines:
        print(
            "\nCPU per sampled publish on the event loop's thread (its median us/msg over the "
            "unsampled configuration's, per sampled publish; a difference of medians divided by "
            "the sampled share, so at 10 % its noise is ten times the thread's: read it from "
            "runs of 12 rounds or more):"
        )
        print("\n".join(lines))


def verdict(args: argparse.Namespace, case: Config, base: Config) -> str:
    """``ok`` when the target holds across the confidence intervals of both the throughput
    lost and the CPU added, ``over`` when it fails across either, else ``unclear``; ``behind
    N`` when (with ``--rate``) N rounds did not keep up with the offered rate."""
    if case is base:
        return ""
    if case.behind:
        return f"behind {case.behind}"
    cpu_low, cpu_high = (r - 1 for r in median_interval(case.cpu_ratios))
    if args.rate is None:  # at a fixed offered rate the throughputs are equal by design
        rate_low, rate_high = median_interval(case.rate_ratios)
        least, most = max(cpu_low, 1 - rate_high), max(cpu_high, 1 - rate_low)
    else:
        least, most = cpu_low, cpu_high
    if most <= TARGET_OVERHEAD:
        return "ok"
    return "over" if least > TARGET_OVERHEAD else "unclear"


if __name__ == "__main__":
    main()
