"""The ingress's server span and a publish's ``append`` span are recorded as
:class:`~broker.telemetry.tracing.Timing` (ids and times, no span object): the spans they
hand on must be the ones a recorded span would have been, field for field."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import tracemalloc
from collections import UserDict
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from broker.envelope import Tenant
from broker.http.publish import body_request
from broker.telemetry import metrics, tracing
from broker.telemetry.http import NO_RESPONSE, instrument
from tests._tracing import OTHER, RequestHeaders

pytestmark = pytest.mark.unit

PARENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN = 0xB7AD6B7169203331
SAMPLED = {"traceparent": f"00-{PARENT_TRACE:032x}-{PARENT_SPAN:016x}-01", "tracestate": "k=v"}
ROUTE = "/v1/publish/{subject}"
APPEND = (
    "messaging.system",
    "nats",
    "messaging.destination.name",
    "msg.default.orders",
    "messaging.nats.stream",
    "MESSAGES",
    "messaging.nats.stream_sequence",
    42,
    "messaging.nats.duplicate",
    False,
)


_C_TIMING = tracing._CTiming  # None where the codecs' C accelerator is not built
_NO_C_TIMING = "the C Timing is not in use (not built, or BROKER_PURE_PYTHON set)"
requires_c_timing = pytest.mark.skipif(_C_TIMING is None, reason=_NO_C_TIMING)


@pytest.fixture(params=["c", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with :class:`~broker.telemetry.tracing.Timing` and ``inject`` in C (the
    accelerator's ``start_timing``/``end_timing``/``child_timing``/``inject``, skipped only
    where it is not built) and in Python."""
    if request.param == "c" and _C_TIMING is None:
        pytest.skip(_NO_C_TIMING)
    if request.param == "python":
        monkeypatch.setattr(tracing, "_new_timing", tracing.Timing)
        monkeypatch.setattr(tracing, "end_timing", tracing._end_timing)
        monkeypatch.setattr(tracing, "_CTiming", None)
        monkeypatch.setattr(tracing, "inject", tracing._inject)
        monkeypatch.setattr(tracing, "child_timing", tracing._child_timing)
    return str(request.param)


@pytest.fixture
def memory(implementation: str) -> Iterator[InMemorySpanExporter]:
    """Tracing on as in the ingress (its spans are not made current for OpenTelemetry);
    metrics off, so the requests here leave no counts for another test to find."""
    exporter = InMemorySpanExporter()
    metrics.set_enabled(False)
    tracing.configure("ingress", processors=[SimpleSpanProcessor(exporter)])
    yield exporter
    tracing.disable()
    metrics.set_enabled(True)


class Proto:
    """Enough of granian's RSGI protocol object for the wrapper."""

    def __init__(self) -> None:
        self.status = 0

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status


