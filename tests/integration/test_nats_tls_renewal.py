"""A NATS client certificate renewed on disk (cert-manager, a cron job) is used from the next
connection on: the client's TLS context reads its files again for a new connection once they
changed (``RenewingContext``). Before, a process kept the certificate it started with, and
once that expired every reconnect was refused until someone restarted it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import uvloop
from pydantic import SecretStr

from broker.embedded import NatsServer, ServerSpec
from broker.natsconn import RECONNECT_FOREVER, TlsFiles, connect_options, open_client
from broker.settings import Settings
from tests._certs import Issued, Pki, make_pki, secure_nats_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PASSWORD = "renewal"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def secure_nats(pki: Pki, tmp_path: Path) -> Iterator[NatsServer]:
    spec = ServerSpec(store_dir=tmp_path / "nats", extra_config=secure_nats_config(pki, PASSWORD))
    server = NatsServer(spec).start()
    yield server
    server.stop()


def install(issued: Issued, cert: Path, key: Path) -> None:
    """Put ``issued`` where the client reads its certificate, as a renewal does."""
    key.write_bytes(issued.key.read_bytes())
    cert.write_bytes(issued.cert.read_bytes())


def presented(server: NatsServer, name: str) -> str | None:
    """The subject of the certificate the connection ``name`` presented, if it is there."""
    with urllib.request.urlopen(f"{server.monitor_url}/connz?auth=true", timeout=5) as r:
        for connection in json.load(r)["connections"] or []:
            if connection.get("name") == name:
                subject: str = connection["tls_peer_certs"][0]["subject"]
                return subject
    return None


async def subject_becomes(server: NatsServer, name: str, subject: str) -> bool:
    for _ in range(100):
        if await asyncio.to_thread(presented, server, name) == subject:
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # the ingress workers run uvloop
def test_a_renewed_client_certificate_is_presented_at_the_next_connection(
    pki: Pki, secure_nats: NatsServer, tmp_path: Path, loop: str
) -> None:
    renewal = renews(pki, secure_nats, tmp_path)
    if loop == "uvloop":
        uvloop.run(renewal)
    else:
        asyncio.run(renewal)


async def renews(pki: Pki, secure_nats: NatsServer, tmp_path: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    install(pki.ca.issue_client("agent-v1"), cert, key)
    settings = Settings(
        nats_url=secure_nats.url,
        nats_tls_ca=pki.ca.cert,
        nats_tls_cert=cert,
        nats_tls_key=key,
        nats_user="broker",
        nats_password=SecretStr(PASSWORD),
    )
    nc = await open_client(**connect_options(settings, name="renewing"), **RECONNECT_FOREVER)
    try:
        assert await subject_becomes(secure_nats, "renewing", "CN=agent-v1")

        install(pki.ca.issue_client("agent-v2"), cert, key)
        with structlog.testing.capture_logs() as logs:
            secure_nats.restart()  # the client reconnects: a new TLS connection
            assert await subject_becomes(secure_nats, "renewing", "CN=agent-v2")
        assert [line["event"] for line in logs if "tls" in line["event"]] == [
            "nats_tls_files_reloaded"
        ]

        # Half a renewal (a new certificate, the old key): refused, the last good pair kept.
        cert.write_bytes(pki.ca.issue_client("agent-v3").cert.read_bytes())
        with structlog.testing.capture_logs() as logs:
            secure_nats.restart()
            assert await subject_becomes(secure_nats, "renewing", "CN=agent-v2")
        (refused,) = [line for line in logs if line["event"] == "nats_tls_files_not_reloaded"]
        assert "do not load as a PEM certificate and its private key" in refused["error"]
        for _ in range(100):  # the server lists the connection before the client's handshake ends
            if nc.is_connected:
                break
            await asyncio.sleep(0.05)
        assert nc.is_connected
    finally:
        await nc.close()


def test_a_chmod_alone_counts_as_a_change(tmp_path: Path) -> None:
    """A renewal that wrote the key unreadable and then fixed its mode: only the change time
    moves, and the failed reload must be tried again."""
    key = tmp_path / "key.pem"
    key.write_text("key")
    files = TlsFiles(None, None, key)
    before = files.stamp()
    key.chmod(0o600)
    assert files.stamp() != before
