"""Recorded spans, their OTLP encoding and the export pipeline, without any I/O."""

from __future__ import annotations

import collections
import gc
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode

from broker.telemetry import _otlp, tracing
from broker.telemetry._export import BatchSettings, SpanPipeline, _otlp_http_post
from broker.telemetry._spans import (
    MAX_ATTRIBUTES,
    FinishedSpan,
    RecordedSpan,
    attributes,
    head,
    to_readable,
)
from tests._wait import wait_for

pytestmark = pytest.mark.unit

RESOURCE = Resource.create({"service.name": "broker-test", "process.pid": 42})
SCOPE = InstrumentationScope("broker", "1.2.3")
TRACE = 0x5B8AA5A2D2C872E8321CF37308D69DF2


class Keep:
    """A span sink that keeps what it is handed."""

    def __init__(self) -> None:
        self.finished: list[FinishedSpan] = []

    def ended(self, span: FinishedSpan, /) -> None:
        self.finished.append(span)


def recorded(
    name: str = "append",
    *,
    parent_id: int = 0,
    parent_remote: bool = False,
    tracestate: str | None = None,
    kind: SpanKind = SpanKind.PRODUCER,
    attributes: dict[str, Any] | None = None,
    sink: Keep | None = None,
    span_id: int = 0x0123456789ABCDEF,
) -> RecordedSpan:
    return RecordedSpan(
        name,
        TRACE,
        span_id,
        parent_id=parent_id,
        parent_remote=parent_remote,
        tracestate=tracestate,
        kind=kind,
        attributes=attributes,
        sink=sink or Keep(),
    )


def sdk_request(spans: Sequence[RecordedSpan]) -> ExportTraceServiceRequest:
    """What the OTLP exporter's own encoder makes of the same spans."""
    request: ExportTraceServiceRequest = encode_spans(
        [to_readable(s.finished(), RESOURCE, SCOPE) for s in spans]
    )
    return request


