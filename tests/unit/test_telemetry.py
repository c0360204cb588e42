"""Tracing, metrics, log fields and the status document, without any I/O."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from broker.routing.load import InstanceLoad
from broker.telemetry import metrics, tracing
from broker.telemetry.http import OTHER, route_of
from broker.telemetry.logfields import REDACTED, add_trace_ids, redact_secrets
from broker.telemetry.status import (
    AgentState,
    BrokerStatus,
    BuildInfo,
    ConsumerState,
    _dlq_entry,
    _route,
)
from tests._wait import await_until

pytestmark = pytest.mark.unit

PARENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN = 0xB7AD6B7169203331
SAMPLED = {"traceparent": f"00-{PARENT_TRACE:032x}-{PARENT_SPAN:016x}-01", "tracestate": "k=v"}
UNSAMPLED = {"traceparent": f"00-{PARENT_TRACE:032x}-{PARENT_SPAN:016x}-00"}


@pytest.fixture(autouse=True)
def _tracing_off_after() -> Iterator[None]:
    yield
    tracing.disable()
    metrics.set_enabled(True)


def spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


# --- tracing ---------------------------------------------------------------------------------


def test_span_is_one_shared_no_op_while_tracing_is_off() -> None:
    """Off by default: every call returns the same object and touches no headers."""
    assert not tracing.enabled()
    assert tracing.span("a") is tracing.span("b", parent_headers=SAMPLED)
    headers = {"traceparent": "from-client"}
    with tracing.span("a") as span:
        assert not span.is_recording()
        tracing.inject(headers)
    assert headers == {"traceparent": "from-client"}
    assert tracing.current() is None


@given(
    st.integers(min_value=1, max_value=2**128 - 1),
    st.integers(min_value=1, max_value=2**64 - 1),
    st.booleans(),
)
def test_traceparent_round_trips(trace_id: int, span_id: int, sampled: bool) -> None:
    context = tracing.TraceContext(trace_id, span_id, sampled)
    assert tracing.extract({"traceparent": context.traceparent}) == context


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",  # not hex
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # v00 is exact
    ],
)
def test_malformed_traceparent_is_ignored(value: str) -> None:
    assert tracing.extract({"traceparent": value}) is None


def test_extract_reads_nats_and_cloudevents_spellings() -> None:
    value = SAMPLED["traceparent"]
    for key in ("traceparent", "Traceparent", "ce-traceparent"):
        found = tracing.extract({key: value})
        assert found is not None
        assert found.trace_id == PARENT_TRACE


def test_span_continues_the_trace_in_parent_headers(exporter: InMemorySpanExporter) -> None:
    """The span is a child of the message's span; inject hands its own id to the next hop."""
    headers: dict[str, str] = {}
    with tracing.span("route", parent_headers=SAMPLED, kind=SpanKind.CONSUMER) as span:
        span.set_attribute("broker.agent", "ocr")
        tracing.inject(headers)
    (recorded,) = exporter.get_finished_spans()
    assert recorded.context is not None
    assert recorded.parent is not None
    assert recorded.context.trace_id == PARENT_TRACE
    assert recorded.parent.span_id == PARENT_SPAN
    assert recorded.kind is SpanKind.CONSUMER
    assert recorded.attributes == {"broker.agent": "ocr"}
    assert headers["traceparent"] == (f"00-{PARENT_TRACE:032x}-{recorded.context.span_id:016x}-01")
    assert headers["tracestate"] == "k=v"


def test_nested_spans_form_one_trace(exporter: InMemorySpanExporter) -> None:
    with tracing.span("ingress", start_trace=True), tracing.span("append"):
        pass
    found = spans(exporter)
    ingress, append = found["ingress"], found["append"]
    assert ingress.parent is None  # a new root: no context came in
    assert ingress.context is not None
    assert append.context is not None
    assert append.parent is not None
    assert append.context.trace_id == ingress.context.trace_id
    assert append.parent.span_id == ingress.context.span_id


