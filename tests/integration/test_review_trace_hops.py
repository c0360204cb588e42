"""A client's trace context through real appends: what the stored messages of each hop
(ingress -> ``MESSAGES`` -> the router's record in ``ROUTES`` -> the agent's reply) carry."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.envelope import Outbound, PublishRequest, Tenant, passthrough_headers
from broker.publisher import Publisher
from broker.telemetry import tracing
from broker.telemetry.w3c import parse_traceparent
from tests._tracing import OTHER, PARENT, TRACE, RequestHeaders

pytestmark = pytest.mark.integration


async def _ingress_publish(publisher: Publisher, headers: RequestHeaders) -> dict[str, str]:
    """What the ingress does for ``POST /v1/publish/orders``: a server span at the edge,
    the trace headers passed through, the append; the stored message's headers."""
    timing = tracing.edge_timing("/v1/publish/{subject}", headers)
    request = PublishRequest(
        "orders", b"1", "text/plain", extra_headers=passthrough_headers(headers)
    )
    try:
        ack = await publisher.publish(request.to_outbound(Tenant("acme")))
    finally:
        if timing is not None:
            tracing.end_timing(timing)
    return dict((await publisher.nc.jetstream().get_msg(ack.stream, ack.seq)).headers or {})


def _trace_of(headers: dict[str, str]) -> int:
    parsed = parse_traceparent(headers["traceparent"])
    assert parsed is not None
    return parsed[0]


async def test_a_traceparent_sent_twice_is_not_continued_by_the_stored_message(
    publisher: Publisher, exporter: InMemorySpanExporter
) -> None:
    """The stored message left the two headers out, yet its ``traceparent`` (the append
    span's) carried the first header's trace: the edge span had continued it."""
    stored = await _ingress_publish(
        publisher, RequestHeaders(("traceparent", PARENT), ("traceparent", OTHER))
    )
    assert _trace_of(stored) not in (TRACE, TRACE + 1)
    assert "tracestate" not in stored


async def test_one_trace_id_from_the_client_to_the_agents_reply(
    publisher: Publisher, exporter: InMemorySpanExporter
) -> None:
    stored = await _ingress_publish(
        publisher, RequestHeaders(("traceparent", PARENT), ("tracestate", "a=1"))
    )
    assert _trace_of(stored) == TRACE
    assert stored["tracestate"] == "a=1"
    # the router: its record continues the message's trace
    with tracing.span("route", parent_headers=stored, kind=tracing.SpanKind.CONSUMER):
        ack = await publisher.publish(Outbound("route.acme.ocr", b"1", dict(stored)))
    routed = dict((await publisher.nc.jetstream().get_msg(ack.stream, ack.seq)).headers or {})
    assert _trace_of(routed) == TRACE
    assert routed["traceparent"] != stored["traceparent"]
    # the agent: its reply continues the record's trace
    reply: dict[str, str] = {}
    with (
        tracing.span("agent ocr", parent_headers=routed, kind=tracing.SpanKind.CONSUMER),
        tracing.span("reply", kind=tracing.SpanKind.PRODUCER),
    ):
        tracing.inject(reply)
    assert _trace_of(reply) == TRACE
    assert reply["tracestate"] == "a=1"
    assert {s.context.trace_id for s in exporter.get_finished_spans() if s.context} == {TRACE}


async def test_an_unsampled_client_trace_is_stored_as_sent_and_records_nothing(
    publisher: Publisher, exporter: InMemorySpanExporter
) -> None:
    unsampled = PARENT[:-2] + "00"
    stored = await _ingress_publish(publisher, RequestHeaders(("traceparent", unsampled)))
    assert stored["traceparent"] == unsampled
    assert exporter.get_finished_spans() == ()