def ours(spans: Sequence[RecordedSpan]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(
        _otlp.encode([s.finished() for s in spans], _otlp.envelope(RESOURCE, SCOPE))
    )
    return request


@pytest.fixture(autouse=True)
def _tracing_off_after() -> Iterator[None]:
    yield
    tracing.disable()


# --- recorded spans --------------------------------------------------------------------------


def test_a_recorded_span_is_handed_on_once_when_it_ends_and_then_stops_recording() -> None:
    sink = Keep()
    span = recorded(sink=sink, attributes={"a": 1})
    assert span.is_recording()
    span.end()
    span.end()
    span.set_attribute("late", 1)
    (finished,) = sink.finished
    assert head(finished)[:4] == ("append", TRACE, 0x0123456789ABCDEF, 0)
    assert dict(attributes(finished)) == {"a": 1}
    assert not span.is_recording()
    assert span.end_time >= span.start_time > 0
    assert "late" not in span.attributes


def test_a_finished_span_is_left_alone_by_the_garbage_collector() -> None:
    """Queued for export it outlives collections; untracked, it adds nothing to them."""
    span = recorded(attributes={"messaging.nats.stream_sequence": 7, "ok": True})
    span.set_attributes({"http.route": "/v1/publish/{subject}"})
    span.set_status(StatusCode.ERROR, "failed")
    span.end()
    finished = span.finished()
    gc.collect()
    assert not gc.is_tracked(finished)


def test_attribute_values_are_cleaned_like_the_sdk_cleans_them() -> None:
    class Custom:
        def __str__(self) -> str:
            return "custom"

    span = recorded(attributes={"none": None, "list": ["a", "b"]})
    span.set_attribute("object", Custom())  # type: ignore[arg-type]
    span.set_attributes({"int": 3, "nested": [1, [2]]})
    assert span.attributes == {
        "list": ("a", "b"),
        "object": "custom",
        "int": 3,
        "nested": (1, (2,)),
    }


def test_attributes_past_the_limit_are_dropped_and_counted() -> None:
    span = recorded(attributes={f"k{i}": i for i in range(MAX_ATTRIBUTES + 3)})
    span.set_attribute("one.more", True)
    span.set_attribute("k0", "replaced")  # an existing key is still updated
    assert len(span.attributes) == MAX_ATTRIBUTES
    assert span.dropped_attributes == 4
    assert span.attributes["k0"] == "replaced"


def test_ok_status_is_final_and_only_an_error_keeps_its_description() -> None:
    span = recorded()
    span.set_status(StatusCode.UNSET, "ignored")
    assert (span.status_code, span.status_description) == (StatusCode.UNSET, None)
    span.set_status(Status(StatusCode.ERROR, "boom"))
    assert (span.status_code, span.status_description) == (StatusCode.ERROR, "boom")
    span.set_status(StatusCode.OK)
    span.set_status(StatusCode.ERROR, "later")
    assert span.status_code is StatusCode.OK


def test_a_recorded_exception_is_an_event_with_the_semantic_attributes() -> None:
    span = recorded()
    try:
        raise KeyError("missing")
    except KeyError as e:
        span.record_exception(e, escaped=True)
    ((name, _, attributes, _),) = span.events or []
    assert name == "exception"
    assert attributes["exception.type"] == "KeyError"
    assert attributes["exception.message"] == "'missing'"
    assert attributes["exception.escaped"] == "True"
    assert "raise KeyError" in attributes["exception.stacktrace"]


def test_span_context_carries_ids_sampled_flag_and_tracestate() -> None:
    context = recorded(tracestate="k=v,a=b", span_id=0xABC).get_span_context()
    assert (context.trace_id, context.span_id, context.is_remote) == (TRACE, 0xABC, False)
    assert context.trace_flags.sampled
    assert dict(context.trace_state) == {"k": "v", "a": "b"}


def test_readable_span_has_the_parent_events_and_status() -> None:
    span = recorded(parent_id=0x77, parent_remote=True, attributes={"a": 1})
    span.add_event("retry", {"attempt": 2}, timestamp=123)
    span.set_status(StatusCode.ERROR, "failed")
    span.end()
    readable = to_readable(span.finished(), RESOURCE, SCOPE)
    assert readable.parent is not None
    assert (readable.parent.span_id, readable.parent.is_remote) == (0x77, True)
    assert readable.attributes == {"a": 1}
    assert [(e.name, e.timestamp, e.attributes) for e in readable.events] == [
        ("retry", 123, {"attempt": 2})
    ]
    assert readable.status.status_code is StatusCode.ERROR
    assert readable.status.description == "failed"
    assert readable.resource is RESOURCE
    assert readable.instrumentation_scope is SCOPE


# --- OTLP encoding ---------------------------------------------------------------------------


def test_encoding_equals_the_sdk_encoders_for_every_kind_of_span() -> None:
    """Roots, local and remote parents, tracestate, events, errors: the same message."""
    root = recorded("POST /v1/publish/{subject}", kind=SpanKind.SERVER, span_id=1)
    root.set_attributes({"http.request.method": "POST", "http.response.status_code": 200})
    child = recorded(parent_id=1, attributes={"messaging.nats.duplicate": False}, span_id=2)
    remote = recorded(
        "route", parent_id=2, parent_remote=True, tracestate="k=v", kind=SpanKind.CONSUMER
    )
    failed = recorded("agent", parent_id=3, parent_remote=True, kind=SpanKind.INTERNAL)
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        failed.record_exception(e)
        failed.set_status(Status(StatusCode.ERROR, "RuntimeError"))
    ok = recorded("reply", kind=SpanKind.CLIENT)
    ok.set_status(StatusCode.OK)
    spans = [root, child, remote, failed, ok]
    for span in spans:
        span.end()
    assert ours(spans) == sdk_request(spans)
    assert len(ours(spans).resource_spans[0].scope_spans[0].spans) == 5


def test_a_full_batch_is_one_well_formed_request() -> None:
    """A batch large enough that both enclosing messages' lengths take several bytes (the
    encoder works them out before copying the spans once)."""
    spans = [
        recorded(f"span {n}", span_id=n + 1, attributes={"n": n, "text": "x" * 40})
        for n in range(600)
    ]
    for span in spans:
        span.end()
    body = _otlp.encode([s.finished() for s in spans], _otlp.envelope(RESOURCE, SCOPE))
    assert len(body) > 16_384  # a three-byte length
    assert ours(spans) == sdk_request(spans)
    assert len(ours(spans).resource_spans[0].scope_spans[0].spans) == 600


_scalars = (
    st.text(max_size=20)
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1), inner),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=30), _values, max_size=8), st.text())
def test_any_attributes_encode_as_the_sdk_encodes_them(
    attributes: dict[str, Any], name: str
) -> None:
    span = recorded(name, attributes=attributes)
    span.end()
    assert ours([span]) == sdk_request([span])


