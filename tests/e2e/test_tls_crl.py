"""mTLS with revocation lists (``--tls-crl``), in the real ``broker serve`` (granian, rustls):
a revoked client certificate is refused in the handshake, and SIGHUP makes the ingress read
its TLS files again, so a newly revoked certificate is refused without a restart, while a
file that would not do is refused with the reason in the log and the ingress keeps serving
with what it read before."""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded import NatsServer
from tests._certs import CertificateAuthority, Issued
from tests.e2e._broker import BrokerProcess, start_broker, within
from tests.e2e.test_tls import LEAN, publish, serve, trusting

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: The TLS alert a revoked client certificate is answered with, as Python's ssl names it.
REVOKED = "SSLV3_ALERT_CERTIFICATE_REVOKED"


@dataclass(frozen=True)
class Clients:
    ca: CertificateAuthority
    server: Issued
    alice: Issued
    bob: Issued
    mallory: Issued
    crl: Path


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Clients:
    directory = tmp_path_factory.mktemp("crl-pki")
    ca = CertificateAuthority(directory / "ca", "clients")
    mallory = ca.issue_client("mallory")
    crl = ca.revocation_list(directory / "clients.crl.pem", (mallory,))
    return Clients(
        ca,
        ca.issue_server("server"),
        ca.issue_client("alice"),
        ca.issue_client("bob"),
        mallory,
        crl,
    )


