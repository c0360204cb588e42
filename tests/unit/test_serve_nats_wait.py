"""broker serve waits a bounded time for NATS at start, then fails with a message that
names the servers (credentials hidden), instead of retrying silently for ever."""

from __future__ import annotations

import socket
import time

import pytest
import structlog
import structlog.testing

from broker import server
from broker.natsconn import NatsConnectFailed
from broker.server import provision_streams
from broker.settings import Settings

pytestmark = pytest.mark.unit


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_provisioning_gives_up_on_a_nats_that_never_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The warnings go to a logger of the test's own: the process's may write to a stream
    # an earlier test's capture has closed.
    capturing = structlog.testing.CapturingLogger()
    monkeypatch.setattr(server, "log", structlog.wrap_logger(capturing))
    settings = Settings(nats_url=f"nats://svc:hunter2@127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    with pytest.raises(NatsConnectFailed) as caught:
        await provision_streams(settings, wait=1.5)
    assert time.monotonic() - started < 10  # it used to retry every 2 s without end
    assert "within 1.5 s" in caught.value.message
    assert "hunter2" not in caught.value.message
    assert "127.0.0.1" in caught.value.message
    assert capturing.calls
    assert all(call.method_name == "warning" for call in capturing.calls)