def test_repeated_string_attributes_encode_the_same_once_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The encoder keeps string attributes' encoded fields; a cached field, the same string
    as an event's attribute (another field tag), and strings past the cache's bound all
    still encode as the SDK encodes them."""
    monkeypatch.setattr(_otlp, "_string_fields", {})

    def span(n: int) -> RecordedSpan:
        s = recorded(
            "POST /v1/publish/{subject}",
            attributes={"http.request.method": "POST", "url.path": f"/v1/publish/s{n}"},
        )
        s.add_event("retry", {"http.request.method": "POST"})
        s.end()
        return s

    spans = [span(n) for n in range(4)] + [span(0)]
    assert ours(spans) == sdk_request(spans)
    assert (b"\x4a", "url.path", "/v1/publish/s3") in _otlp._string_fields
    assert ours(spans) == sdk_request(spans)  # every string field from the cache this time

    monkeypatch.setattr(_otlp, "_string_fields", {})
    monkeypatch.setattr(_otlp, "_MAX_STRING_FIELDS", 2)
    assert ours(spans) == sdk_request(spans)
    assert len(_otlp._string_fields) == 2  # bounded: the rest is encoded each time


# --- the pipeline ----------------------------------------------------------------------------


class Collect(SpanExporter):
    """Keeps each exported batch; ``hold`` makes export wait until it is set."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.batches: list[list[ReadableSpan]] = []
        self.entered = threading.Event()
        self.hold = hold

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    @property
    def names(self) -> list[str]:
        return [s.name for batch in self.batches for s in batch]


#: How a span reaches the pipeline: a RecordedSpan's end (its ``ended``), a C Timing's
#: (straight into the queue while the pipeline's ``direct`` allows), a Python Timing's.
ENDINGS = ["recorded", "c-timing", "python-timing"]


@pytest.fixture(params=ENDINGS)
def ending(request: pytest.FixtureRequest) -> str:
    if request.param == "c-timing" and tracing._CTiming is None:
        pytest.skip("the C Timing is not in use (not built, or BROKER_PURE_PYTHON set)")
    return str(request.param)


def end_spans(pipeline: SpanPipeline, count: int, start: int = 0, ending: str = "recorded") -> None:
    for i in range(start, start + count):
        if ending == "recorded":
            RecordedSpan(
                f"s{i}",
                TRACE,
                i + 1,
                parent_id=0,
                parent_remote=False,
                tracestate=None,
                kind=SpanKind.INTERNAL,
                attributes=None,
                sink=pipeline,
            ).end()
            continue
        if ending == "c-timing":
            assert tracing._lazy_module is not None
            timing = tracing._lazy_module.start_timing(
                f"s{i}", SpanKind.INTERNAL.value, None, TRACE, pipeline, current=False
            )
            tracing._lazy_module.end_timing(timing)
        else:
            python_timing = tracing.Timing(
                f"s{i}", SpanKind.INTERNAL.value, None, TRACE, pipeline, current=False
            )
            tracing._end_timing(python_timing)


