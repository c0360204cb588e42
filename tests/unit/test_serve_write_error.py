"""broker serve restarts an embedded nats-server whose stream hit a write error (a full
disk) once the disk has room again: nats-server itself never clears the error."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from broker import server

pytestmark = pytest.mark.unit

Usage = namedtuple("Usage", "total used free")


class FakeServer:
    def __init__(self, error: str | None) -> None:
        self.error = error
        self.restarts = 0
        self.pid = 1
        self.url = "nats://127.0.0.1:1"
        self.spec = type("Spec", (), {"store_dir": Path("/")})()

    def write_error(self) -> str | None:
        return self.error

    def restart(self, **_: Any) -> None:
        self.restarts += 1
        self.error = None


@pytest.mark.parametrize(("free", "restarted"), [(10, 0), (1 << 40, 1)])
def test_a_write_error_restarts_the_server_once_the_disk_has_room(
    monkeypatch: pytest.MonkeyPatch, free: int, restarted: int
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(0, 0, free))
    nats = FakeServer("JetStream stream '$G > MESSAGES' write error: no space left on device")
    assert server._WriteErrors().check(nats) is None  # type: ignore[arg-type]
    assert nats.restarts == restarted


def test_a_healthy_server_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(0, 0, 1 << 40))
    nats = FakeServer(None)
    server._WriteErrors().check(nats)  # type: ignore[arg-type]
    assert nats.restarts == 0