def test_a_trace_that_is_not_sampled_records_and_passes_on_nothing(
    exporter: InMemorySpanExporter,
) -> None:
    """The parent's decision holds: no span, no context, nothing injected (the shared no-op)."""
    headers: dict[str, str] = {}
    scope = tracing.span("route", parent_headers=UNSAMPLED)
    assert scope is tracing.span("other")
    with scope as span, tracing.span("child"):
        assert not span.is_recording()
        tracing.inject(headers)
        assert tracing.current() is None
    assert exporter.get_finished_spans() == ()
    assert headers == {}


def test_only_an_edge_starts_a_trace(exporter: InMemorySpanExporter) -> None:
    """A span with no trace to continue records nothing unless it may start one."""
    with tracing.span("append"), tracing.span("project", parent_headers={}):
        assert tracing.current() is None
    with tracing.span("POST /v1/publish/{subject}", start_trace=True), tracing.span("append"):
        assert tracing.current() is not None
    assert [s.name for s in exporter.get_finished_spans()] == [
        "append",
        "POST /v1/publish/{subject}",
    ]


@pytest.fixture
def ratio_zero() -> InMemorySpanExporter:
    """Tracing on, parent-based with ratio 0: no root is sampled, a parent's decision holds."""
    memory = InMemorySpanExporter()
    tracing.configure(
        "test",
        processors=[SimpleSpanProcessor(memory)],
        sampler="parentbased_traceidratio",
        sampler_arg=0.0,
    )
    return memory


def test_edge_timing_decides_like_a_span_that_may_start_a_trace(
    ratio_zero: InMemorySpanExporter,
) -> None:
    """The ingress's fast path: no header and not sampled gives no timing; a sampled parent
    (W3C or CloudEvents spelling) is continued whatever the ratio, as a server span."""
    memory = ratio_zero
    assert tracing.edge_timing("/x", {}) is None
    assert tracing.edge_timing("/x", UNSAMPLED) is None
    ce_parent = {"ce-traceparent": SAMPLED["traceparent"]}
    for parent in (SAMPLED, ce_parent):
        timing = tracing.edge_timing("/x", parent)
        assert timing is not None
        tracing.end_timing(timing)
    assert tracing.current() is None
    finished = memory.get_finished_spans()
    assert [(s.context.trace_id, s.parent.span_id, s.parent.is_remote) for s in finished] == [
        (PARENT_TRACE, PARENT_SPAN, True)
    ] * 2
    assert [(s.name, s.kind) for s in finished] == [("/x", SpanKind.SERVER)] * 2


def test_edge_timing_starts_a_root_when_sampled_and_is_nothing_when_off(
    exporter: InMemorySpanExporter,
) -> None:
    timing = tracing.edge_timing("/v1/publish/{subject}", {})
    assert timing is not None
    running = tracing.current()
    assert running is not None
    assert (running.span_id, running.span) == (timing.span_id, timing)
    tracing.end_timing(timing, name="POST /v1/publish/{subject}")
    (root,) = exporter.get_finished_spans()
    assert root.parent is None
    assert root.name == "POST /v1/publish/{subject}"
    tracing.disable()
    assert tracing.edge_timing("/x", SAMPLED) is None
    assert tracing.edge_timing("/x", {}) is None


def test_ratio_zero_samples_no_root_but_keeps_parents_decision(
    ratio_zero: InMemorySpanExporter,
) -> None:
    memory = ratio_zero
    with tracing.span("root", start_trace=True):
        pass
    with tracing.span("child-of-sampled", parent_headers=SAMPLED):
        pass
    assert [s.name for s in memory.get_finished_spans()] == ["child-of-sampled"]


_OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``OTEL_*`` tracing variable set, whatever the environment running the tests has."""
    for name in _OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _tracing_from_env() -> tuple[bool, list[dict[str, Any]]]:
    with capture_logs() as logs:
        on = tracing.configure_from_env("test")
    return on, logs


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),  # nothing asks for tracing
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ],
)
def test_tracing_is_on_only_when_the_environment_names_an_exporter(
    otel_env: pytest.MonkeyPatch, env: dict[str, str], on: bool
) -> None:
    for name, value in env.items():
        otel_env.setenv(name, value)
    assert _tracing_from_env()[0] is on
    assert tracing.enabled() is on


@pytest.mark.parametrize(
    ("sampler", "arg", "ratio", "hinted"),
    [
        (None, None, 1.0, True),  # the standard default: every new trace
        ("parentbased_traceidratio", "0.5", 0.5, True),
        ("parentbased_traceidratio", "0.1", 0.1, False),
        ("parentbased_traceidratio", "0.01", 0.01, False),
        ("traceidratio", "not a number", 1.0, True),  # the argument ignored, as the SDK does
        ("parentbased_always_off", None, 0.0, False),
    ],
)
def test_the_start_up_line_gives_the_sampled_share_and_warns_of_a_busy_ingress_cost(
    otel_env: pytest.MonkeyPatch, sampler: str | None, arg: str | None, ratio: float, hinted: bool
) -> None:
    """An operator who turns tracing on with the standard defaults samples every request;
    the start-up line says what share is sampled and, above a tenth, what that costs and
    how to sample less."""
    otel_env.setenv("OTEL_TRACES_EXPORTER", "console")
    if sampler is not None:
        otel_env.setenv("OTEL_TRACES_SAMPLER", sampler)
    if arg is not None:
        otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    on, logs = _tracing_from_env()
    assert on
    (line,) = [entry for entry in logs if entry["event"] == "tracing_enabled"]
    assert line["ratio"] == pytest.approx(ratio)
    assert line["sampler"] == (sampler or "parentbased_always_on")
    assert ("hint" in line) is hinted
    if hinted:
        assert "OTEL_TRACES_SAMPLER_ARG=0.01" in line["hint"]
    if arg == "not a number":
        assert any(e["event"] == "otel_sampler_arg_invalid" for e in logs)


def test_exception_marks_the_span_failed(exporter: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError), tracing.span("agent", start_trace=True):
        raise RuntimeError("boom")
    (recorded,) = exporter.get_finished_spans()
    assert recorded.status.status_code is StatusCode.ERROR
    assert [e.name for e in recorded.events] == ["exception"]


class Unprintable(Exception):
    """An exception whose ``__str__`` reads an argument its ``__init__`` never passed on."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])


def test_an_unprintable_exception_is_recorded_and_the_context_restored(
    exporter: InMemorySpanExporter,
) -> None:
    with pytest.raises(Unprintable), tracing.span("agent", parent_headers=SAMPLED):
        raise Unprintable(7)
    assert tracing.current() is None
    (recorded,) = exporter.get_finished_spans()
    (event,) = recorded.events
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "<Unprintable: str() failed>"


def test_a_failing_span_processor_fails_neither_the_block_nor_the_context() -> None:
    class Failing(SimpleSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            raise RuntimeError("processor failed")

    memory = InMemorySpanExporter()
    tracing.configure(
        "test", processors=[Failing(InMemorySpanExporter()), SimpleSpanProcessor(memory)]
    )
    with capture_logs() as logs:
        for _ in range(2):
            with tracing.span("agent", parent_headers=SAMPLED):
                pass
            assert tracing.current() is None
    assert [s.name for s in memory.get_finished_spans()] == ["agent", "agent"]
    failed = [e for e in logs if e["event"] == "span_processor_failed"]
    assert len(failed) == 1  # the first of many, not one a span
    assert failed[0]["processor"].endswith("Failing")
    pipeline = tracing._config.pipeline
    assert pipeline is not None
    assert pipeline.processor_errors == 2


def test_batch_spans_continue_each_messages_own_trace(exporter: InMemorySpanExporter) -> None:
    """One span per traced, sampled message; untraced and unsampled ones get none."""
    other = tracing.TraceContext(0x1234, 0x5678, True)
    batch = [SAMPLED, {}, UNSAMPLED, {"traceparent": other.traceparent}]
    with tracing.batch_spans("project replica", batch, attributes=[{"seq": i} for i in range(4)]):
        pass
    recorded = exporter.get_finished_spans()
    assert [(s.context.trace_id if s.context else 0) for s in recorded] == [PARENT_TRACE, 0x1234]
    assert [s.parent.span_id if s.parent else 0 for s in recorded] == [PARENT_SPAN, 0x5678]
    assert [dict(s.attributes or {})["seq"] for s in recorded] == [0, 3]


def test_sdk_spans_are_current_in_opentelemetrys_own_context(
    exporter: InMemorySpanExporter,
) -> None:
    """Code that uses the OpenTelemetry API directly (in an agent handler) nests inside."""
    from opentelemetry import trace

    with tracing.span("agent", start_trace=True) as outer:
        assert trace.get_current_span() is outer


# --- logs ------------------------------------------------------------------------------------


def test_log_lines_carry_the_running_spans_ids(exporter: InMemorySpanExporter) -> None:
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[add_trace_ids, redact_secrets, capture])
    try:
        log = structlog.get_logger("test")
        with tracing.span("route", parent_headers=SAMPLED):
            log.info("route_decided", agent="ocr")
        log.info("outside_any_span")
    finally:
        structlog.reset_defaults()
    inside, outside = capture.entries
    assert inside["trace_id"] == f"{PARENT_TRACE:032x}"
    assert len(inside["span_id"]) == 16
    assert "trace_id" not in outside


