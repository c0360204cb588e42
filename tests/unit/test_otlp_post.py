"""The export thread's plain POST to a collector: the exporter's headers and body (gzip or
deflate as it asks, over TLS with its CA and client certificate) on one kept-alive
connection, a retry on a closed one, and the exporter's own client for everything else (a
refusal, a collector that is down, proxies, a credential provider)."""

from __future__ import annotations

import gzip
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from broker.embedded import free_port
from broker.telemetry._export import _otlp_http_post, _PlainHttpPost
from tests._certs import Pki, make_pki

pytestmark = pytest.mark.unit


class Collector:
    """A local OTLP/HTTP endpoint that records what it is sent."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, tuple[str, int]]] = []
        self.peers: list[Any] = []  # the client certificate of each request (TLS)
        self.status = 200
        self.close_after_each = False
        self.answer_after = 0.0  # seconds between storing a request and answering it
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                collector.requests.append((self.path, headers, body, self.client_address))
                if isinstance(self.connection, ssl.SSLSocket):
                    collector.peers.append(self.connection.getpeercert())
                time.sleep(collector.answer_after)
                self.send_response(collector.status)
                self.send_header("content-length", "0")
                if collector.close_after_each:
                    self.send_header("connection", "close")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c


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


def plain_with_fallback(exporter: OTLPSpanExporter) -> tuple[_PlainHttpPost, Fallback]:
    """The exporter's plain POST, handing what it does not send to a recording fallback."""
    post, fallback = plain(exporter), Fallback()
    post._fallback = fallback
    return post, fallback


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


@pytest.mark.parametrize("kept_alive", [True, False])
def test_a_batch_answered_too_late_is_not_sent_again(
    collector: Collector, kept_alive: bool
) -> None:
    """The collector stored the batch but answered after the timeout: sending it again (on a
    new connection, or through the exporter's client) could store it twice."""
    fallback = Fallback()
    post = _PlainHttpPost(collector.url, {}, 0.3, fallback)
    if kept_alive:
        assert post(b"first").success
    collector.answer_after = 1.0
    assert not post(b"late").success
    assert [r[2] for r in collector.requests].count(b"late") == 1
    assert fallback.bodies == []
    collector.answer_after = 0.0
    assert post(b"after").success  # a new connection; the late answer is not taken for it
    assert [r[2] for r in collector.requests][-1] == b"after"
    post.close()


def test_a_collector_that_is_down_goes_to_the_exporters_own_client() -> None:
    fallback = Fallback()
    post = _PlainHttpPost(f"http://127.0.0.1:{free_port()}/v1/traces", {}, 2, fallback)
    assert post(b"spans") == "fallback"
    assert fallback.bodies == [b"spans"]