def request(headers: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(
        path="/v1/publish/orders", method="POST", headers=headers or {}, http_version="2"
    )


Handler = Callable[[Any, Any], Awaitable[int]]


def serve(handler: Handler, headers: dict[str, str] | None = None) -> None:
    asyncio.run(instrument(handler)(request(headers), Proto()))


async def append_then_answer(scope: Any, proto: Any) -> int:
    timing = tracing.child_timing("append", SpanKind.PRODUCER)
    assert timing is not None
    tracing.end_timing(timing, APPEND)
    proto.response_bytes(200, [], b"{}")
    return 200


def recorded_the_old_way(headers: dict[str, str]) -> list[ReadableSpan]:
    """The same two spans recorded as RecordedSpans, with the same names and attributes."""
    exporter = InMemorySpanExporter()
    tracing.configure("ingress", processors=[SimpleSpanProcessor(exporter)])
    with tracing.span(
        ROUTE, parent_headers=headers, kind=SpanKind.SERVER, start_trace=True
    ) as server:
        server.update_name(f"POST {ROUTE}")
        server.set_attributes(
            {
                "http.request.method": "POST",
                "http.route": ROUTE,
                "url.path": "/v1/publish/orders",
                "network.protocol.version": "2",
            }
        )
        with tracing.span("append", kind=SpanKind.PRODUCER) as append:
            append.set_attributes(dict(zip(APPEND[::2], APPEND[1::2], strict=True)))
        server.set_attribute("http.response.status_code", 200)
    tracing.disable()
    return list(exporter.get_finished_spans())


def shape(span: ReadableSpan, spans: list[ReadableSpan]) -> tuple[Any, ...]:
    """Everything of a span but its own ids and times; its parent by name or by id."""
    assert span.context is not None
    by_id = {s.context.span_id: s.name for s in spans if s.context is not None}
    parent = span.parent
    return (
        span.name,
        span.kind,
        span.context.trace_id,
        span.context.trace_state,
        None if parent is None else by_id.get(parent.span_id, parent.span_id),
        None if parent is None else parent.is_remote,
        dict(span.attributes or {}),
        span.status.status_code,
        span.status.description,
        [e.name for e in span.events],
        span.end_time is not None and span.start_time is not None,
    )


@pytest.mark.parametrize("headers", [SAMPLED, {}], ids=["continued", "root"])
def test_timed_spans_are_the_spans_recorded_ones_would_be(
    memory: InMemorySpanExporter, headers: dict[str, str]
) -> None:
    serve(append_then_answer, headers)
    timed = list(memory.get_finished_spans())
    tracing.disable()
    old = recorded_the_old_way(headers)
    assert [s.name for s in timed] == ["append", f"POST {ROUTE}"]
    new_shapes = [shape(s, timed) for s in timed]
    old_shapes = [shape(s, old) for s in old]
    if not headers:  # a root: each run draws its own trace id
        new_shapes = [(*s[:2], *s[3:]) for s in new_shapes]
        old_shapes = [(*s[:2], *s[3:]) for s in old_shapes]
    assert new_shapes == old_shapes
    server = timed[1]
    assert server.parent is not None if headers else server.parent is None
    assert server.start_time is not None
    assert server.end_time is not None
    assert server.start_time <= timed[0].start_time  # type: ignore[operator]
    assert timed[0].end_time <= server.end_time  # type: ignore[operator]


def test_the_append_continues_the_server_span_and_the_context_is_restored(
    memory: InMemorySpanExporter,
) -> None:
    seen: list[tracing.TraceContext | None] = []

    async def handler(scope: Any, proto: Any) -> int:
        seen.append(tracing.current())
        timing = tracing.child_timing("append", SpanKind.PRODUCER)
        assert timing is not None
        headers: dict[str, str] = {}
        tracing.inject(headers)  # what the publisher writes on the stored message
        seen.append(tracing.current())
        tracing.end_timing(timing, APPEND)
        seen.append(tracing.current())
        assert headers == {"traceparent": seen[1].traceparent, "tracestate": "k=v"}  # type: ignore[union-attr]
        proto.response_bytes(200, [], b"")
        return 200

    serve(handler, SAMPLED)
    server_ctx, append_ctx, after = seen
    assert server_ctx is not None
    assert append_ctx is not None
    assert after == server_ctx
    assert append_ctx.trace_id == server_ctx.trace_id == PARENT_TRACE
    assert append_ctx.tracestate == "k=v"
    append, server = memory.get_finished_spans()
    assert append.context is not None
    assert server.context is not None
    assert append.context.span_id == append_ctx.span_id
    assert server.context.span_id == server_ctx.span_id
    assert tracing.current() is None


def test_an_append_not_made_current_is_handed_on_only_through_inject(
    memory: InMemorySpanExporter,
) -> None:
    seen: list[tracing.TraceContext | None] = []
    written: dict[str, str] = {}
    ids: list[int] = []

    async def handler(scope: Any, proto: Any) -> int:
        seen.append(tracing.current())
        timing = tracing.child_timing("append", SpanKind.PRODUCER, current=False)
        assert timing is not None
        assert timing.token is None
        seen.append(tracing.current())  # still the server span
        tracing.inject(written, timing)  # what the publisher writes on the stored message
        ids.append(timing.span_id)
        tracing.end_timing(timing, APPEND)
        with pytest.raises(RuntimeError):
            tracing.end_timing(timing, APPEND)  # once only, as a current one
        seen.append(tracing.current())
        proto.response_bytes(200, [], b"")
        return 200

    serve(handler, SAMPLED)
    server_ctx, during, after = seen
    assert server_ctx is not None
    assert during == after == server_ctx
    append, server = memory.get_finished_spans()
    assert append.context is not None
    assert server.context is not None
    assert append.parent is not None
    assert append.parent.span_id == server.context.span_id == server_ctx.span_id
    assert append.context.span_id == ids[0]
    assert written == {
        "traceparent": f"00-{PARENT_TRACE:032x}-{ids[0]:016x}-01",
        "tracestate": "k=v",
    }
    assert dict(append.attributes or {})["messaging.nats.stream_sequence"] == 42
    assert tracing.current() is None


def test_a_failed_append_not_made_current_ends_once(memory: InMemorySpanExporter) -> None:
    async def handler(scope: Any, proto: Any) -> int:
        timing = tracing.child_timing("append", SpanKind.PRODUCER, current=False)
        assert timing is not None
        tracing.end_timing(timing, error=TimeoutError("no ack"))  # the Python function's path
        assert timing.ended
        with pytest.raises(RuntimeError):
            tracing.end_timing(timing)
        proto.response_bytes(504, [], b"")
        return 504

    serve(handler, SAMPLED)
    append, server = memory.get_finished_spans()
    assert append.status.status_code is StatusCode.ERROR
    assert append.parent is not None
    assert server.context is not None
    assert append.parent.span_id == server.context.span_id


def test_inject_takes_only_a_timing_and_writes_nothing_while_off(implementation: str) -> None:
    pipeline = Pipeline()
    tracing.configure("ingress")
    try:
        outer = new_timing("outer", None, pipeline)
        with pytest.raises(TypeError):
            tracing.inject({}, tracing.current())  # type: ignore[arg-type]
        timing = tracing.child_timing("inner", SpanKind.PRODUCER, current=False)
        assert timing is not None
        assert tracing.current() is not None
        assert tracing.current().span_id == outer.span_id  # type: ignore[union-attr]
    finally:
        tracing.disable()
    headers: dict[str, str] = {}
    tracing.inject(headers, timing)  # tracing turned off since: nothing
    tracing.inject(headers, "not a timing")  # type: ignore[arg-type]  # off: not even checked
    assert headers == {}
    tracing.end_timing(timing)  # into the configured pipeline, shut down since
    tracing.end_timing(outer)
    assert [s[0] for s in pipeline.spans] == ["outer"]
    assert tracing._current.get() is None


class HeaderMapping(UserDict[str, str]):
    """Headers that are a mapping but not a dict (the C ``inject``'s general path)."""


@pytest.mark.parametrize("mapping", [dict, HeaderMapping], ids=["dict", "mapping"])
def test_inject_leaves_no_tracestate_of_another_context(
    implementation: str, mapping: Callable[[dict[str, str]], MutableMapping[str, str]]
) -> None:
    """W3C pairs a ``tracestate`` with its ``traceparent``. Headers copied from a client's
    request or an incoming message may hold one: a new ``traceparent`` written beside it
    (one whose context has no ``tracestate``) left it there, so the next hop read it as this
    trace's. After ``inject`` the ``tracestate`` is the context's own, or there is none."""
    copied = {"traceparent": OTHER, "tracestate": "stale=1", "kept": "yes"}
    pipeline = Pipeline()
    tracing.configure("ingress")
    try:
        root = new_timing("root", None, pipeline)  # no tracestate
        current = mapping(dict(copied))
        tracing.inject(current)
        detached = tracing.child_timing("append", SpanKind.PRODUCER, current=False)
        assert detached is not None
        handed = mapping(dict(copied))
        tracing.inject(handed, detached)
        tracing.end_timing(detached)
        tracing.end_timing(root)
        remote = tracing.TraceContext(PARENT_TRACE, PARENT_SPAN, True, "own=1")
        with_state = new_timing("continued", remote, pipeline)
        replaced = mapping(dict(copied))
        tracing.inject(replaced)
        tracing.end_timing(with_state)
        untouched = mapping(dict(copied))
        tracing.inject(untouched)  # nothing running: nothing written, nothing removed
    finally:
        tracing.disable()
    assert dict(current) == {"traceparent": traceparent(root.span_id), "kept": "yes"}
    assert dict(handed) == {"traceparent": traceparent(detached.span_id), "kept": "yes"}
    assert dict(replaced) == {
        "traceparent": traceparent(with_state.span_id),
        "tracestate": "own=1",
        "kept": "yes",
    }
    assert dict(untouched) == copied


def traceparent(span_id: int) -> str:
    return f"00-{PARENT_TRACE:032x}-{span_id:016x}-01"


CLOUDEVENT = (
    ("content-type", "application/json"),
    ("ce-specversion", "1.0"),
    ("ce-id", "order-1"),
    ("ce-source", "/shop"),
    ("ce-type", "order.placed"),
)


@pytest.mark.parametrize(
    "invalid",
    [("not a traceparent",), (OTHER.upper(),), (OTHER, OTHER)],
    ids=["garbage", "upper-case", "sent-twice"],
)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "unsampled"])
def test_an_invalid_traceparent_beside_a_cloudevents_one_is_as_if_absent(
    memory: InMemorySpanExporter, invalid: tuple[str, ...], sampled: bool
) -> None:
    """A binary-mode CloudEvent's ``ce-traceparent`` (its Distributed Tracing extension)
    beside a ``traceparent`` that is not valid: W3C ignores the invalid header, with its
    ``tracestate``, as if it were absent, so the server span continues the event's context,
    as the stored message (which leaves the invalid header out) and every later hop do. The
    server span stopped at the invalid header and started a trace of its own: the stored
    ``traceparent``, written from its child ``append``, split the message from its event."""
    flags = "01" if sampled else "00"
    event = f"00-{PARENT_TRACE:032x}-{PARENT_SPAN:016x}-{flags}"
    headers = RequestHeaders(
        *CLOUDEVENT,
        *(("traceparent", value) for value in invalid),
        ("tracestate", "client=1"),
        ("ce-traceparent", event),
        ("ce-tracestate", "event=1"),
    )
    request = body_request(headers, "orders", b"{}", "application/json")  # type: ignore[arg-type]
    stored = request.to_outbound(Tenant("acme")).headers
    assert (stored["ce-traceparent"], stored["ce-tracestate"]) == (event, "event=1")
    assert "traceparent" not in stored
    assert "tracestate" not in stored
    expected = tracing.TraceContext(PARENT_TRACE, PARENT_SPAN, sampled, "event=1")
    assert tracing.extract(headers) == expected
    assert tracing.extract(stored) == expected  # what a later hop reads before the append
    server = tracing.edge_timing(ROUTE, headers)  # type: ignore[arg-type]
    if not sampled:  # the event's decision; a new root would have been sampled here
        assert server is None
        tracing.inject(stored)
        assert tracing.extract(stored) == expected
        assert memory.get_finished_spans() == ()
        return
    assert server is not None
    append = tracing.child_timing("append", SpanKind.PRODUCER, current=False)
    assert append is not None
    tracing.inject(stored, append)  # as the publisher writes the stored message
    tracing.end_timing(append, APPEND)
    tracing.end_timing(server)
    append_span, server_span = memory.get_finished_spans()
    assert server_span.context is not None
    assert server_span.parent is not None
    assert (server_span.context.trace_id, server_span.parent.span_id) == (
        PARENT_TRACE,
        PARENT_SPAN,
    )
    assert server_span.context.trace_state.to_header() == "event=1"
    assert append_span.parent is not None
    assert append_span.context is not None
    assert append_span.parent.span_id == server_span.context.span_id
    assert stored["traceparent"] == traceparent(append_span.context.span_id)
    assert stored["tracestate"] == "event=1"
    assert stored["ce-traceparent"] == event