def test_secrets_and_payloads_never_reach_a_log_line() -> None:
    line: dict[str, Any] = {
        "event": "nats_connect_failed",
        "servers": ["nats://alice:s3cret@n1:4222", "nats://n2:4222"],
        "replica_url": "postgresql://bob:hunter2@db/replica",
        "password": "hunter2",
        "api_key": "k",
        "authorization": "Bearer x",
        "payload": b"\x00" * 10,
        "subject": "orders.created",
    }
    redact_secrets(None, "info", line)
    assert line["servers"] == ["nats://***@n1:4222", "nats://n2:4222"]
    assert line["replica_url"] == "postgresql://***@db/replica"
    assert line["password"] == line["api_key"] == line["authorization"] == REDACTED
    assert line["payload"] == "[payload omitted: 10 bytes]"
    assert line["subject"] == "orders.created"
    assert "hunter2" not in orjson.dumps(line).decode()


@pytest.mark.parametrize(
    ("field", "value", "secret"),
    [
        ("headers", [("authorization", "Bearer sk-live-1"), ("accept", "x")], "sk-live-1"),
        ("headers", [["Cookie", "sid=abc123"]], "abc123"),
        ("event", "connecting to nats://alice:s3cret@nats:4222", "s3cret"),
        ("event", {"password": "hunter2"}, "hunter2"),
        ("user_jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "eyJzdWIiOiJ4In0"),
        ("auth", "Bearer sk-live-1", "sk-live-1"),
        ("nkey_seed", "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY", "SUACSSL3"),
        (
            "error",
            "bad creds -----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1Qi.eyJhIjoxfQ.x\n"
            "------END NATS USER JWT------\n-----BEGIN USER NKEY SEED-----\nSUAxxyyzz\n",
            "SUAxxyyzz",
        ),
        ("error", "upstream said: Authorization: Bearer sk-live-1", "sk-live-1"),
        ("error", "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln expired", "eyJzdWIiOiJ4In0"),
        ("error", "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY is bad", "SUACSSL3"),
        ("webhook", "https://hooks.example/x?token=abc123&page=2", "abc123"),
        ("webhook", "https://hooks.example/x?page=2&api_key=zzz", "zzz"),
        ("seen", frozenset({"nats://u:pw9@h"}), "pw9"),
        ("data", b'{"ssn":"123-45-6789"}', "123-45-6789"),
    ],
)
def test_secrets_inside_values_never_reach_a_log_line(field: str, value: Any, secret: str) -> None:
    """Found by review: header pairs, credentials in free text and in the event itself, key
    names the rule missed, sets, raw bytes."""
    line = redact_secrets(None, "info", {"event": "x", field: value})
    assert secret not in orjson.dumps(line, default=str).decode()


def test_plain_values_are_logged_as_they_are() -> None:
    line: dict[str, Any] = {
        "event": "request_failed basic checks",
        "subject": "orders.created",
        "url": "https://example.com/x?page=2",
        "headers": [("accept", "application/json")],
        "note": "a token bucket emptied; Bearer-less request",
    }
    assert redact_secrets(None, "info", dict(line)) == line


# --- metrics ---------------------------------------------------------------------------------


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v1/publish/orders.created", "/v1/publish/{subject}"),
        ("/v1/publish", "/v1/publish"),
        ("/v1/route/images.ocr", "/v1/route/{subject}"),
        ("/v1/agents/ocr/history", "/v1/agents/{name}"),
        ("/v1/streams/MESSAGES/messages", "/v1/streams/{stream}/messages"),
        ("/registry/subjects/x/versions", "/registry"),
        ("/metrics", "/metrics"),
        ("/../../etc/passwd", OTHER),
    ],
)
def test_routes_are_labelled_by_template_never_by_raw_path(path: str, route: str) -> None:
    assert route_of(path) == route


