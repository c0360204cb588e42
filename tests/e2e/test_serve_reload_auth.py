"""SIGHUP to ``broker serve`` reads the auth file again: a revoked API key is refused and a
new one admitted without a restart, and a file that would not load is refused with the
reason in the log while the ingress keeps the keys it had."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.embedded import NatsServer
from tests.e2e._broker import BrokerProcess, start_broker, within

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"


def auth_file(path: Path, *keys: str) -> None:
    entries = "".join(
        f"  - id: {key.split('-')[0]}\n"
        f"    sha256: {hashlib.sha256(key.encode()).hexdigest()}\n"
        "    tenant: shop\n"
        "    scopes: [publish]\n"
        for key in keys
    )
    path.write_text("api_keys:\n" + entries)


@pytest.fixture
def auth(tmp_path: Path) -> Path:
    path = tmp_path / "auth.yaml"
    auth_file(path, ALICE)
    return path


@pytest.fixture
def broker(nats_server: NatsServer, auth: Path, tmp_path: Path) -> Iterator[BrokerProcess]:
    args = ("--auth-file", str(auth), "--projection-workers", "0", "--routers", "0")
    process = start_broker(tmp_path / "broker", nats_url=nats_server.url, args=args)
    try:
        yield process
    finally:
        process.stop()


def status(broker: BrokerProcess, key: str) -> int | None:
    """The answer to a publish with ``key`` (``None``: none, while a worker restarts)."""
    try:
        with httpx.Client(http2=True, http1=False, timeout=5) as client:
            response = client.post(
                f"{broker.base_url}/v1/publish/orders.created",
                content=b"{}",
                headers={"content-type": "application/json", "x-api-key": key},
            )
    except httpx.TransportError:
        return None
    return response.status_code


def test_sighup_revokes_and_admits_api_keys(broker: BrokerProcess, auth: Path) -> None:
    assert status(broker, ALICE) == 200
    assert status(broker, BOB) == 401

    auth_file(auth, BOB)  # alice's key revoked, bob's added
    replaced = broker.old_workers_stopped()
    broker.proc.send_signal(signal.SIGHUP)
    # Until the old worker stops, it serves with the old keys beside its successor.
    assert within(30, lambda: broker.old_workers_stopped() > replaced), broker.log_tail()
    assert status(broker, ALICE) == 401
    assert status(broker, BOB) == 200
    assert '"children": ["ingress"], "event": "reload"' in broker.log_path.read_text()

    broken = "api_keys:\n  - id: broken\n    tenant: shop\n    scopes: [publish]\n"
    auth.write_text(broken)  # neither sha256 nor key_env
    broker.proc.send_signal(signal.SIGHUP)
    assert within(10, lambda: "reload_refused" in broker.log_path.read_text())
    log = broker.log_path.read_text().splitlines()
    refused = [line for line in log if "reload_refused" in line]
    assert "[redacted]" not in refused[-1], refused[-1]
    assert "give exactly one of sha256 and key_env" in refused[-1], refused[-1]
    time.sleep(2)  # had the ingress been reloaded, its workers would be starting now
    assert broker.proc.poll() is None
    assert status(broker, BOB) == 200
    assert status(broker, ALICE) == 401