def test_a_handler_that_raises_fails_the_server_span_with_an_exception_event(
    memory: InMemorySpanExporter,
) -> None:
    async def handler(scope: Any, proto: Any) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        serve(handler, SAMPLED)
    (server,) = memory.get_finished_spans()
    assert server.status.status_code is StatusCode.ERROR
    assert server.status.description == "RuntimeError"
    assert [e.name for e in server.events] == ["exception"]
    event = dict(server.events[0].attributes or {})
    assert event["exception.type"] == "RuntimeError"
    assert event["exception.message"] == "boom"
    assert dict(server.attributes or {})["http.response.status_code"] == NO_RESPONSE


def test_a_5xx_fails_the_server_span_without_an_event(memory: InMemorySpanExporter) -> None:
    async def handler(scope: Any, proto: Any) -> int:
        proto.response_bytes(503, [], b"")
        return 503

    serve(handler, SAMPLED)
    (server,) = memory.get_finished_spans()
    assert (server.status.status_code, server.status.description) == (StatusCode.ERROR, None)
    assert server.events == ()
    assert dict(server.attributes or {})["http.response.status_code"] == 503


async def answer_ok(scope: Any, proto: Any) -> int:
    proto.response_bytes(200, [], b"{}")
    return 200


def test_a_card_number_in_the_request_path_is_masked_in_the_server_span(
    memory: InMemorySpanExporter,
) -> None:
    """``url.path`` carried the raw path to the span exporter while the logs masked it; the
    path is masked before it is cut to 256 characters, so a number the cut splits leaves
    none of its leading digits."""
    path = "/v1/publish/pay." + "a" * 227 + ".4111111111111111"  # 12 digits before the cut
    scope = SimpleNamespace(path=path, method="POST", headers=SAMPLED, http_version="2")
    entry: Any = instrument(answer_ok)  # the RSGI types, as far as the wrapper goes
    asyncio.run(entry(scope, Proto()))
    (server,) = memory.get_finished_spans()
    recorded = dict(server.attributes or {})["url.path"]
    assert recorded == (path[:-16] + "[card ****1111]")[:256]
    assert "411111111111" not in str(recorded)