def test_request_and_append_metrics_count_what_happened() -> None:
    labels = {"route": "/v1/publish/{subject}", "method": "POST", "status": "200"}
    before = sample("broker_http_requests_total", labels)
    latency_before = sample(
        "broker_http_request_duration_seconds_count", {"route": labels["route"]}
    )
    bytes_before = sample("broker_bytes_in_total", {"stream": "MESSAGES"})
    metrics.observe_request("/v1/publish/{subject}", "POST", 200, 0.002)
    metrics.observe_request("/v1/publish/{subject}", "POST", 200, 0.004)
    metrics.observe_ack(0.001, "MESSAGES", 256)
    assert sample("broker_http_requests_total", labels) == before + 2
    assert (
        sample("broker_http_request_duration_seconds_count", {"route": labels["route"]})
        == latency_before + 2
    )
    assert sample("broker_bytes_in_total", {"stream": "MESSAGES"}) == bytes_before + 256
    text = metrics.render().decode()
    assert "broker_http_requests_total{" in text
    assert "broker_jetstream_ack_duration_seconds_bucket" in text


def test_router_facing_metrics_record_decisions_and_load() -> None:
    labels = {"tenant": "t", "agent": "ocr", "reason": "scored"}
    before = sample("broker_route_decisions_total", labels)
    metrics.route_decided("t", "ocr", "scored", 0.001)
    metrics.route_decided("t", None, "no_candidate")
    metrics.agent_load("t", "ocr", instances=2, in_flight=3, qps=10, p99_seconds=0.2, error_ratio=0)
    assert sample("broker_route_decisions_total", labels) == before + 1
    assert sample("broker_route_decisions_total", {**labels, "agent": "", "reason": "no_candidate"})
    assert sample("broker_agent_load_in_flight", {"tenant": "t", "agent": "ocr"}) == 3
    metrics.forget_agent("t", "ocr")
    for name in ("broker_agent_instances", "broker_agent_load_in_flight"):
        # An agent that is gone is not reported at all, not kept at zero for the whole run.
        assert REGISTRY.get_sample_value(name, {"tenant": "t", "agent": "ocr"}) is None
    shown = metrics.render().decode().splitlines()
    assert not [line for line in shown if line.startswith("broker_agent_") and "ocr" in line]
    metrics.forget_agent("t", "never-seen")  # nothing to remove: no error
    metrics.agent_load("t", "ocr", instances=1, in_flight=0, qps=1, p99_seconds=0, error_ratio=0)
    assert sample("broker_agent_instances", {"tenant": "t", "agent": "ocr"}) == 1  # back


async def test_counts_on_an_event_loop_reach_the_registry_within_the_flush_interval() -> None:
    """On the loop, the hot paths only add to a dict; a timer writes the sums soon after."""
    labels = {"route": "/v1/route/{subject}", "method": "POST", "status": "202"}
    before = sample("broker_http_requests_total", labels)
    for _ in range(3):
        metrics.observe_request("/v1/route/{subject}", "POST", 202, 0.01)
    assert sample("broker_http_requests_total", labels) == before  # buffered, not written

    async def written() -> bool:
        return sample("broker_http_requests_total", labels) == before + 3

    assert await await_until(written, timeout=metrics.FLUSH_SECONDS * 10)
    bucket = sample(
        "broker_http_request_duration_seconds_bucket",
        {"route": "/v1/route/{subject}", "le": "0.01"},
    )
    assert bucket >= 3


def test_counts_after_a_loop_closed_with_its_flush_pending_still_reach_the_registry() -> None:
    """The recorders look for the running loop only while no flush is pending, or when the
    loop it is pending on has closed (it will never run it): then the counts buffered for it,
    and the new ones, are written like any made outside a loop."""
    labels = {"route": "/v1/streams/{stream}/messages", "method": "GET", "status": "200"}
    before = sample("broker_http_requests_total", labels)

    async def record() -> None:
        metrics.observe_request(labels["route"], "GET", 200, 0.01)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(record())  # its flush is now pending on this loop...
    loop.close()  # ...which will never run it
    assert sample("broker_http_requests_total", labels) == before
    metrics.observe_request(labels["route"], "GET", 200, 0.01)  # outside any loop
    assert sample("broker_http_requests_total", labels) == before + 2