@pytest.fixture(scope="module")
def crl_broker(
    module_nats: NatsServer, clients: Clients, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    args = (
        *("--tls-cert", str(clients.server.cert), "--tls-key", str(clients.server.key)),
        *("--tls-client-ca", str(clients.ca.cert), "--tls-crl", str(clients.crl)),
        *LEAN,
    )
    broker = start_broker(
        tmp_path_factory.mktemp("crl-broker"),
        nats_url=module_nats.url,
        args=args,
        scheme="https",
        wait=False,
    )
    try:
        broker.wait_ready(verify=trusting(clients.ca.cert, clients.alice))
        yield broker
    finally:
        broker.stop()


def refusal(broker: BrokerProcess, clients: Clients, client: Issued) -> str | None:
    """The TLS alert the ingress answers ``client``'s certificate with, or ``None`` when it
    serves it. Under TLS 1.3 the alert arrives on the first read."""
    context = trusting(clients.ca.cert, client)
    context.set_alpn_protocols(["http/1.1"])
    try:
        with (
            socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = tls.recv(1024)
    except ssl.SSLError as e:
        return e.reason or str(e)
    except OSError as e:
        return f"connection failed: {e!r}"
    return None if answer.startswith(b"HTTP/1.1 200") else f"answered {answer[:60]!r}"


def test_a_revoked_client_certificate_is_refused_and_others_are_served(
    crl_broker: BrokerProcess, clients: Clients
) -> None:
    assert refusal(crl_broker, clients, clients.mallory) == REVOKED
    response = publish(crl_broker, trusting(clients.ca.cert, clients.alice), "crl.orders")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200, response.text


def test_sighup_applies_a_new_revocation_list_and_refuses_a_bad_one(
    crl_broker: BrokerProcess, clients: Clients
) -> None:
    assert refusal(crl_broker, clients, clients.alice) is None
    clients.ca.revocation_list(clients.crl, (clients.mallory, clients.alice), number=2)
    replaced = crl_broker.old_workers_stopped()
    crl_broker.proc.send_signal(signal.SIGHUP)
    # Until the old worker stops, it serves with the old list beside its successor.
    stopped = within(30, lambda: crl_broker.old_workers_stopped() > replaced)
    assert stopped, crl_broker.log_tail()
    assert refusal(crl_broker, clients, clients.alice) == REVOKED
    assert refusal(crl_broker, clients, clients.bob) is None
    assert '"children": ["ingress"], "event": "reload"' in crl_broker.log_path.read_text()

    # A CRL the TLS library would refuse (a worker reading it would panic): refused, kept.
    clients.ca.revocation_list(clients.crl, (clients.mallory,), number=None)
    crl_broker.proc.send_signal(signal.SIGHUP)
    assert within(10, lambda: "reload_refused" in crl_broker.log_path.read_text())
    assert ": a CRL without extensions" in crl_broker.log_path.read_text()
    time.sleep(2)  # had the ingress been reloaded, its workers would be starting now
    assert crl_broker.proc.poll() is None
    assert refusal(crl_broker, clients, clients.bob) is None
    assert refusal(crl_broker, clients, clients.alice) == REVOKED
    response = publish(crl_broker, trusting(clients.ca.cert, clients.bob), "crl.orders")
    assert response.status_code == 200, response.text


def server_serial(broker: BrokerProcess, clients: Clients) -> int | None:
    """The serial number of the certificate the ingress presents now (``None``: no
    handshake, while a worker is being started again)."""
    context = trusting(clients.ca.cert, clients.bob)
    try:
        with (
            socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_rotates_the_server_certificate(crl_broker: BrokerProcess, clients: Clients) -> None:
    clients.ca.revocation_list(clients.crl, (clients.mallory,), number=3)  # a good one again
    before = server_serial(crl_broker, clients)
    renewed = clients.ca.issue_server("server")  # the same files, a new key and certificate
    assert renewed == clients.server
    after = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number
    assert after != before
    replaced = crl_broker.old_workers_stopped()
    crl_broker.proc.send_signal(signal.SIGHUP)
    stopped = within(30, lambda: crl_broker.old_workers_stopped() > replaced)
    assert stopped, crl_broker.log_tail()
    assert server_serial(crl_broker, clients) == after
    response = publish(crl_broker, trusting(clients.ca.cert, clients.bob), "crl.orders")
    assert response.status_code == 200, response.text


def test_an_unusable_crl_is_a_usage_error(clients: Clients, tmp_path: Path) -> None:
    """A delta CRL passed the first check, and every granian worker panicked on it."""
    crl = clients.ca.revocation_list(
        tmp_path / "delta.crl.pem", extensions=((x509.DeltaCRLIndicator(1), True),)
    )
    done = serve(
        *("--tls-cert", str(clients.server.cert), "--tls-key", str(clients.server.key)),
        *("--tls-client-ca", str(clients.ca.cert), "--tls-crl", str(crl)),
        tmp=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "a delta CRL" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".broker").exists()  # refused before anything started


def test_metrics_say_when_each_tls_file_stops_being_valid(
    crl_broker: BrokerProcess, clients: Clients
) -> None:
    certificate = x509.load_pem_x509_certificate(clients.server.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(clients.ca.cert.read_bytes())
    crl = x509.load_pem_x509_crl(clients.crl.read_bytes())
    assert crl.next_update_utc is not None
    expected = {
        ("cert", str(clients.server.cert)): certificate.not_valid_after_utc.timestamp(),
        ("client_ca", str(clients.ca.cert)): ca.not_valid_after_utc.timestamp(),
        ("crl", str(clients.crl)): crl.next_update_utc.timestamp(),
    }
    seen: list[dict[tuple[str, str], float]] = []

    def scraped() -> bool:
        with httpx.Client(http2=True, verify=trusting(clients.ca.cert, clients.bob)) as client:
            response = client.get(f"{crl_broker.base_url}/metrics")
        assert response.status_code == 200, response.text
        (family,) = [
            f
            for f in text_string_to_metric_families(response.text)
            if f.name == "broker_tls_expiry_timestamp_seconds"
        ]
        seen.append({(s.labels["file"], s.labels["path"]): s.value for s in family.samples})
        return seen[-1] == expected

    # After the rotation test's reload, granian's old worker (the old certificate's) answers
    # for up to 3.5 s more: each worker reports the files it serves with.
    assert within(15, scraped), seen[-1]
    assert seen[-1] == expected
