"""The ingress over TLS as a user runs it: ``broker serve --tls-cert/--tls-key`` (HTTPS with
ALPN h2, TLS 1.3 only) and ``--tls-client-ca`` (mTLS), with certificates made at test time."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded import NatsServer, free_port
from tests._certs import Issued, Pki, make_pki, secure_nats_config
from tests._wait import wait_for
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e

#: Only the ingress: no projection workers or routers, so two brokers start quickly.
LEAN = ("--projection-workers", "0", "--routers", "0")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def trusting(ca: Path, client: Issued | None = None) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (and presents ``client``'s certificate)."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


def _tls_broker(
    tmp: Path, nats: NatsServer, pki: Pki, *extra: str, ready: ssl.SSLContext
) -> BrokerProcess:
    args = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), *LEAN, *extra)
    broker = start_broker(tmp, nats_url=nats.url, args=args, scheme="https", wait=False)
    try:
        broker.wait_ready(verify=ready)
    except BaseException:
        broker.stop()
        raise
    return broker


@pytest.fixture(scope="module")
def tls_broker(
    module_nats: NatsServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    broker = _tls_broker(
        tmp_path_factory.mktemp("tls"), module_nats, pki, ready=trusting(pki.ca.cert)
    )
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def mtls_broker(
    module_nats: NatsServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    broker = _tls_broker(
        tmp_path_factory.mktemp("mtls"),
        module_nats,
        pki,
        "--tls-client-ca",
        str(pki.ca.cert),
        ready=trusting(pki.ca.cert, pki.client),
    )
    yield broker
    broker.stop()


def publish(broker: BrokerProcess, verify: ssl.SSLContext, subject: str) -> httpx.Response:
    with httpx.Client(http2=True, verify=verify, timeout=10) as client:
        return client.post(
            f"{broker.base_url}/v1/publish/{subject}",
            content=b'{"secure": true}',
            headers={"content-type": "application/json"},
        )


def handshake(port: int, context: ssl.SSLContext) -> tuple[str | None, str | None]:
    """A raw TLS handshake offering h2 and http/1.1: (TLS version, ALPN protocol)."""
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version(), tls.selected_alpn_protocol()


# --- TLS ---------------------------------------------------------------------------------


def test_http2_over_tls_publishes_and_answers_with_the_sequence(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    response = publish(tls_broker, trusting(pki.ca.cert), "tls.orders")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200, response.text
    assert response.json()["seq"] >= 1


def test_the_handshake_is_tls_1_3_and_alpn_picks_h2(tls_broker: BrokerProcess, pki: Pki) -> None:
    assert handshake(tls_broker.port, trusting(pki.ca.cert)) == ("TLSv1.3", "h2")


def test_a_tls_1_2_only_client_is_refused(tls_broker: BrokerProcess, pki: Pki) -> None:
    old = trusting(pki.ca.cert)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError) as refused:
        handshake(tls_broker.port, old)
    assert "version" in str(refused.value).lower(), refused.value
    with pytest.raises(httpx.ConnectError):
        publish(tls_broker, old, "tls.old")


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2c-prior-knowledge"])
def test_plaintext_http_to_the_tls_port_gets_no_answer(
    tls_broker: BrokerProcess, http2: bool
) -> None:
    plain = f"http://127.0.0.1:{tls_broker.port}/readyz"
    with (
        httpx.Client(http1=not http2, http2=http2, timeout=5) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get(plain)


def test_a_client_that_trusts_another_ca_refuses_the_server(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        publish(tls_broker, trusting(pki.unknown_ca.cert), "tls.spoofed")


def test_a_client_with_no_ca_configured_refuses_the_self_made_ca(
    tls_broker: BrokerProcess,
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        publish(tls_broker, ssl.create_default_context(), "tls.system")


# --- mTLS --------------------------------------------------------------------------------


def test_mtls_accepts_a_client_certificate_from_the_ca(
    mtls_broker: BrokerProcess, pki: Pki
) -> None:
    response = publish(mtls_broker, trusting(pki.ca.cert, pki.client), "mtls.orders")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200, response.text


def test_mtls_refuses_a_client_without_a_certificate(mtls_broker: BrokerProcess, pki: Pki) -> None:
    with pytest.raises(httpx.TransportError):
        publish(mtls_broker, trusting(pki.ca.cert), "mtls.anonymous")


def test_mtls_refuses_a_client_certificate_from_an_unknown_ca(
    mtls_broker: BrokerProcess, pki: Pki
) -> None:
    with pytest.raises(httpx.TransportError):
        publish(mtls_broker, trusting(pki.ca.cert, pki.unknown_client), "mtls.stranger")


@pytest.mark.parametrize(
    ("who", "alert"),
    [("anonymous", "CERTIFICATE_REQUIRED"), ("stranger", "UNKNOWN_CA")],
)
def test_mtls_refusal_is_a_tls_alert_naming_the_reason(
    mtls_broker: BrokerProcess, pki: Pki, who: str, alert: str
) -> None:
    """Under TLS 1.3 the client finishes its side of the handshake first; the server's alert
    arrives on the first read, so send a request and read to see it."""
    context = trusting(pki.ca.cert, None if who == "anonymous" else pki.unknown_client)
    context.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", mtls_broker.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with pytest.raises(ssl.SSLError, match=alert):
            tls.recv(1024)


# --- start-up checks -----------------------------------------------------------------------


def serve(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``broker serve`` expected to refuse to start (a usage error)."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--port", str(free_port()), *LEAN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
        env={**os.environ, "COLUMNS": "500"},  # rich must not wrap the message
    )


def test_a_certificate_without_its_key_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    done = serve("--tls-cert", str(pki.server.cert), tmp=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--tls-cert and --tls-key go together" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreadable_certificate_file_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    done = serve("--tls-cert", str(missing), "--tls-key", str(pki.server.key), tmp=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "is not a readable file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_key_that_does_not_match_the_certificate_is_a_usage_error(
    pki: Pki, tmp_path: Path
) -> None:
    done = serve("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key), tmp=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "do not load" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_client_ca_without_a_certificate_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    done = serve("--tls-client-ca", str(pki.ca.cert), tmp=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--tls-client-ca needs --tls-cert" in done.stderr
    assert not (tmp_path / ".broker").exists()  # refused before anything started


def test_the_whole_broker_runs_on_a_nats_server_that_requires_tls_and_a_password(
    pki: Pki, tmp_path: Path
) -> None:
    """Ingress, projection worker and router all connect with BROKER_NATS_* settings."""
    from broker.embedded import ServerSpec

    password = "a password for the broker"
    spec = ServerSpec(store_dir=tmp_path / "nats", extra_config=secure_nats_config(pki, password))
    server = NatsServer(spec).start()
    env = {
        "BROKER_NATS_TLS_CA": str(pki.ca.cert),
        "BROKER_NATS_TLS_CERT": str(pki.client.cert),
        "BROKER_NATS_TLS_KEY": str(pki.client.key),
        "BROKER_NATS_USER": "broker",
        "BROKER_NATS_PASSWORD": password,
    }
    try:
        broker = start_broker(tmp_path / "broker", nats_url=server.url, env=env)
        try:
            with httpx.Client(base_url=broker.base_url, http1=False, http2=True) as client:
                r = client.post("/v1/publish/secure.demo", json={"over": "tls"})
                assert r.status_code == 200, r.text
                scraped = client.get("/metrics")
            assert scraped.status_code == 200, scraped.text
            (expiry,) = [
                f
                for f in text_string_to_metric_families(scraped.text)
                if f.name == "broker_tls_expiry_timestamp_seconds"
            ]
            reported = {(s.labels["file"], s.labels["path"]): s.value for s in expiry.samples}
            assert reported == {
                ("nats_cert", str(pki.client.cert)): not_after(pki.client.cert),
                ("nats_ca", str(pki.ca.cert)): not_after(pki.ca.cert),
            }
            names: dict[str, dict[str, object]] = {}

            def every_process_connected() -> bool:
                # The router loads its embedding model before it connects: it may be later.
                connz = httpx.get(f"{server.monitor_url}/connz?auth=1", timeout=5).json()
                names.clear()
                names.update({c.get("name", ""): c for c in connz["connections"]})
                kinds = ("broker-ingress-", "broker-router", "broker-worker")
                return all(any(n.startswith(k) for n in names) for k in kinds)

            wait_for(every_process_connected, timeout=30)
            ingress = [c for n, c in names.items() if n.startswith("broker-ingress-")]
            assert ingress, sorted(names)
            assert all(c.get("tls_version") == "1.3" for c in ingress)
            assert all(c.get("authorized_user") == "broker" for c in ingress)
            assert any(n.startswith("broker-router") for n in names), sorted(names)
            assert any(n.startswith("broker-worker") for n in names), sorted(names)
        finally:
            broker.stop()
    finally:
        server.stop()


def cli_publish(broker: BrokerProcess, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``broker publish`` to ``broker`` over https, with only ``env``'s TLS variables."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"BROKER_CA_FILE", "BROKER_CLIENT_CERT", "BROKER_CLIENT_KEY"}
    }
    return subprocess.run(
        [sys.executable, "-m", "broker", "publish", "cli.tls", "-", "-t", "application/json"],
        input='{"from": "cli"}',
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "BROKER_URL": broker.base_url, **env},
        check=False,
    )


def test_the_cli_presents_a_client_certificate_to_an_mtls_broker(
    mtls_broker: BrokerProcess, pki: Pki
) -> None:
    ca = {"BROKER_CA_FILE": str(pki.ca.cert)}
    good = cli_publish(
        mtls_broker,
        {
            **ca,
            "BROKER_CLIENT_CERT": str(pki.client.cert),
            "BROKER_CLIENT_KEY": str(pki.client.key),
        },
    )
    assert good.returncode == 0, good.stderr
    assert '"seq"' in good.stdout
    without = cli_publish(mtls_broker, ca)
    assert without.returncode == 3, without.stderr  # the handshake fails: unavailable
    untrusted = cli_publish(mtls_broker, {})  # the system's CAs do not know ours
    assert untrusted.returncode == 3, untrusted.stderr


def test_unusable_cli_tls_files_are_usage_errors(mtls_broker: BrokerProcess, pki: Pki) -> None:
    missing = cli_publish(mtls_broker, {"BROKER_CA_FILE": "/nonexistent/ca.pem"})
    assert missing.returncode == 2
    assert "BROKER_CA_FILE" in missing.stderr
    key_only = cli_publish(mtls_broker, {"BROKER_CLIENT_KEY": str(pki.client.key)})
    assert key_only.returncode == 2
    assert "without BROKER_CLIENT_CERT" in key_only.stderr
    wrong_key = cli_publish(
        mtls_broker,
        {"BROKER_CLIENT_CERT": str(pki.client.cert), "BROKER_CLIENT_KEY": str(pki.server.key)},
    )
    assert wrong_key.returncode == 2
    assert "BROKER_CLIENT_CERT" in wrong_key.stderr