def test_a_flush_folds_buffered_requests_and_acks_into_every_label_set() -> None:
    """Mixed routes, methods and statuses; unknown methods count as OTHER; the latency
    buckets match Histogram.observe's; duplicates and errors time the ack but add no
    message or bytes."""
    routes = ["/v1/publish/{subject}", "/v1/route/{subject}"]
    statuses = [200, 202, 503]
    methods = ["POST", "BREW"]
    durations = [0.0004, 0.001, 0.003, 0.2, 30.0]
    labels = [(r, m, s) for r in routes for m in methods for s in statuses]

    def request_count(route: str, method: str, status: int) -> float:
        return sample(
            "broker_http_requests_total", {"route": route, "method": method, "status": str(status)}
        )

    def bucket(name: str, le: str, **extra: str) -> float:
        return sample(name + "_bucket", {**extra, "le": le})

    metrics.flush()  # what an earlier test in this process left buffered counts before
    before = {(r, m, s): request_count(r, "OTHER" if m == "BREW" else m, s) for r, m, s in labels}
    le_1ms = {r: bucket("broker_http_request_duration_seconds", "0.001", route=r) for r in routes}
    acks_before = sample("broker_jetstream_ack_duration_seconds_count")
    acks_le_1ms = bucket("broker_jetstream_ack_duration_seconds", "0.001")
    messages_before = sample("broker_messages_in_total", {"stream": "FOLD"})
    bytes_before = sample("broker_bytes_in_total", {"stream": "FOLD"})
    for route, method, status in labels:
        for seconds in durations:
            metrics._requests.append((route, method, status, seconds))
    for seconds in durations:
        metrics._acks.append(("FOLD", 100, seconds))
        metrics._acks.append((None, 100, seconds))  # a duplicate or an error
    metrics.flush()
    for route, method, status in labels:
        label = "OTHER" if method == "BREW" else method
        assert request_count(route, label, status) == before[(route, method, status)] + len(
            durations
        )
    per_route = len(methods) * len(statuses)
    for route in routes:
        # 0.0004 and 0.001 are <= 1 ms (le is inclusive, as in Histogram.observe)
        assert bucket("broker_http_request_duration_seconds", "0.001", route=route) == (
            le_1ms[route] + 2 * per_route
        )
    assert sample("broker_jetstream_ack_duration_seconds_count") == acks_before + 10
    assert bucket("broker_jetstream_ack_duration_seconds", "0.001") == acks_le_1ms + 4
    assert sample("broker_messages_in_total", {"stream": "FOLD"}) == messages_before + 5
    assert sample("broker_bytes_in_total", {"stream": "FOLD"}) == bytes_before + 500
    assert metrics._requests == []
    assert metrics._acks == []


