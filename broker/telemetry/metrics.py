"""Prometheus metrics of the whole broker, one registry across its processes.

Every metric is declared here, and the hot paths record through the small functions below:
label children are cached, counts are summed in the process and written to the metric
values at most half a second later (:func:`flush`), and everything returns at once when
``BROKER_METRICS=false``.

- ``broker_http_requests_total{route,method,status}``: requests answered (``route`` is the
  template, e.g. ``/v1/publish/{subject}``);
- ``broker_http_request_duration_seconds{route}``: request latency; the publish latency is
  ``route="/v1/publish/{subject}"`` (and ``/v1/publish`` for batches);
- ``broker_jetstream_ack_duration_seconds``: from sending a message to its PubAck (a publish
  whose ack did not come within the publish timeout is observed at the time it was given up);
- ``broker_jetstream_ack_timeouts_total``: publishes given up for want of a PubAck in time;
- ``broker_messages_in_total{stream}``, ``broker_bytes_in_total{stream}``: appended and
  acknowledged messages (duplicates excluded) and their payload bytes;
- ``broker_projection_applied_total{projection}`` (its ``rate()`` is the apply rate),
  ``broker_projection_lag_messages{projection}``,
  ``broker_projection_commit_duration_seconds{projection}``;
- ``broker_dlq_messages_total{source}``: a projection's name, or ``route``;
- ``broker_route_decisions_total{tenant,agent,reason}``,
  ``broker_route_decision_duration_seconds``;
- ``broker_agent_instances``, ``broker_agent_load_in_flight``, ``broker_agent_load_qps``,
  ``broker_agent_load_p99_seconds``, ``broker_agent_load_error_ratio`` (``{tenant,agent}``):
  live load as the routers see it;
- ``broker_decode_errors_total{codec}``: payloads that could not be decoded when read;
- ``broker_build_info{version,git_revision,nats_server_version}``: always 1.

For the router: call :func:`route_decided` once per decision (``agent`` is ``""`` when
nobody got the message; ``reason`` is the decision's reason), :func:`dead_lettered` with
``"route"`` for each message sent to ``dlq.<tenant>.route``, and :func:`agent_load` whenever
the router's view of an agent's live load changes (:func:`forget_agent` when its last
instance is gone). The metric objects are importable too (``ROUTE_DECISIONS``, ...).

**Several processes, one /metrics.** ``broker serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at
a fresh ``<data-dir>/metrics`` before it starts its children (granian workers, projection
workers, routers), so each of them writes its values to memory-mapped files there and any
ingress worker's ``/metrics`` adds them all up (prometheus-client's multiprocess mode).
Gauges say how they combine (``livemax``: the largest among live processes); ``serve``
forgets a child's live gauges when it exits (:mod:`broker.telemetry.multiproc`). A process started
on its own, without that variable, keeps its metrics in memory as usual.
"""

from __future__ import annotations

import contextlib
from asyncio import _get_running_loop
from bisect import bisect_left
from collections import Counter as CounterOf
from collections.abc import Iterable
from itertools import compress, repeat
from operator import eq
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from broker.telemetry.multiproc import multiprocess_dir

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

