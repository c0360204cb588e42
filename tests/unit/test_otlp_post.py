"""The export thread's plain POST to an ``http://`` collector: the exporter's headers and
body over one kept-alive connection, a retry on a closed one, and the exporter's own client
for everything else (a refusal, a collector that is down, TLS, compression, proxies)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from broker.embedded import free_port
from broker.telemetry._export import _otlp_http_post, _PlainHttpPost

pytestmark = pytest.mark.unit


class Collector:
    """A local OTLP/HTTP endpoint that records what it is sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, tuple[str, int]]] = []
        self.status = 200
        self.close_after_each = False
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                collector.requests.append((self.path, headers, body, self.client_address))
                self.send_response(collector.status)
                self.send_header("content-length", "0")
                if collector.close_after_each:
                    self.send_header("connection", "close")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.stop()


class Fallback:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def __call__(self, body: bytes) -> Any:
        self.bodies.append(body)
        return "fallback"


def plain(exporter: OTLPSpanExporter) -> _PlainHttpPost:
    post = _otlp_http_post(exporter)
    assert isinstance(post, _PlainHttpPost)
    return post


def test_the_exporters_headers_and_body_go_over_one_kept_alive_connection(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-team=routing")
    post = plain(OTLPSpanExporter(endpoint=collector.url))
    for body in (b"\x0a\x00", b"second", b"x" * 100_000):
        assert post(body).success
    assert [r[2] for r in collector.requests] == [b"\x0a\x00", b"second", b"x" * 100_000]
    path, headers, _, _ = collector.requests[0]
    assert path == "/v1/traces"
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["user-agent"].startswith("OTel-OTLP-Exporter-Python/")
    assert headers["x-team"] == "routing"
    assert len({r[3] for r in collector.requests}) == 1  # the same client port: kept alive
    post.close()


def test_a_connection_the_collector_closed_is_opened_again(collector: Collector) -> None:
    collector.close_after_each = True
    fallback = Fallback()
    post = _PlainHttpPost(collector.url, {"content-type": "application/x-protobuf"}, 5, fallback)
    for i in range(3):
        assert post(bytes([i])).success
    assert [r[2] for r in collector.requests] == [b"\x00", b"\x01", b"\x02"]
    assert fallback.bodies == []


def test_a_refusal_goes_to_the_exporters_own_client(collector: Collector) -> None:
    collector.status = 503
    fallback = Fallback()
    post = _PlainHttpPost(collector.url, {}, 5, fallback)
    assert post(b"spans") == "fallback"
    assert fallback.bodies == [b"spans"]
    assert len(collector.requests) == 1  # not retried here: the exporter's client retries


def test_a_collector_that_is_down_goes_to_the_exporters_own_client() -> None:
    fallback = Fallback()
    post = _PlainHttpPost(f"http://127.0.0.1:{free_port()}/v1/traces", {}, 2, fallback)
    assert post(b"spans") == "fallback"
    assert fallback.bodies == [b"spans"]


@pytest.mark.parametrize(
    ("endpoint", "env"),
    [
        ("https://collector:4318/v1/traces", {}),
        ("http://collector:4318/v1/traces", {"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"}),
        ("http://collector:4318/v1/traces", {"HTTP_PROXY": "http://proxy:3128"}),
        ("http://collector:4318/v1/traces", {"http_proxy": "http://proxy:3128"}),
        (
            "http://collector:4318/v1/traces",
            {"OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "my.module:provider"},
        ),
    ],
)
def test_anything_but_a_plain_http_post_stays_with_the_exporters_client(
    endpoint: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    later = {k: v for k, v in env.items() if "CREDENTIAL" in k}  # the exporter would load it
    for name, value in env.items():
        if name not in later:
            monkeypatch.setenv(name, value)
    exporter = OTLPSpanExporter(endpoint=endpoint)
    for name, value in later.items():
        monkeypatch.setenv(name, value)
    assert _otlp_http_post(exporter) == exporter._client.export


def test_the_pipelines_shutdown_closes_the_kept_alive_connection(collector: Collector) -> None:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from broker.telemetry._export import SpanPipeline

    pipeline = SpanPipeline(
        Resource.create({}),
        InstrumentationScope("broker"),
        exporters=[OTLPSpanExporter(endpoint=collector.url)],
    )
    (post,) = pipeline._plain_posts
    pipeline.ended(("s", 1, 2, 0, False, None, 1, 0, 0, 0, None, 0, None))
    pipeline.force_flush()
    assert len(collector.requests) == 1
    assert post._connection is not None
    pipeline.shutdown()
    assert post._connection is None
