"""``broker_tls_expiry_timestamp_seconds`` for the NATS client's files: the certificate a
process presents to NATS and the CA it trusts NATS with, as they are on disk at the scrape
(the next connection to NATS is made with them), on the ingress's ``/metrics`` and on the
``--metrics-port`` of a worker or router started on its own."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded import free_port
from broker.settings import Settings
from broker.telemetry.endpoint import serve_metrics
from broker.telemetry.tls_expiry import NatsTlsExpiry
from tests._certs import Pki, make_pki

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def not_after(pem: bytes) -> float:
    return min(c.not_valid_after_utc for c in x509.load_pem_x509_certificates(pem)).timestamp()


def nats_files(pki: Pki, tmp_path: Path, lifetime: dt.timedelta) -> tuple[Path, Path, Settings]:
    """A client certificate of ``lifetime`` (with its CA after it, as a chain) and the CA
    bundle, copied where a test may replace them."""
    client = pki.ca.issue_client("renewed", lifetime=lifetime)
    cert, ca = tmp_path / "client.pem", tmp_path / "ca.pem"
    cert.write_bytes(client.cert.read_bytes() + pki.ca.cert.read_bytes())
    ca.write_bytes(pki.ca.cert.read_bytes())
    return cert, ca, Settings(nats_tls_ca=ca, nats_tls_cert=cert, nats_tls_key=client.key)


def test_without_tls_to_nats_there_is_nothing_to_report() -> None:
    assert NatsTlsExpiry(Settings()).samples() == []


def test_the_certificate_and_the_ca_report_their_earliest_end(pki: Pki, tmp_path: Path) -> None:
    cert, ca, settings = nats_files(pki, tmp_path, dt.timedelta(hours=3))
    samples = NatsTlsExpiry(settings).samples()
    assert samples == [
        ("nats_cert", str(cert), not_after(cert.read_bytes())),
        ("nats_ca", str(ca), not_after(ca.read_bytes())),
    ]
    # The chain ends with its client certificate (3 h), hours before its CA (1 day).
    assert samples[0][2] < samples[1][2] - 20 * 3600


def test_a_renewed_certificate_is_reported_at_the_next_scrape(pki: Pki, tmp_path: Path) -> None:
    cert, _, settings = nats_files(pki, tmp_path, dt.timedelta(hours=2))
    expiry = NatsTlsExpiry(settings)
    before = dict((kind, at) for kind, _, at in expiry.samples())
    assert dict((kind, at) for kind, _, at in expiry.samples()) == before  # kept, not re-read
    renewed = pki.ca.issue_client("renewed", lifetime=dt.timedelta(days=30))
    staged = tmp_path / "staged.pem"  # written beside it and renamed, as cert-manager does
    staged.write_bytes(renewed.cert.read_bytes())
    staged.rename(cert)
    after = dict((kind, at) for kind, _, at in expiry.samples())
    assert after["nats_cert"] == not_after(renewed.cert.read_bytes())
    assert after["nats_cert"] - before["nats_cert"] > 29 * 86400
    assert after["nats_ca"] == before["nats_ca"]


def test_a_file_rewritten_in_place_with_the_same_size_is_read_again(
    pki: Pki, tmp_path: Path
) -> None:
    cert, _, settings = nats_files(pki, tmp_path, dt.timedelta(hours=2))
    expiry = NatsTlsExpiry(settings)
    (before, _) = expiry.samples()
    for _ in range(50):  # an ECDSA signature's length varies by a byte or two
        other = pki.ca.issue_client("renewed", lifetime=dt.timedelta(hours=5)).cert.read_bytes()
        chain = other + pki.ca.cert.read_bytes()
        if len(chain) == cert.stat().st_size:
            break
    assert len(chain) == cert.stat().st_size
    stamp = cert.stat()
    cert.write_bytes(chain)
    os.utime(cert, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even with its old mtime
    (after, _) = expiry.samples()
    assert after[2] == not_after(other) != before[2]


def test_files_that_cannot_be_read_are_left_out_and_come_back(pki: Pki, tmp_path: Path) -> None:
    cert, ca, settings = nats_files(pki, tmp_path, dt.timedelta(hours=2))
    good = cert.read_bytes()
    expiry = NatsTlsExpiry(settings)
    cert.write_text("half a certificate, written before the rest")
    assert [kind for kind, _, _ in expiry.samples()] == ["nats_ca"]
    cert.unlink()
    os.mkfifo(cert)  # reading a FIFO would hang the scrape: not read at all
    assert [kind for kind, _, _ in expiry.samples()] == ["nats_ca"]
    cert.unlink()
    cert.write_bytes(good)
    assert [kind for kind, _, _ in expiry.samples()] == ["nats_cert", "nats_ca"]
    ca.unlink()
    assert [kind for kind, _, _ in expiry.samples()] == ["nats_cert"]


def test_scrapes_at_once_from_several_threads_agree(pki: Pki, tmp_path: Path) -> None:
    cert, _, settings = nats_files(pki, tmp_path, dt.timedelta(hours=2))
    expiry = NatsTlsExpiry(settings)
    seen: list[list[tuple[str, str, float]]] = []
    threads = [threading.Thread(target=lambda: seen.append(expiry.samples())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8
    assert all(s == seen[0] for s in seen)
    assert seen[0][0][2] == not_after(cert.read_bytes())


def scraped(url: str) -> dict[tuple[str, str], float]:
    families = text_string_to_metric_families(httpx.get(url).text)
    return {
        (s.labels["file"], s.labels["path"]): s.value
        for f in families
        if f.name == "broker_tls_expiry_timestamp_seconds"
        for s in f.samples
    }


def test_a_standalone_metrics_port_reports_the_nats_files(pki: Pki, tmp_path: Path) -> None:
    cert, ca, settings = nats_files(pki, tmp_path, dt.timedelta(hours=2))
    with_tls = serve_metrics("127.0.0.1", 0, nats_tls=NatsTlsExpiry(settings))
    without = serve_metrics("127.0.0.1", 0, nats_tls=NatsTlsExpiry(Settings()))
    try:
        url = f"http://127.0.0.1:{with_tls.server_address[1]}/metrics"
        assert scraped(url) == {
            ("nats_cert", str(cert)): not_after(cert.read_bytes()),
            ("nats_ca", str(ca)): not_after(ca.read_bytes()),
        }
        renewed = pki.ca.issue_client("renewed", lifetime=dt.timedelta(days=9))
        cert.write_bytes(renewed.cert.read_bytes())
        assert scraped(url)[("nats_cert", str(cert))] == not_after(renewed.cert.read_bytes())
        assert scraped(f"http://127.0.0.1:{without.server_address[1]}/metrics") == {}
    finally:
        for server in (with_tls, without):
            server.shutdown()
            server.server_close()


def test_broker_worker_and_router_metrics_ports_report_the_nats_files(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--metrics-port`` of ``broker worker`` and ``broker router`` (``start_metrics``)
    takes the NATS files from the process's settings."""
    from broker.cli_projections import start_metrics
    from broker.settings import get_settings

    cert, ca, settings = nats_files(pki, tmp_path, dt.timedelta(hours=2))
    monkeypatch.setenv("BROKER_NATS_TLS_CERT", str(cert))
    monkeypatch.setenv("BROKER_NATS_TLS_CA", str(ca))
    monkeypatch.setenv("BROKER_NATS_TLS_KEY", str(settings.nats_tls_key))
    get_settings.cache_clear()
    try:
        server = start_metrics("127.0.0.1", free_port())
    finally:
        get_settings.cache_clear()
    assert server is not None
    try:
        reported = scraped(f"http://127.0.0.1:{server.server_address[1]}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert set(reported) == {("nats_cert", str(cert)), ("nats_ca", str(ca))}