def test_an_unsampled_request_does_not_look_at_its_path(
    memory: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The masking runs for a recorded span only: nothing is added to other requests."""

    def refuse(path: str) -> Any:
        raise AssertionError(f"{path} scanned for an unrecorded span")

    import broker.telemetry.http as http_telemetry

    monkeypatch.setattr(http_telemetry, "text_may_hold_card", refuse)
    monkeypatch.setattr(http_telemetry, "redact_text", refuse)
    unsampled = {"traceparent": f"00-{PARENT_TRACE:032x}-{PARENT_SPAN:016x}-00"}
    scope = SimpleNamespace(
        path="/v1/publish/pay.4111111111111111", method="POST", headers=unsampled, http_version="2"
    )
    entry: Any = instrument(answer_ok)  # the RSGI types, as far as the wrapper goes
    asyncio.run(entry(scope, Proto()))
    assert not memory.get_finished_spans()


def test_a_path_once_scanned_is_not_scanned_again(
    memory: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampled request's path is scanned for a card number once; the next request to the
    same path records it as it is, without a scan. A path that may hold a number is never
    remembered (it is scanned and masked every time), nor one over the cut."""
    import broker.telemetry.http as http_telemetry

    monkeypatch.setattr(http_telemetry, "_clean_paths", set())
    scanned: list[str] = []
    scan = http_telemetry.text_may_hold_card

    def counting(text: str) -> bool:
        scanned.append(text)
        return scan(text)

    monkeypatch.setattr(http_telemetry, "text_may_hold_card", counting)
    clean = "/v1/publish/orders.eu.2026"
    card = "/v1/publish/pay.4111111111111111"
    long = "/v1/publish/" + "a" * 300
    entry: Any = instrument(answer_ok)
    for path in (clean, card, long) * 2:
        scope = SimpleNamespace(path=path, method="POST", headers=SAMPLED, http_version="2")
        asyncio.run(entry(scope, Proto()))
    recorded = [dict(s.attributes or {})["url.path"] for s in memory.get_finished_spans()]
    masked = "/v1/publish/pay.[card ****1111]"
    assert recorded == [clean, masked, long[:256]] * 2
    assert scanned == [clean, card, long, card, long]
    assert http_telemetry._clean_paths == {clean}


@given(
    st.text(alphabet=st.sampled_from("/v1publish.-_ 0123456789a"), max_size=300)
    | st.text(max_size=40)
)
@example("/v1/publish/pay.4111111111111111")
@example("/v1/publish/pay.4111-1111-1111-1111.x")
@example("/v1/publish/" + "a" * 240 + ".4111111111111111")
def test_a_remembered_path_records_what_a_scan_would(path: str) -> None:
    """Asked twice (the second time from memory when it was kept), ``url_path`` gives what
    masking and cutting the path every time gives."""
    import broker.telemetry.http as http_telemetry
    from broker.sensitive import redact_text, text_may_hold_card

    expected = redact_text(path).value[:256] if text_may_hold_card(path) else path[:256]
    assert http_telemetry.url_path(path) == expected
    assert http_telemetry.url_path(path) == expected


def test_the_remembered_paths_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.telemetry.http as http_telemetry

    monkeypatch.setattr(http_telemetry, "_clean_paths", set())
    monkeypatch.setattr(http_telemetry, "CLEAN_PATHS_MAX", 3)
    for n in range(7):
        assert http_telemetry.url_path(f"/v1/publish/s{n}") == f"/v1/publish/s{n}"
        assert len(http_telemetry._clean_paths) <= 3
    assert "/v1/publish/s6" in http_telemetry._clean_paths


def test_a_failed_append_is_failed_and_has_no_messaging_attributes(
    memory: InMemorySpanExporter,
) -> None:
    async def handler(scope: Any, proto: Any) -> int:
        timing = tracing.child_timing("append", SpanKind.PRODUCER)
        assert timing is not None
        tracing.end_timing(timing, error=TimeoutError("no ack"))
        proto.response_bytes(504, [], b"")
        return 504

    serve(handler, SAMPLED)
    append, server = memory.get_finished_spans()
    assert append.status.status_code is StatusCode.ERROR
    assert append.status.description == "TimeoutError"
    assert not append.attributes
    assert [e.name for e in append.events] == ["exception"]
    assert server.status.status_code is StatusCode.ERROR


def test_a_cancelled_block_is_not_a_failure(memory: InMemorySpanExporter) -> None:
    async def handler(scope: Any, proto: Any) -> int:
        timing = tracing.child_timing("append", SpanKind.PRODUCER)
        assert timing is not None
        tracing.end_timing(timing, error=asyncio.CancelledError())
        proto.response_bytes(200, [], b"")
        return 200

    serve(handler, SAMPLED)
    append, _ = memory.get_finished_spans()
    assert append.status.status_code is StatusCode.UNSET
    assert append.events == ()


def test_nothing_is_timed_without_a_sampled_span_running(memory: InMemorySpanExporter) -> None:
    assert tracing.child_timing("append", SpanKind.PRODUCER) is None
    tracing.disable()
    assert tracing.child_timing("append", SpanKind.PRODUCER) is None


class Pipeline:
    """Where ended spans go: a list."""

    def __init__(self) -> None:
        self.spans: list[tuple[Any, ...]] = []

    def ended(self, span: tuple[Any, ...]) -> None:
        self.spans.append(span)


def new_timing(
    name: str, parent: tracing.TraceContext | None, pipeline: Pipeline | None
) -> tracing.Timing:
    trace_id = parent.trace_id if parent is not None else PARENT_TRACE
    return tracing._new_timing(name, SpanKind.PRODUCER.value, parent, trace_id, pipeline)  # type: ignore[arg-type]


def test_a_timing_knows_its_parent_and_queues_the_finished_span(implementation: str) -> None:
    pipeline = Pipeline()
    remote = tracing.TraceContext(PARENT_TRACE, PARENT_SPAN, True, "k=v")
    outer = new_timing("outer", remote, pipeline)
    assert (outer.parent_id, outer.parent_remote, outer.tracestate) == (PARENT_SPAN, True, "k=v")
    local = tracing._current.get()
    assert local is not None
    assert (local.trace_id, local.span_id, local.sampled, local.span) == (
        PARENT_TRACE,
        outer.span_id,
        True,
        outer,
    )
    inner = new_timing("inner", local, pipeline)
    assert (inner.parent_id, inner.parent_remote, inner.tracestate) == (outer.span_id, False, "k=v")
    tracing.end_timing(inner, ("k", "v", "n", 1))
    assert tracing._current.get() == local
    tracing.end_timing(outer)
    assert tracing._current.get() is None
    (name, trace_id, span_id, parent_id, remote_parent, state, kind, start, end, *rest) = (
        pipeline.spans[0]
    )
    assert (name, trace_id, span_id, parent_id, remote_parent, state, kind) == (
        "inner",
        PARENT_TRACE,
        inner.span_id,
        outer.span_id,
        False,
        "k=v",
        SpanKind.PRODUCER.value,
    )
    assert 0 < start <= end
    assert rest == [0, None, StatusCode.UNSET.value, None, "k", "v", "n", 1]
    assert pipeline.spans[1][:4] == ("outer", PARENT_TRACE, outer.span_id, PARENT_SPAN)
    assert len(pipeline.spans[1]) == 13
    root = new_timing("root", None, pipeline)
    assert (root.parent_id, root.parent_remote, root.tracestate) == (0, False, None)
    tracing.end_timing(root, name="renamed")
    assert pipeline.spans[2][:4] == ("renamed", PARENT_TRACE, root.span_id, 0)


def test_a_timing_ended_in_another_context_queues_its_span_and_restores_nothing(
    implementation: str,
) -> None:
    pipeline = Pipeline()
    started = contextvars.copy_context()
    timing = started.run(new_timing, "moved", None, pipeline)
    assert started[tracing._current] is not None
    tracing.end_timing(timing)  # here, not in the context it made current
    assert [s[0] for s in pipeline.spans] == ["moved"]
    assert started[tracing._current] is not None


def test_a_timing_ended_twice_is_an_error_both_ways(implementation: str) -> None:
    timing = new_timing("twice", None, Pipeline())
    tracing.end_timing(timing)
    with pytest.raises(RuntimeError):
        tracing.end_timing(timing)


def test_without_a_pipeline_ending_only_restores_the_context(implementation: str) -> None:
    timing = new_timing("nowhere", None, None)
    assert tracing._current.get() is not None
    tracing.end_timing(timing, ("k", "v"))
    assert tracing._current.get() is None


@pytest.mark.parametrize(
    ("attributes", "name"),
    [(["a", "list"], None), ((), b"bytes"), ((), 7)],
    ids=["list", "bytes-name", "int-name"],
)
def test_a_bad_end_restores_the_context_and_ends_the_timing(
    implementation: str, attributes: Any, name: Any
) -> None:
    """A bad call still ends the span (dropped) and makes the context before it current
    again: an ended span left current would parent the rest of the task."""
    pipeline = Pipeline()
    timing = new_timing("bad", None, pipeline)
    with pytest.raises(TypeError):
        tracing.end_timing(timing, attributes, name=name)
    assert tracing._current.get() is None
    assert pipeline.spans == []
    with pytest.raises(RuntimeError):
        tracing.end_timing(timing)


def test_only_none_keeps_the_name_a_timing_started_with(implementation: str) -> None:
    pipeline = Pipeline()
    tracing.end_timing(new_timing("kept", None, pipeline), name=None)
    tracing.end_timing(new_timing("replaced", None, pipeline), name="")
    assert [s[0] for s in pipeline.spans] == ["kept", ""]


def test_a_drawn_span_id_of_zero_becomes_one(
    implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def zero(bits: int) -> int:
        return 0

    if implementation == "c":
        assert tracing._lazy_module is not None
        tracing._lazy_module.timing_bind(
            tracing._current, tracing.TraceContext, zero, tracing._end_timing
        )
    else:
        monkeypatch.setattr(tracing, "_getrandbits", zero)
    try:
        timing = new_timing("zero", None, None)
        assert timing.span_id == 1
        tracing.end_timing(timing)
    finally:
        if implementation == "c":
            tracing._lazy_module.timing_bind(  # type: ignore[union-attr]
                tracing._current, tracing.TraceContext, tracing._getrandbits, tracing._end_timing
            )


@requires_c_timing
def test_the_c_functions_refuse_what_they_cannot_take() -> None:
    module = tracing._lazy_module
    assert module is not None
    with pytest.raises(TypeError):
        module.start_timing("x", 1, None, 5)
    with pytest.raises(TypeError):
        module.start_timing("x", 1, ("not", "a", "context"), 5, None)
    with pytest.raises(OverflowError):
        module.start_timing("x", 2**40, None, 5, None)
    with pytest.raises(AttributeError):  # not a C Timing: the Python function's answer
        module.end_timing(object(), ())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        module.end_timing()  # type: ignore[call-arg]
    timing = module.start_timing("x", 1, None, 5, None)
    with pytest.raises(TypeError):
        module.end_timing(timing, (), None)  # type: ignore[misc]
    with pytest.raises(TypeError):
        module.end_timing(timing, (), colour="red")  # type: ignore[call-arg]
    module.end_timing(timing, ())
    with pytest.raises(TypeError):
        module.timing_bind(tracing._current, dict, tracing._getrandbits, tracing._end_timing)
    with pytest.raises(TypeError):
        module.child_timing("x")  # type: ignore[call-arg]
    pipeline = Pipeline()
    assert module.child_timing("x", SpanKind.PRODUCER) is None  # tracing off
    module.tracing_switch(pipeline)
    try:
        assert module.child_timing("x", SpanKind.PRODUCER) is None  # no span running
        outer = new_timing("outer", None, None)
        with pytest.raises(AttributeError):
            module.child_timing("x", "not a kind")
        inner = module.child_timing("inner", SpanKind.CLIENT)
        assert inner is not None
        assert (inner.kind, inner.parent_id, inner.pipeline) == (
            SpanKind.CLIENT.value,
            outer.span_id,
            pipeline,
        )
        tracing.end_timing(inner)
        detached = module.child_timing("detached", SpanKind.CLIENT, current=0)
        assert detached is not None
        assert (detached.token, detached.parent_id) == (None, outer.span_id)
        assert tracing._current.get()[1] == outer.span_id  # type: ignore[index]
        tracing.end_timing(detached)
        tracing.end_timing(outer)
    finally:
        module.tracing_switch(None)
    assert [s[0] for s in pipeline.spans] == ["inner", "detached"]
    assert tracing._current.get() is None


@requires_c_timing
@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.child_timing("x", SpanKind.PRODUCER, True, True),
        lambda m: m.child_timing("x", SpanKind.PRODUCER, True, current=True),
        lambda m: m.child_timing("x", SpanKind.PRODUCER, colour="red"),
        lambda m: m.child_timing("x", current=False),
        lambda m: m.start_timing("x", 1, None, 5, None, True),
        lambda m: m.start_timing("x", 1, None, 5, None, colour=True),
        lambda m: m.inject(),
        lambda m: m.inject({}, None, None),
    ],
)
def test_the_c_functions_refuse_wrong_arguments_for_current_and_span(
    call: Callable[[Any], Any],
) -> None:
    with pytest.raises(TypeError):
        call(tracing._lazy_module)


