"""The e2e harness's own start of ``broker serve``: a port taken between its draw and the
broker's bind (another test's process, the suite running in parallel) costs a restart on a
new port, not the test."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.embedded import free_port
from tests.e2e import _broker

pytestmark = pytest.mark.e2e


@pytest.fixture
def squatter() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_broker_whose_port_was_taken_starts_again_on_another(
    tmp_path: Path, nats_url: str, squatter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws = iter([squatter])
    monkeypatch.setattr(_broker, "free_port", lambda: next(draws, None) or free_port())
    broker = _broker.start_broker(tmp_path, nats_url=nats_url)
    try:
        assert broker.port != squatter
        assert broker.proc.poll() is None
        logs = sorted(p.name for p in tmp_path.glob("broker-*.log"))
        assert f"broker-{squatter}.log" in logs  # the first start, which found it taken
        assert "Address already in use" in (tmp_path / f"broker-{squatter}.log").read_text()
    finally:
        broker.stop()


def test_a_port_taken_every_time_fails_with_the_brokers_log(
    tmp_path: Path, nats_url: str, squatter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_broker, "free_port", lambda: squatter)
    with pytest.raises(AssertionError, match="Address already in use"):
        _broker.start_broker(tmp_path, nats_url=nats_url)


def test_a_broker_that_fails_otherwise_is_not_started_again(
    tmp_path: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: list[int] = []

    def counted() -> int:
        starts.append(port := free_port())
        return port

    monkeypatch.setattr(_broker, "free_port", counted)
    with pytest.raises(AssertionError, match="exited"):
        _broker.start_broker(tmp_path, nats_url=nats_url, args=("--workers", "0"))
    assert len(starts) == 1