HTTP_REQUESTS = Counter(
    "broker_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "broker_http_request_duration_seconds",
    "Time from a request's arrival to the end of its handler, by route template.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
ACK_DURATION = Histogram(
    "broker_jetstream_ack_duration_seconds",
    "Time from sending a message to JetStream to its PubAck (or error) arriving, or to the "
    "publish being given up without one (counted in broker_jetstream_ack_timeouts_total).",
    buckets=_LATENCY_BUCKETS,
)
ACK_TIMEOUTS = Counter(
    "broker_jetstream_ack_timeouts",
    "Publishes given up because no PubAck came within the publish timeout (the message may "
    "still be stored); each is also observed in broker_jetstream_ack_duration_seconds.",
)
MESSAGES_IN = Counter(
    "broker_messages_in",
    "Messages appended and acknowledged by JetStream (duplicates excluded), by stream.",
    ["stream"],
)
BYTES_IN = Counter(
    "broker_bytes_in",
    "Payload bytes of the messages counted in broker_messages_in_total, by stream.",
    ["stream"],
)
PROJECTION_APPLIED = Counter(
    "broker_projection_applied",
    "Events applied by a projection (its rate is the apply rate).",
    ["projection"],
)
PROJECTION_LAG = Gauge(
    "broker_projection_lag_messages",
    "Messages of the stream a projection has not applied yet (largest over its workers).",
    ["projection"],
    multiprocess_mode="livemax",
)
PROJECTION_COMMIT = Histogram(
    "broker_projection_commit_duration_seconds",
    "Time to apply a fetched batch and commit it with its checkpoint.",
    ["projection"],
    buckets=_LATENCY_BUCKETS,
)
DLQ_MESSAGES = Counter(
    "broker_dlq_messages",
    "Messages sent to the DLQ stream, by what gave up on them.",
    ["source"],
)
ROUTE_DECISIONS = Counter(
    "broker_route_decisions",
    "Routing decisions, by chosen agent ('' when none) and reason.",
    ["tenant", "agent", "reason"],
)
ROUTE_DECISION_DURATION = Histogram(
    "broker_route_decision_duration_seconds",
    "Time a router took to decide where a message goes.",
    buckets=_LATENCY_BUCKETS,
)
AGENT_INSTANCES = Gauge(
    "broker_agent_instances",
    "Live instances of an agent, as the routers see them.",
    ["tenant", "agent"],
    multiprocess_mode="livemax",
)
AGENT_IN_FLIGHT = Gauge(
    "broker_agent_load_in_flight",
    "Messages an agent's instances are handling now, as the routers see them.",
    ["tenant", "agent"],
    multiprocess_mode="livemax",
)
AGENT_QPS = Gauge(
    "broker_agent_load_qps",
    "Messages per second an agent's instances handle, as the routers see them.",
    ["tenant", "agent"],
    multiprocess_mode="livemax",
)
AGENT_P99 = Gauge(
    "broker_agent_load_p99_seconds",
    "Slowest p99 handling time among an agent's instances, as the routers see them.",
    ["tenant", "agent"],
    multiprocess_mode="livemax",
)
AGENT_ERROR_RATIO = Gauge(
    "broker_agent_load_error_ratio",
    "Share of failed handlings among an agent's instances, as the routers see them.",
    ["tenant", "agent"],
    multiprocess_mode="livemax",
)
DECODE_ERRORS = Counter(
    "broker_decode_errors",
    "Payloads that could not be decoded when read, by codec.",
    ["codec"],
)
BUILD_INFO = Gauge(
    "broker_build_info",
    "Always 1; the labels say what runs.",
    ["version", "git_revision", "nats_server_version"],
    # Live processes only: a worker that exited (and saw another nats-server version) must
    # not keep its label set at 1 for the rest of the run.
    multiprocess_mode="livemax",
)

_on = True
_M = TypeVar("_M", Counter, Gauge, Histogram)
_children: dict[tuple[object, ...], object] = {}
#: How long hot-path counts may wait in this process before they reach the shared values.
FLUSH_SECONDS = 0.5


def set_enabled(on: bool) -> None:
    """``BROKER_METRICS``: when off, the recording functions below do nothing."""
    global _on  # noqa: PLW0603 - one process-wide switch, read on every hot-path call
    _on = on


def enabled() -> bool:
    return _on


def _child(metric: _M, *labels: str) -> _M:
    """``metric.labels(*labels)``, cached: the hot paths call this per request."""
    key = (id(metric), *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found  # type: ignore[return-value]


# --- buffered hot-path updates -------------------------------------------------------------
#
# In multiprocess mode every counter increment or histogram observation is a locked write to
# a memory-mapped file (about 4 microseconds per request for an observation, measured). And
# even in memory, a request's few metric updates cost several microseconds inside the loaded
# ingress, where the code runs with cold caches between the request's other work, against
# about one in a tight loop. So the per-request hot paths (one per HTTP request, one per
# JetStream ack) only append a tuple to a list, and a timer on the event loop turns at most
# FLUSH_SECONDS worth of them into metric updates in one tight loop: each label set's
# counter with one write, each histogram with one write per bucket that moved. Other
# recorders add to plain dicts, flushed by the same timer. Outside an event loop every call
# writes through at once (while no flush is pending on a loop that is still open; one that
# is takes it). Only the thread that runs the loop records.


class _Pending:
    __slots__ = ("bounds", "buckets", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.total = 0.0
        self.buckets = [0] * len(bounds)

    def add(self, value: float) -> None:
        self.total += value
        self.buckets[bisect_left(self.bounds, value)] += 1


_counts: dict[Counter, float] = {}
_observations: dict[Histogram, _Pending] = {}
#: ``(route, method, status, seconds)`` of each HTTP request since the last flush.
_requests: list[tuple[str, str, int, float]] = []
#: ``(stream or None, payload bytes, seconds)`` of each PubAck since the last flush; the
#: stream is ``None`` for an ack that appended nothing (a duplicate or an error).
_acks: list[tuple[str | None, int, float]] = []
#: No flush is pending on any loop (never the running loop, nor ``None``).
_NO_TIMER: object = object()
_timer_loop: Any = _NO_TIMER  # the loop where the pending flush will run


def _schedule() -> None:
    """Flush soon on the running loop (unless a flush is pending there already), or now when
    no loop runs on this thread.

    The per-request recorders come here only while no flush is pending, or the loop it was
    pending on has closed (a test's): looking up the running loop is a ``getpid()`` system
    call on Python 3.11, two per publish before, and while a flush is pending the next one
    is at most ``FLUSH_SECONDS`` away on the loop that records (one per process: the
    ingress's)."""
    global _timer_loop  # noqa: PLW0603 - one pending timer per process
    loop = _get_running_loop()
    if loop is _timer_loop:
        return
    if loop is None:
        flush()
        return
    _timer_loop = loop
    loop.call_later(FLUSH_SECONDS, flush)


def _add(child: Counter, amount: float) -> None:
    """Add ``amount`` to ``child`` at the next flush, scheduling none (the flush's folds)."""
    _counts[child] = _counts.get(child, 0.0) + amount


def _count(child: Counter, amount: float = 1.0) -> None:
    _add(child, amount)
    _schedule()


def _pending(child: Histogram) -> _Pending:
    pending = _observations.get(child)
    if pending is None:
        pending = _observations[child] = _Pending(list(child._upper_bounds))
    return pending


def _observe(child: Histogram, value: float) -> None:
    _pending(child).add(value)
    _schedule()


def flush() -> None:
    """Write what the hot paths recorded to the metric values (shared files in
    multiprocess mode). Called by the timer, and before this process renders metrics."""
    global _timer_loop  # noqa: PLW0603
    _timer_loop = _NO_TIMER
    if _requests:
        _fold_requests()
    if _acks:
        _fold_acks()
    for counter, amount in _counts.items():
        if amount:
            counter.inc(amount)
    _counts.clear()
    for histogram, pending in _observations.items():
        if not any(pending.buckets):
            continue
        # What Histogram.observe does per value, once per flush: the sum, then each bucket.
        histogram._sum.inc(pending.total)
        for index, hits in enumerate(pending.buckets):
            if hits:
                histogram._buckets[index].inc(hits)
                pending.buckets[index] = 0
        pending.total = 0.0


def _fold_requests() -> None:
    requests = _requests[:]
    _requests.clear()
    routes, methods, statuses, seconds = zip(*requests, strict=True)
    distinct = set(routes)
    if len(distinct) == 1 and len(set(methods)) == 1:  # the common case: count ints
        counted = {
            (routes[0], methods[0], status): hits for status, hits in CounterOf(statuses).items()
        }
    else:
        counted = CounterOf(zip(routes, methods, statuses, strict=True))
    for (route, method, status), hits in counted.items():
        label = method if method in METHODS else OTHER_METHOD  # bounded labels
        _add(_child(HTTP_REQUESTS, route, label, str(status)), hits)
    durations = np.fromiter(seconds, dtype=np.float64, count=len(seconds))
    if len(distinct) == 1:
        _add_all(_child(HTTP_DURATION, routes[0]), durations)
        return
    labels = np.array(routes, dtype=object)
    for route in distinct:
        _add_all(_child(HTTP_DURATION, route), durations[labels == route])


def _fold_acks() -> None:
    acks = _acks[:]
    _acks.clear()
    streams, sizes, seconds = zip(*acks, strict=True)
    _add_all(ACK_DURATION, np.fromiter(seconds, dtype=np.float64, count=len(seconds)))
    for stream in set(streams):
        if stream is None:  # a duplicate or an error: nothing appended
            continue
        _add(_child(MESSAGES_IN, stream), streams.count(stream))
        _add(_child(BYTES_IN, stream), sum(compress(sizes, map(eq, streams, repeat(stream)))))


def _add_all(child: Histogram, values: NDArray[np.float64]) -> None:
    """Observe every value of ``values`` in ``child`` (at its next flush)."""
    pending = _pending(child)
    pending.total += float(values.sum())
    hits = np.bincount(np.searchsorted(pending.bounds, values), minlength=len(pending.bounds))
    for index in np.flatnonzero(hits).tolist():
        pending.buckets[index] += int(hits[index])


# --- recording (the hot paths call these) ------------------------------------------------

#: The HTTP methods that are label values; any other is counted as OTHER_METHOD.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """One HTTP request answered (``method`` as received: bounded when flushed)."""
    if _on:
        _requests.append((route, method, status, seconds))
        if _timer_loop is _NO_TIMER or _timer_loop.is_closed():
            _schedule()


def observe_ack(seconds: float, stream: str | None = None, size: int = 0) -> None:
    """A PubAck (or error) ``seconds`` after sending; ``stream`` and the payload ``size``
    when it appended a message (not for a duplicate or an error)."""
    if _on:
        _acks.append((stream, size, seconds))
        if _timer_loop is _NO_TIMER or _timer_loop.is_closed():
            _schedule()


def ack_timed_out(seconds: float) -> None:
    """A publish given up ``seconds`` after sending, no PubAck having come: observed in the
    ack histogram at that time (so a stalled JetStream shows in its top buckets, where a late
    ack would never be matched) and counted as a timeout."""
    if _on:
        _acks.append((None, 0, seconds))
        _count(ACK_TIMEOUTS)


def projection_applied(projection: str, events: int, lag: int, commit_seconds: float) -> None:
    if _on:
        if events:
            _count(_child(PROJECTION_APPLIED, projection), events)
        _child(PROJECTION_LAG, projection).set(lag)
        _observe(_child(PROJECTION_COMMIT, projection), commit_seconds)


def projection_lag(projection: str, lag: int) -> None:
    if _on:
        _child(PROJECTION_LAG, projection).set(lag)


def dead_lettered(source: str) -> None:
    if _on:
        _child(DLQ_MESSAGES, source).inc()


def decode_error(codec: str) -> None:
    if _on:
        _count(_child(DECODE_ERRORS, codec))


def route_decided(
    tenant: str, agent: str | None, reason: str, seconds: float | None = None
) -> None:
    """One routing decision (the router calls this)."""
    if _on:
        _count(_child(ROUTE_DECISIONS, tenant, agent or "", reason))
        if seconds is not None:
            _observe(ROUTE_DECISION_DURATION, seconds)


def agent_load(
    tenant: str,
    agent: str,
    *,
    instances: int,
    in_flight: float,
    qps: float,
    p99_seconds: float,
    error_ratio: float,
) -> None:
    """An agent's live load as a router sees it (aggregated over its instances)."""
    if _on:
        _child(AGENT_INSTANCES, tenant, agent).set(instances)
        _child(AGENT_IN_FLIGHT, tenant, agent).set(in_flight)
        _child(AGENT_QPS, tenant, agent).set(qps)
        _child(AGENT_P99, tenant, agent).set(p99_seconds)
        _child(AGENT_ERROR_RATIO, tenant, agent).set(error_ratio)


_AGENT_GAUGES = (AGENT_INSTANCES, AGENT_IN_FLIGHT, AGENT_QPS, AGENT_P99, AGENT_ERROR_RATIO)


def forget_agent(tenant: str, agent: str) -> None:
    """The agent has no live instance left: its load gauges are no longer reported. Agents
    come and go (one per session, in some fleets), and a series kept at zero for each one
    ever seen would grow the exposition for the whole run. In one process their label sets
    are removed; in multiprocess mode, where a value cannot be removed from the shared
    files, they are set to zero and :func:`render` leaves out every load gauge of an agent
    whose instances read zero (the largest over the routers: one that still sees an
    instance keeps it reported)."""
    if not _on:
        return
    if multiprocess_dir() is not None:
        agent_load(tenant, agent, instances=0, in_flight=0, qps=0, p99_seconds=0, error_ratio=0)
        return
    for gauge in _AGENT_GAUGES:
        _children.pop((id(gauge), tenant, agent), None)
        with contextlib.suppress(KeyError):  # never reported by this process
            gauge.remove(tenant, agent)


_build_labels: list[tuple[str, str, str]] = []  # the label set this process last set


def build_info(version: str, git_revision: str, nats_server_version: str | None) -> None:
    """Set ``broker_build_info``; after a reconnection to another nats-server version the
    old label set is removed (in multiprocess mode, where values cannot be removed, set to 0
    and left out by :func:`render`)."""
    if not _on:
        return
    labels = (version, git_revision, nats_server_version or "unknown")
    for old in _build_labels:
        if old == labels:
            continue
        if multiprocess_dir() is None:
            BUILD_INFO.remove(*old)
        else:
            BUILD_INFO.labels(*old).set(0)
    BUILD_INFO.labels(*labels).set(1)
    _build_labels[:] = [labels]


def tls_expiry_exposition(expiries: Iterable[tuple[str, str, float]]) -> bytes:
    """``broker_tls_expiry_timestamp_seconds`` of this process, in the text format, from
    (file, path, Unix time) triples (:mod:`broker.telemetry.tls_expiry`): not a
    multiprocess gauge, whose files of exited ingress workers (granian's, which ``broker
    serve`` does not reap) kept their old values. Nothing when there are none (no TLS)."""
    expiries = list(expiries)
    if not expiries:
        return b""
    family = GaugeMetricFamily(
        "broker_tls_expiry_timestamp_seconds",
        "When a TLS file the broker uses stops being valid (Unix time): a "
        "certificate file's earliest notAfter, a CRL's next update.",
        labels=["file", "path"],
    )
    for file, path, timestamp in expiries:
        family.add_metric([file, path], timestamp)
    registry = CollectorRegistry()
    registry.register(_Families([family]))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# --- exposition and the multiprocess directory ---------------------------------------------


def render() -> bytes:
    """The Prometheus text exposition of every process of this broker (or of this process
    when it runs without ``PROMETHEUS_MULTIPROC_DIR``). Call :func:`flush` first, on the
    thread that records, for this process's latest counts."""
    if multiprocess_dir() is None:
        return generate_latest(REGISTRY)
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    registry.register(_LiveOnly(MultiProcessCollector(None)))  # type: ignore[no-untyped-call]
    return generate_latest(registry)


_AGENT_GAUGE_NAMES = frozenset(gauge._name for gauge in _AGENT_GAUGES)


class _LiveOnly(Collector):
    """The shared files' metrics less what only stays there because a multiprocess value
    cannot be removed: the load gauges of agents with no live instance
    (:func:`forget_agent`) and ``broker_build_info`` label sets set to 0
    (:func:`build_info`)."""

    def __init__(self, inner: Collector) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        families = list(self._inner.collect())
        gone = {
            (s.labels.get("tenant"), s.labels.get("agent"))
            for family in families
            if family.name == AGENT_INSTANCES._name
            for s in family.samples
            if s.value == 0
        }
        for family in families:
            if family.name in _AGENT_GAUGE_NAMES and gone:
                family.samples = [
                    s
                    for s in family.samples
                    if (s.labels.get("tenant"), s.labels.get("agent")) not in gone
                ]
            elif family.name == BUILD_INFO._name:
                family.samples = [s for s in family.samples if s.value != 0]
        return families