@pytest.mark.parametrize(
    ("endpoint", "env"),
    [
        ("http://collector:4318/v1/traces", {"HTTP_PROXY": "http://proxy:3128"}),
        ("http://collector:4318/v1/traces", {"http_proxy": "http://proxy:3128"}),
        ("https://collector:4318/v1/traces", {"HTTPS_PROXY": "http://proxy:3128"}),
        ("https://collector:4318/v1/traces", {"all_proxy": "http://proxy:3128"}),
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


@pytest.mark.parametrize(
    ("compression", "decode"), [("gzip", gzip.decompress), ("deflate", zlib.decompress)]
)
def test_a_compressed_body_is_sent_as_the_exporter_asks(
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    compression: str,
    decode: Any,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", compression)
    post = plain(OTLPSpanExporter(endpoint=collector.url))
    body = b"\x0a\x04span" * 5_000
    assert post(body).success
    assert post(body).success
    (_, headers, sent, first), (_, _, _, second) = collector.requests
    assert headers["content-encoding"] == compression
    assert decode(sent) == body
    assert len(sent) < len(body) // 10
    assert first == second  # kept alive
    post.close()


def test_a_refused_compressed_body_goes_to_the_exporters_client_uncompressed(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback is the exporter's own ``export``, which compresses what it is given."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    exporter = OTLPSpanExporter(endpoint=collector.url)
    post, fallback = plain_with_fallback(exporter)
    collector.status = 503
    assert post(b"spans") == "fallback"
    assert fallback.bodies == [b"spans"]
    post.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("otlp-pki"))


def _server_tls(pki: Pki, *, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def test_tls_uses_the_exporters_ca_and_client_certificate(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OTEL_EXPORTER_OTLP_CERTIFICATE`` (``certificate_file``) is the CA, even where
    ``REQUESTS_CA_BUNDLE`` names another (``requests`` itself would take that one)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.unknown_ca.cert))
    with Collector(_server_tls(pki, client_ca=pki.ca.cert)) as collector:
        exporter = OTLPSpanExporter(
            endpoint=collector.url,
            certificate_file=str(pki.ca.cert),
            client_certificate_file=str(pki.client.cert),
            client_key_file=str(pki.client.key),
        )
        post, fallback = plain_with_fallback(exporter)
        for body in (b"first", b"second"):
            assert post(body).success
        post.close()
    assert [r[2] for r in collector.requests] == [b"first", b"second"]
    assert fallback.bodies == []
    assert len({r[3] for r in collector.requests}) == 1  # kept alive
    subject = dict(field for part in collector.peers[0]["subject"] for field in part)
    assert subject["commonName"] == "client"


def test_tls_with_a_ca_that_does_not_know_the_collector_is_not_sent(pki: Pki) -> None:
    """Certificate verification holds: nothing reaches a collector the CA did not sign for;
    the batch goes to the exporter's own client (which refuses it alike)."""
    with Collector(_server_tls(pki)) as collector:
        exporter = OTLPSpanExporter(
            endpoint=collector.url, certificate_file=str(pki.unknown_ca.cert)
        )
        post, fallback = plain_with_fallback(exporter)
        assert post(b"secret spans") == "fallback"
    assert collector.requests == []
    assert fallback.bodies == [b"secret spans"]


def test_a_session_that_does_not_verify_keeps_the_exporters_client(pki: Pki) -> None:
    """``requests`` may still verify such a session (an environment bundle overrides
    ``verify=False``): the plain POST never checks less than the exporter would."""
    exporter = OTLPSpanExporter(endpoint="https://collector:4318/v1/traces")
    exporter._client._transport._session.verify = False
    assert _otlp_http_post(exporter) == exporter._client.export


def test_a_session_that_ignores_the_environment_ignores_its_ca_bundle_too(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``trust_env`` off, ``requests`` reads no ``REQUESTS_CA_BUNDLE``; neither does the
    plain POST: the private CA there is not trusted, nothing is sent."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca.cert))
    with Collector(_server_tls(pki)) as collector:
        exporter = OTLPSpanExporter(endpoint=collector.url)
        exporter._client._transport._session.trust_env = False
        post, fallback = plain_with_fallback(exporter)
        assert post(b"spans") == "fallback"
    assert collector.requests == []
    assert fallback.bodies == [b"spans"]


def test_a_rotated_client_certificate_is_read_again_after_a_failed_handshake(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    cert.write_bytes(pki.unknown_client.cert.read_bytes())  # about to expire, say
    key.write_bytes(pki.unknown_client.key.read_bytes())
    with Collector(_server_tls(pki, client_ca=pki.ca.cert)) as collector:
        exporter = OTLPSpanExporter(
            endpoint=collector.url,
            certificate_file=str(pki.ca.cert),
            client_certificate_file=str(cert),
            client_key_file=str(key),
        )
        post, fallback = plain_with_fallback(exporter)
        assert post(b"refused") == "fallback"
        cert.write_bytes(pki.client.cert.read_bytes())  # the rotation
        key.write_bytes(pki.client.key.read_bytes())
        assert post(b"accepted").success
        post.close()
    assert [r[2] for r in collector.requests] == [b"accepted"]
    assert fallback.bodies == [b"refused"]


class Hangup:
    """A listener that accepts connections and closes them before answering."""

    def __init__(self) -> None:
        import socket

        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/traces"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            connection.recv(65536)
            connection.close()

    def stop(self) -> None:
        self.sock.close()


def test_a_fresh_connection_that_fails_is_not_tried_again_here() -> None:
    """Only a kept-alive connection may have been closed by the collector while idle; a new
    one that fails goes to the exporter's client at once (its retries have a backoff and one
    deadline: a second try here would add a whole timeout)."""
    hangup = Hangup()
    try:
        fallback = Fallback()
        post = _PlainHttpPost(hangup.url, {}, 5, fallback)
        assert post(b"spans") == "fallback"
    finally:
        hangup.stop()
    assert hangup.accepted == 1
    assert fallback.bodies == [b"spans"]


def test_a_header_http_client_refuses_goes_to_the_exporters_client(
    collector: Collector,
) -> None:
    fallback = Fallback()
    post = _PlainHttpPost(collector.url, {"x-bad": "line\nbreak"}, 5, fallback)
    assert post(b"spans") == "fallback"
    assert collector.requests == []


def test_an_http_proxy_variable_does_not_apply_to_an_https_collector(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")  # requests would not use it either
    exporter = OTLPSpanExporter(
        endpoint="https://collector:4318/v1/traces", certificate_file=str(pki.ca.cert)
    )
    assert isinstance(_otlp_http_post(exporter), _PlainHttpPost)


def test_unreadable_tls_settings_leave_the_exporters_client(pki: Pki, tmp_path: Path) -> None:
    exporter = OTLPSpanExporter(endpoint="https://collector:4318/v1/traces")
    exporter._client._transport._session.verify = str(tmp_path / "missing-ca.pem")
    assert _otlp_http_post(exporter) == exporter._client.export


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_without_a_certificate_the_bundle_requests_would_use_is_trusted(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "OTEL_EXPORTER_OTLP_CERTIFICATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", raising=False)
    monkeypatch.setenv(variable, str(pki.ca.cert))
    with Collector(_server_tls(pki)) as collector:
        post, fallback = plain_with_fallback(OTLPSpanExporter(endpoint=collector.url))
        assert post(b"spans").success
        post.close()
    assert [r[2] for r in collector.requests] == [b"spans"]
    assert fallback.bodies == []
