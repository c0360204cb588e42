"""Observability end to end: one trace from the HTTP request to the agent's reply, metrics of
every broker process on one ``/metrics``, trace ids in the logs, and ``broker status``.

The broker runs with tracing on through the standard variables (``OTEL_TRACES_EXPORTER=otlp``
and ``OTEL_EXPORTER_OTLP_ENDPOINT``) and exports to a small OTLP/HTTP receiver in this test;
the agent runs in this process (the real SDK) and records into an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from nats.js import JetStreamContext
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from broker.agent import Agent, Request
from broker.embedded import NatsServer
from broker.streams import Stream
from broker.telemetry import tracing
from tests._wait import await_until, wait_for
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e

CLIENT_SPAN = 0x00F067AA0BA902B7


def client_traceparent(trace_id: int) -> str:
    return f"00-{trace_id:032x}-{CLIENT_SPAN:016x}-01"


@dataclass(frozen=True)
class ExportedSpan:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    service: str
    attributes: dict[str, Any]


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) trace receiver: what a collector would get from the broker."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {
                        a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                        for a in span.attributes
                    }
                    found.append(
                        ExportedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex() or None,
                            name=span.name,
                            service=service,
                            attributes=attributes,
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[ExportedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    found.thread.start()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "BROKER_LOG_LEVEL": "debug",
    }
    workdir = tmp_path_factory.mktemp("observed")
    policy = workdir / "policy.yaml"
    policy.write_text("version: observed-1\nthreshold: 0.0\n")  # any live agent qualifies
    process = start_broker(
        workdir, nats_url=module_nats.url, args=("--routing-policy", str(policy)), env=env
    )
    yield process
    process.stop()


@pytest.fixture
def agent_spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process (the agent's), spans kept in memory."""
    memory = InMemorySpanExporter()
    tracing.configure("agent", processors=[SimpleSpanProcessor(memory)])
    yield memory
    tracing.disable()


def manifest(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0.0",
        "description": description,
        "capabilities": [
            {
                "action": "echo",
                "description": description,
                "content_types": ["text/plain", "application/json"],
            }
        ],
    }


@pytest_asyncio.fixture
async def echo_agent(module_nats: NatsServer) -> AsyncIterator[Agent]:
    """The real agent SDK; its handler continues the routed message's trace."""
    agent = Agent(
        manifest("tracedecho", "echoes traced text back to the caller"),
        nats_url=module_nats.url,
        heartbeat_interval=0.5,
        register=True,
    )

    @agent.handler
    async def handle(request: Request) -> dict[str, str]:
        with (
            tracing.span(
                "agent tracedecho", parent_headers=request.headers, kind=tracing.SpanKind.CONSUMER
            ),
            tracing.span("reply", kind=tracing.SpanKind.PRODUCER),
        ):
            return {"echo": request.text()}

    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    yield agent
    stop.set()
    await asyncio.wait_for(task, 30)