def test_a_full_batch_is_exported_at_once_the_rest_on_flush(ending: str) -> None:
    exporter = Collect()
    pipeline = SpanPipeline(
        RESOURCE, SCOPE, exporters=[exporter], settings=BatchSettings(3600, 100, 4)
    )
    try:
        end_spans(pipeline, 4, ending=ending)
        assert wait_for(lambda: exporter.names == ["s0", "s1", "s2", "s3"], timeout=10)
        end_spans(pipeline, 2, start=4, ending=ending)
        assert exporter.names == ["s0", "s1", "s2", "s3"]  # not a full batch: it waits
        pipeline.force_flush()
        assert [len(b) for b in exporter.batches] == [4, 2]
    finally:
        pipeline.shutdown()


def test_spans_past_the_queue_limit_are_dropped_and_counted(ending: str) -> None:
    release = threading.Event()
    exporter = Collect(hold=release)
    pipeline = SpanPipeline(
        RESOURCE, SCOPE, exporters=[exporter], settings=BatchSettings(3600, 8, 4)
    )
    try:
        end_spans(pipeline, 4, ending=ending)
        assert exporter.entered.wait(10)  # the first batch is out, its export held
        end_spans(pipeline, 10, start=4, ending=ending)
        assert pipeline.dropped == 2
        release.set()
        pipeline.force_flush()
        assert exporter.names == [f"s{i}" for i in range(12)]
    finally:
        release.set()
        pipeline.shutdown()


def test_shutdown_exports_what_is_still_queued(ending: str) -> None:
    exporter = Collect()
    pipeline = SpanPipeline(
        RESOURCE, SCOPE, exporters=[exporter], settings=BatchSettings(3600, 100, 50)
    )
    end_spans(pipeline, 3, ending=ending)
    pipeline.shutdown()
    assert exporter.names == ["s0", "s1", "s2"]
    assert pipeline.direct is None
    end_spans(pipeline, 1, start=3, ending=ending)  # after shutdown: dropped quietly
    assert exporter.names == ["s0", "s1", "s2"]


def test_the_direct_queue_is_there_only_while_spans_need_nothing_but_queueing() -> None:
    exporter = Collect()
    pipeline = SpanPipeline(
        RESOURCE, SCOPE, exporters=[exporter], settings=BatchSettings(3600, 100, 50)
    )
    try:
        assert pipeline.direct == (pipeline._queue, 100, 50)
        pipeline._after_fork()  # a forked child's new queue
        assert pipeline.direct is not None
        assert pipeline.direct[0] is pipeline._queue
    finally:
        pipeline.shutdown()
    assert pipeline.direct is None
    with_processor = SpanPipeline(
        RESOURCE,
        SCOPE,
        exporters=[Collect()],
        processors=[SimpleSpanProcessor(InMemorySpanExporter())],
    )
    try:
        assert with_processor.direct is None  # processors see each span: ended() it is
    finally:
        with_processor.shutdown()
    assert SpanPipeline(RESOURCE, SCOPE).direct is None  # nowhere to send


class Sink:
    """A pipeline as the C end_timing sees one: ``direct``, ``ended`` and ``batch_ready``."""

    def __init__(self, direct: Any) -> None:
        self.direct = direct
        self.ended_spans: list[str] = []
        self.batches = 0

    def ended(self, span: tuple[Any, ...]) -> None:
        self.ended_spans.append(span[0])

    def batch_ready(self) -> None:
        self.batches += 1


def end_c_timing(sink: object, name: str) -> None:
    module = tracing._lazy_module
    assert module is not None
    module.end_timing(module.start_timing(name, 0, None, TRACE, sink, current=False))