@requires_c_timing
def test_the_c_end_timing_takes_keyword_names_made_at_run_time() -> None:
    module = tracing._lazy_module
    assert module is not None
    pipeline = Pipeline()
    made = {"".join(["na", "me"]): "renamed"}  # not the interned "name" of a call site
    module.end_timing(module.start_timing("x", 1, None, 5, pipeline, current=False), (), **made)
    failed = {"".join(["fai", "led"]): True}
    module.end_timing(module.start_timing("y", 1, None, 5, pipeline, current=False), (), **failed)
    assert [(s[0], s[11]) for s in pipeline.spans] == [
        ("renamed", StatusCode.UNSET.value),
        ("y", StatusCode.ERROR.value),
    ]


@requires_c_timing
def test_a_c_timing_not_made_current_can_be_started_directly() -> None:
    module = tracing._lazy_module
    assert module is not None
    pipeline = Pipeline()
    timing = module.start_timing("x", 1, None, 5, pipeline, current=False)
    assert (timing.token, tracing._current.get()) == (None, None)
    module.end_timing(timing)
    assert [s[:3] for s in pipeline.spans] == [("x", 5, timing.span_id)]


@requires_c_timing
def test_the_c_timings_leak_neither_references_nor_memory() -> None:
    pipeline = Pipeline()
    name = "leak-check-" + "x" * 20  # a string only this test holds
    attributes = ("k", name)
    before = (sys.getrefcount(name), sys.getrefcount(pipeline), sys.getrefcount(attributes))

    def cycle(n: int) -> None:
        assert tracing._lazy_module is not None
        tracing._lazy_module.tracing_switch(pipeline)
        for _ in range(n):
            outer = new_timing(name, None, pipeline)
            inner = tracing.child_timing(name, SpanKind.PRODUCER)
            assert inner is not None
            headers = {"tracestate": name}  # another context's: removed
            tracing.inject(headers)
            detached = tracing.child_timing(name, SpanKind.PRODUCER, current=False)
            assert detached is not None
            tracing.inject(headers, detached)
            tracing.end_timing(detached, attributes, failed=True)
            tracing.end_timing(inner, attributes, name=name)
            tracing.end_timing(outer, attributes)
        tracing._lazy_module.tracing_switch(None)
        pipeline.spans.clear()

    cycle(1000)
    gc.collect()
    assert (sys.getrefcount(name), sys.getrefcount(pipeline), sys.getrefcount(attributes)) == (
        before
    )
    tracemalloc.start()
    cycle(1000)
    gc.collect()
    first, _ = tracemalloc.get_traced_memory()
    cycle(20_000)
    gc.collect()
    second, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert second - first < 64 * 1024