def scrape(broker: BrokerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as ``{(sample name, sorted labels): value}``."""
    text = httpx.get(f"{broker.base_url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ancestors(span: ExportedSpan | None, by_id: dict[str, ExportedSpan]) -> list[str]:
    """Names of the span's parents, nearest first, as far as they were recorded."""
    names = []
    while span is not None and span.parent_id is not None:
        span = by_id.get(span.parent_id)
        if span is not None:
            names.append(span.name)
    return names


async def test_one_trace_follows_a_message_from_ingress_to_the_agents_reply(
    client: httpx.AsyncClient,
    broker: BrokerProcess,
    receiver: OtlpReceiver,
    agent_spans: InMemorySpanExporter,
    echo_agent: Agent,
) -> None:
    """ingress -> append -> route -> agent -> reply: every hop in the client's trace."""

    async def routable() -> bool:  # untraced probes until the router sees the agent live
        r = await client.post(
            "/v1/route/trace.probe", content=b"probe", headers={"content-type": "text/plain"}
        )
        return r.status_code == 200 and r.json()["decision"]["agent"] == "tracedecho"

    assert await await_until(routable, timeout=20, interval=0.2), broker.log_tail()
    trace_id = 0x5B8AA5A2D2C872E8321CF37308D69DF2
    answer = await client.post(
        "/v1/route/trace.demo",
        params={"wait": "true", "timeout": "10"},
        content=b"follow me",
        headers={"content-type": "text/plain", "traceparent": client_traceparent(trace_id)},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"echo": "follow me"}

    tid = f"{trace_id:032x}"
    agent_side = {
        s.name: s
        for s in agent_spans.get_finished_spans()
        if s.context is not None and s.context.trace_id == trace_id
    }
    handled, reply = agent_side["agent tracedecho"], agent_side["reply"]
    assert handled.context is not None
    assert handled.parent is not None
    assert reply.parent is not None
    assert f"{handled.context.trace_id:032x}" == tid
    assert reply.parent.span_id == handled.context.span_id
    agent_parent = f"{handled.parent.span_id:016x}"

    def recorded() -> bool:
        names = {s.name for s in receiver.trace(tid)}
        return {"POST /v1/route/{subject}", "append", "project replica_messages"} <= names and (
            agent_parent in {s.span_id for s in receiver.trace(tid)}
        )

    assert wait_for(recorded, timeout=20), (receiver.trace(tid), broker.log_tail())
    spans = receiver.trace(tid)
    by_id = {s.span_id: s for s in spans}
    by_name = {s.name: s for s in spans}
    ingress = by_name["POST /v1/route/{subject}"]
    # The message's own append (the router appends its decision under its own span).
    append = next(
        s
        for s in spans
        if s.name == "append" and s.attributes.get("messaging.nats.stream") == Stream.MESSAGES
    )
    assert ingress.parent_id == f"{CLIENT_SPAN:016x}"  # continues the client's trace
    assert ingress.service == "broker-ingress"
    assert ingress.attributes["http.response.status_code"] == 200
    assert append.parent_id == ingress.span_id
    assert append.attributes["messaging.nats.stream"] == Stream.MESSAGES
    projected = by_name["project replica_messages"]
    assert projected.parent_id == append.span_id
    assert projected.service == "broker-worker"
    # The agent continued the context of the decision it received: the router's append of
    # RouteDecided, under the router's route span, under the message's append.
    chain = [by_id[agent_parent].name, *ancestors(by_id[agent_parent], by_id)]
    assert chain == ["append", "route", "append", "POST /v1/route/{subject}"], chain
    assert by_name["route"].service == "broker-router"


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_an_invalid_traceparent_beside_a_cloudevents_one_is_as_if_absent(
    client: httpx.AsyncClient,
    broker: BrokerProcess,
    receiver: OtlpReceiver,
    js: JetStreamContext,
    mode: str,
) -> None:
    """A ``traceparent`` that is not valid is ignored, with its ``tracestate``, as if absent
    (W3C): a CloudEvent's own trace context (``ce-traceparent``, or a structured event's
    ``traceparent`` attribute) is then what the stored message continues, from the append,
    as without the header. The invalid header made the append continue a new trace of the
    ingress's, and the stored ``traceparent`` split the message from its event's trace."""
    trace_id = 0x7D3EFB1B173FECFA5E7A4E0A1C2B3D4E + (mode == "structured")
    event = client_traceparent(trace_id)
    other_trace = 0xA1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D6  # upper-case hex: not a traceparent
    invalid = {"traceparent": f"00-{other_trace:032X}-{CLIENT_SPAN:016x}-01", "tracestate": "c=1"}
    if mode == "binary":
        answer = await client.post(
            "/v1/publish/trace.cloudevent",
            content=b'{"n": 1}',
            headers={
                "content-type": "application/json",
                "ce-specversion": "1.0",
                "ce-id": "traced-binary",
                "ce-source": "/observability",
                "ce-type": "traced",
                "ce-traceparent": event,
                **invalid,
            },
        )
    else:
        body = {
            "specversion": "1.0",
            "id": "traced-structured",
            "source": "/observability",
            "type": "traced",
            "traceparent": event,
            "data": {"n": 1},
        }
        answer = await client.post(
            "/v1/publish/trace.cloudevent",
            content=orjson.dumps(body),
            headers={"content-type": "application/cloudevents+json", **invalid},
        )
    assert answer.status_code == 200, answer.text
    stored = (await js.get_msg(Stream.MESSAGES, answer.json()["seq"])).headers or {}
    assert stored["ce-traceparent"] == event
    assert "tracestate" not in stored  # the invalid header's went with it
    tid = f"{trace_id:032x}"
    assert stored["traceparent"].startswith(f"00-{tid}-"), stored
    append_id = stored["traceparent"][36:52]
    assert wait_for(lambda: append_id in {s.span_id for s in receiver.trace(tid)}, timeout=20), (
        receiver.trace(tid),
        broker.log_tail(),
    )
    by_id = {s.span_id: s for s in receiver.trace(tid)}
    append = by_id[append_id]
    assert append.name == "append"
    assert append.parent_id is not None
    # Binary mode: the server span continues the event's context; structured: the event's
    # own consumer span does (the request carried none the server span could continue).
    continued = by_id[append.parent_id]
    assert continued.name == (
        "cloudevent" if mode == "structured" else "POST /v1/publish/{subject}"
    )
    assert continued.parent_id == f"{CLIENT_SPAN:016x}"


async def test_log_lines_carry_the_trace_id_of_their_request(
    client: httpx.AsyncClient, broker: BrokerProcess
) -> None:
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    records = "\n".join(json.dumps({"subject": "logs.demo", "data": {"n": i}}) for i in range(3))
    answer = await client.post(
        "/v1/publish",
        content=records.encode(),
        headers={
            "content-type": "application/x-ndjson",
            "traceparent": client_traceparent(trace_id),
        },
    )
    assert answer.status_code == 200, answer.text

    def logged() -> list[dict[str, Any]]:
        lines = []
        for line in broker.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f"{trace_id:032x}" in line:
                lines.append(orjson.loads(line))
        return lines

    assert wait_for(lambda: bool(logged()), timeout=10), broker.log_tail()
    (line,) = [entry for entry in logged() if entry["event"] == "batch_published"]
    assert line["trace_id"] == f"{trace_id:032x}"
    assert len(line["span_id"]) == 16
    assert '"n"' not in json.dumps(line)  # no payloads


async def test_metrics_of_every_process_change_as_traffic_flows(
    client: httpx.AsyncClient, broker: BrokerProcess
) -> None:
    """Ingress counters and the projection worker's counters on one /metrics."""
    before = scrape(broker)
    payloads = [orjson.dumps({"n": i, "pad": "x" * i}) for i in range(20)]
    for body in payloads:
        r = await client.post(
            "/v1/publish/metrics.demo", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text
    batch = b"\n".join(orjson.dumps({"subject": "metrics.batch", "data": i}) for i in range(10))
    r = await client.post(
        "/v1/publish", content=batch, headers={"content-type": "application/x-ndjson"}
    )
    assert r.status_code == 200, r.text
    broken = await client.post(
        "/v1/publish/metrics.broken",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 200, broken.text
    replay = await client.get(
        "/v1/streams/MESSAGES/messages",
        params={"start_seq": broken.json()["seq"], "limit": "1", "decode": "json"},
    )
    assert "decode_error" in replay.text
    # Each way a request is answered is counted by the status it got: refused, a method not
    # allowed, and a path the publish handler does not serve (the ASGI bridge).
    refused = await client.post(
        "/v1/publish/bad..subject", content=b"{}", headers={"content-type": "application/json"}
    )
    assert refused.status_code == 422, refused.text
    assert (await client.get("/v1/publish/metrics.demo")).status_code == 405
    assert (await client.get("/healthz")).status_code == 200
    appended = len(payloads) + 10 + 1
    appended_bytes = sum(map(len, payloads)) + sum(len(str(i)) for i in range(10)) + 9

    def grew(name: str, by: float, **labels: str) -> bool:
        return value(scrape(broker), name, **labels) - value(before, name, **labels) >= by

    publish = {"route": "/v1/publish/{subject}", "method": "POST", "status": "200"}
    assert wait_for(lambda: grew("broker_http_requests_total", 21, **publish), timeout=10)
    assert wait_for(
        lambda: grew("broker_projection_applied_total", appended, projection="replica_messages"),
        timeout=30,
    ), broker.log_tail()
    after = scrape(broker)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("broker_messages_in_total", stream="MESSAGES") == appended
    assert delta("broker_bytes_in_total", stream="MESSAGES") == appended_bytes
    assert (
        delta("broker_http_requests_total", route="/v1/publish", method="POST", status="200") == 1
    )
    one = "/v1/publish/{subject}"
    assert delta("broker_http_requests_total", route=one, method="POST", status="422") == 1
    assert delta("broker_http_requests_total", route=one, method="GET", status="405") == 1
    assert delta("broker_http_requests_total", route="/healthz", method="GET", status="200") >= 1
    assert delta("broker_jetstream_ack_duration_seconds_count") >= appended
    assert delta("broker_http_request_duration_seconds_count", route="/v1/publish/{subject}") >= 21
    assert delta("broker_decode_errors_total", codec="json") == 1
    assert ("broker_projection_lag_messages", (("projection", "replica_messages"),)) in after
    version = (await client.get("/version")).json()
    build = [k for k in after if k[0] == "broker_build_info"]
    assert dict(build[0][1])["nats_server_version"] == version["nats_server_version"]
    assert dict(build[0][1])["version"] == version["version"]


def status_cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "broker", "status", "--url", broker.base_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


async def test_status_json_matches_the_streams_state(
    client: httpx.AsyncClient, broker: BrokerProcess, js: JetStreamContext
) -> None:
    registered = await client.put(
        "/v1/agents/statusdemo", json=manifest("statusdemo", "shows up in broker status")
    )
    assert registered.status_code in (200, 201), registered.text
    for i in range(5):
        r = await client.post("/v1/publish/status.demo", json={"i": i})
        assert r.status_code == 200, r.text

    async def stream_state() -> dict[str, tuple[int, int, int]]:
        found = {}
        for name in Stream:
            state = (await js.stream_info(name)).state
            found[str(name)] = (state.messages, state.bytes, state.last_seq)
        return found

    document: dict[str, Any] = {}

    async def matches() -> bool:
        nonlocal document
        done = await asyncio.to_thread(status_cli, broker, "--json")
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        shown = {s["name"]: (s["messages"], s["bytes"], s["last_seq"]) for s in document["streams"]}
        lagging = [c for c in document["consumers"] if c["kind"] == "projection" and c["lag"]]
        return shown == await stream_state() and not lagging

    assert await await_until(matches, timeout=30, interval=0.5), document
    assert {c["stream"] for c in document["consumers"] if c["kind"] == "projection"} >= {
        "MESSAGES",
        "REGISTRY",
    }
    agent = next(a for a in document["agents"] if a["name"] == "statusdemo")
    assert agent["registered"]
    assert agent["capabilities"] == ["echo"]
    assert document["broker"]["nats_server_version"]

    table = await asyncio.to_thread(status_cli, broker)
    assert table.returncode == 0, table.stderr
    for heading in ("streams", "consumers", "agents", "route decisions", "DLQ"):
        assert heading in table.stdout
    assert "MESSAGES" in table.stdout
    assert "statusdemo" in table.stdout


def test_status_says_so_when_the_broker_is_unreachable() -> None:
    from tests.e2e._broker import free_port

    done = subprocess.run(
        [sys.executable, "-m", "broker", "status", "--url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "cannot reach the broker" in done.stderr


def test_status_watch_goes_on_while_the_broker_is_away(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`broker status --watch` needs its first read; after that a broker restarting is
    reported on stderr and watched on, instead of ending the watch with exit 3."""
    process = start_broker(tmp_path_factory.mktemp("watched"), nats_url=module_nats.url)
    command = ["status", "--json", "--watch", "--interval", "0.3", "--url", process.base_url]
    watch = subprocess.Popen(
        [sys.executable, "-m", "broker", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        assert json.loads(watch.stdout.readline())["streams"]
        process.stop()
        # Over six intervals with nobody answering: the watch must still be running.
        assert not wait_for(lambda: watch.poll() is not None, timeout=2.0)
    finally:
        watch.kill()
        _, errors = watch.communicate(timeout=10)
        process.stop()
    assert "cannot reach the broker" in errors
    assert "retrying every 0.3 s" in errors