@pytest.mark.skipif(tracing._CTiming is None, reason="the C Timing is not in use")
def test_the_c_end_timing_queues_directly_up_to_the_limit_then_hands_over() -> None:
    queue: collections.deque[tuple[Any, ...]] = collections.deque()
    sink = Sink((queue, 3, 2))
    for name in ["a", "b", "c", "d"]:
        end_c_timing(sink, name)
    assert [span[0] for span in queue] == ["a", "b", "c"]
    assert sink.batches == 2  # at two waiting and at three
    assert sink.ended_spans == ["d"]  # the queue full: the pipeline's own method
    for direct in [None, (queue, 3), [queue, 3, 2], "nonsense"]:
        other = Sink(direct)
        end_c_timing(other, "e")
        assert other.ended_spans == ["e"]
    plain = Pipeline()
    end_c_timing(plain, "f")  # no direct at all
    assert [span[0] for span in plain.spans] == ["f"]
    for bad in [(queue, "three", 2), (queue, 3, None), (42, 3, 2)]:
        with pytest.raises(TypeError):
            end_c_timing(Sink(bad), "g")
    unlimited = Sink((queue, -1, 2))  # no room, whatever it says: ended()
    end_c_timing(unlimited, "h")
    assert unlimited.ended_spans == ["h"]


class Pipeline:
    """Only ``ended``."""

    def __init__(self) -> None:
        self.spans: list[tuple[Any, ...]] = []

    def ended(self, span: tuple[Any, ...]) -> None:
        self.spans.append(span)


def test_otlp_exporter_is_sent_the_brokers_own_encoding() -> None:
    """The installed OTLP/HTTP exporter exposes its client; each batch goes through it once,
    encoded here (an exporter upgrade that loses this would fail this test)."""
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    assert _otlp_http_post(exporter) is not None
    posted: list[bytes] = []

    class Sent:
        success = True

    def record(data: bytes) -> Sent:
        posted.append(data)
        return Sent()

    exporter._client.export = record  # type: ignore[method-assign, assignment]
    tracing.configure("test", exporters=[exporter])
    with tracing.span("POST /v1/publish/{subject}", start_trace=True) as server:
        server.set_attribute("http.route", "/v1/publish/{subject}")
        with tracing.span("append", kind=SpanKind.PRODUCER):
            pass
    tracing.force_flush()
    (request,) = [ExportTraceServiceRequest.FromString(data) for data in posted]
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "broker-test"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "broker"
    append, ingress = scope_spans.spans
    assert (append.name, ingress.name) == ("append", "POST /v1/publish/{subject}")
    assert append.parent_span_id == ingress.span_id
    assert append.trace_id == ingress.trace_id
    assert ingress.attributes[0].key == "http.route"


def test_spans_are_current_in_opentelemetrys_context_and_nest_sdk_spans() -> None:
    """An agent handler's own OpenTelemetry tracer nests its spans under the broker's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.configure("test", processors=[SimpleSpanProcessor(InMemorySpanExporter())])
    with tracing.span("agent", start_trace=True) as outer:
        assert trace.get_current_span() is outer
        with provider.get_tracer("handler").start_as_current_span("inner"):
            pass
    (inner,) = memory.get_finished_spans()
    assert inner.parent is not None
    assert inner.parent.span_id == outer.get_span_context().span_id
    assert inner.context is not None
    assert inner.context.trace_id == outer.get_span_context().trace_id


@pytest.mark.parametrize(
    ("component", "current"),
    [("ingress", False), ("router", False), ("agent", True), ("worker", True)],
)
def test_only_processes_running_others_code_make_spans_current_for_opentelemetry(
    component: str, current: bool
) -> None:
    """The ingress and routers run only the broker's code inside a span; agents (handlers)
    and workers (projections) may use the OpenTelemetry API, so their spans are current."""
    tracing.configure(component, processors=[SimpleSpanProcessor(InMemorySpanExporter())])
    try:
        with tracing.span("edge", start_trace=True) as span:
            assert span.is_recording()
            assert (trace.get_current_span() is span) is current
            assert tracing.current() is not None  # the broker's own context, always
        assert trace.get_current_span() is not span
    finally:
        tracing.disable()