def test_tune_gc_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    import subprocess
    import sys

    code = (
        "import gc\n"
        "from broker._process import GC_YOUNG_THRESHOLD, tune_gc\n"
        "frozen = tune_gc()\n"
        "assert frozen == gc.get_freeze_count() > 1000, frozen\n"
        "assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD, gc.get_threshold()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_metrics_switched_off_record_nothing() -> None:
    metrics.set_enabled(False)
    before = sample("broker_decode_errors_total", {"codec": "avro"})
    metrics.decode_error("avro")
    assert sample("broker_decode_errors_total", {"codec": "avro"}) == before
    metrics.set_enabled(True)
    metrics.decode_error("avro")
    assert sample("broker_decode_errors_total", {"codec": "avro"}) == before + 1


# --- the status document ---------------------------------------------------------------------


def stored(subject: str, stream: str, seq: int, headers: dict[str, str]) -> Msg:
    """A message as a JetStream consumer delivers it (the reply subject is its metadata)."""
    reply = f"$JS.ACK.{stream}.reader.1.{seq}.1.1764000000000000000.0"
    return Msg(_client=None, subject=subject, reply=reply, data=b"{}", headers=headers)  # type: ignore[arg-type]


def test_route_decision_is_read_from_its_broker_route_header() -> None:
    decision = {
        "agent": "ocr",
        "capability": "extract_text",
        "reason": "scored",
        "detail": "best of 2",
        "candidates": [
            {"agent": "ocr", "capability": "extract_text", "score": 0.91, "semantic": 0.8},
            {"agent": "echo", "capability": "handle", "score": 0.2, "semantic": 0.1},
        ],
        "policy_version": "default-1",
        "attempt": 1,
        "message_seq": 41,
        "message_subject": "msg.default.images.scan",
        "decided_at": "2026-11-25T10:00:00+00:00",
    }
    headers = {
        "Broker-Event": "RouteDecided",
        "Broker-Route": orjson.dumps(decision).decode(),
        **SAMPLED,
    }
    route = _route(stored("route.default.ocr", "ROUTES", 7, headers))
    assert route is not None
    assert (route.agent, route.reason, route.message_seq, route.seq) == ("ocr", "scored", 41, 7)
    assert [c["score"] for c in route.candidates] == [0.91, 0.2]
    assert route.trace_id == f"{PARENT_TRACE:032x}"
    assert _route(stored("route.default.ocr", "ROUTES", 8, {})) is None


def test_dlq_entries_name_what_gave_up() -> None:
    projection = _dlq_entry(
        stored(
            "dlq.MESSAGES.replica_messages",
            "DLQ",
            3,
            {
                "Broker-Dlq-Projection": "replica_messages",
                "Broker-Dlq-Error": "bad row",
                "Broker-Dlq-Stream": "MESSAGES",
                "Broker-Dlq-Seq": "12",
            },
        )
    )
    assert (projection.source, projection.error, projection.origin_seq) == (
        "replica_messages",
        "bad row",
        12,
    )
    route_header = orjson.dumps({"reason": "no_candidate", "message_seq": 5}).decode()
    route = _dlq_entry(stored("dlq.default.route", "DLQ", 4, {"Broker-Route": route_header}))
    assert (route.source, route.error, route.origin_seq) == ("route", "no_candidate", 5)


def test_status_document_carries_lag_and_the_agent_load_the_routers_aggregate() -> None:
    """Rates and in-flight add up, latency is the worst instance's and the error rate is
    the instances' weighted by their QPS (as ``/metrics`` shows it; not the worst's)."""
    instance = InstanceLoad(
        "default", "ocr", "i1", qps=5.0, in_flight=2, p99_ms=40.0, error_rate=0.01
    )
    other = InstanceLoad(
        "default", "ocr", "i2", qps=3.0, in_flight=1, p99_ms=80.0, gpu_free_mb=1024.0
    )
    document = BrokerStatus(
        generated_at="now",
        broker=BuildInfo("0.1.0", "abc", "2.15.1", "default"),
        streams=[],
        consumers=[ConsumerState("MESSAGES", "proj_x_w1", "projection", 7, 3, 0, 10, 10)],
        agents=[AgentState("ocr", True, "1.0.0", ["extract_text"], [instance, other])],
        dlq=[],
        routes=[],
    ).to_dict()
    assert document["consumers"][0]["lag"] == 10
    assert document["agents"][0]["load"] == {
        "instances": 2,
        "in_flight": 3.0,
        "qps": 8.0,
        "p99_ms": 80.0,
        "error_rate": pytest.approx(0.05 / 8),
    }


def test_build_info_follows_the_nats_server_version_after_a_reconnection() -> None:
    def value(nats_version: str) -> float | None:
        labels = {"version": "9.9.9", "git_revision": "abc", "nats_server_version": nats_version}
        return REGISTRY.get_sample_value("broker_build_info", labels)

    metrics.build_info("9.9.9", "abc", "2.9.10")
    assert value("2.9.10") == 1
    metrics.build_info("9.9.9", "abc", "2.15.1")  # reconnected to an upgraded server
    assert (value("2.9.10"), value("2.15.1")) == (None, 1)  # the old label set is gone
    metrics.build_info("9.9.9", "abc", "2.9.10")  # and back
    assert (value("2.9.10"), value("2.15.1")) == (1, None)