@given(
    trace_id=st.integers(min_value=1, max_value=2**128 - 1),
    span_id=st.integers(min_value=1, max_value=2**64 - 1),
    sampled=st.booleans(),
    tracestate=st.none() | st.text(max_size=12),
)
def check_the_c_inject_writes_what_the_python_one_does(
    trace_id: int, span_id: int, sampled: bool, tracestate: str | None
) -> None:
    assert tracing._lazy_module is not None
    context = tracing.TraceContext(trace_id, span_id, sampled, tracestate)
    token = tracing._current.set(context)
    try:
        # Headers copied from elsewhere: the tracestate written is the context's, or none.
        from_c = {"other": "kept", "tracestate": "stale=1"}
        from_python = dict(from_c)
        tracing._lazy_module.inject(from_c)
        tracing._inject(from_python)
    finally:
        tracing._current.reset(token)
    assert from_c == from_python
    assert from_c["traceparent"] == context.traceparent
    assert from_c.get("tracestate") == (tracestate or None)


@requires_c_timing
def test_the_c_inject_writes_what_the_python_one_does() -> None:
    tracing.configure("ingress")
    try:
        check_the_c_inject_writes_what_the_python_one_does()
    finally:
        tracing.disable()


class Refusing(dict[str, str]):
    def __setitem__(self, key: str, value: str) -> None:
        raise KeyError(key)


class Undeletable(dict[str, str]):
    def __delitem__(self, key: str) -> None:
        raise RuntimeError(key)


@requires_c_timing
def test_the_c_inject_writes_nothing_when_off_or_idle_and_passes_errors_on() -> None:
    module = tracing._lazy_module
    assert module is not None
    headers: dict[str, str] = {}
    token = tracing._current.set(tracing.TraceContext(PARENT_TRACE, PARENT_SPAN, True))
    try:
        module.inject(headers)  # tracing off: nothing, whatever is current
        assert headers == {}
        tracing.configure("ingress")
        try:
            with pytest.raises(KeyError):
                module.inject(Refusing())
            with pytest.raises(RuntimeError):  # removing another context's tracestate
                module.inject(Undeletable(tracestate="stale=1"))
            module.inject(headers)
            assert list(headers) == ["traceparent"]
            tracing._current.set(("not", "a", "context"))  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                module.inject({})
            tracing._current.set(tracing.TraceContext("1", PARENT_SPAN, True))  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                module.inject({})
        finally:
            tracing.disable()
    finally:
        tracing._current.reset(token)
    headers.clear()
    tracing.configure("ingress")
    try:
        module.inject(headers)  # on, but no span running
    finally:
        tracing.disable()
    assert headers == {}
