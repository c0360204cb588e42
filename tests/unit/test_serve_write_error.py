"""broker serve restarts an embedded nats-server whose stream hit the write error of a full
disk once the disk has room again (nats-server itself never clears the error), and backs off
while the error keeps coming back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from broker import server

pytestmark = pytest.mark.unit

FULL = "JetStream stream '$G > MESSAGES' write error: write x/1.blk: no space left on device"


class Room:
    """What ``os.statvfs`` says of the store's file system."""

    def __init__(self, free_bytes: int, free_inodes: int = 1 << 20) -> None:
        self.f_frsize, self.f_bavail, self.f_favail = 4096, free_bytes // 4096, free_inodes


class FakeServer:
    def __init__(self, error: str | None, *, comes_back: bool = False) -> None:
        self.error, self.comes_back = error, comes_back
        self.restarts = 0
        self.pid = 1
        self.url = "nats://127.0.0.1:1"
        self.spec = type("Spec", (), {"store_dir": Path("/")})()

    def write_error(self) -> str | None:
        return self.error

    def restart(self, **_: Any) -> None:
        self.restarts += 1
        if not self.comes_back:
            self.error = None


def room(monkeypatch: pytest.MonkeyPatch, free_bytes: int, free_inodes: int = 1 << 20) -> None:
    monkeypatch.setattr(os, "statvfs", lambda _: Room(free_bytes, free_inodes))


@pytest.mark.parametrize(
    ("free_bytes", "free_inodes", "restarted"),
    [(10, 1 << 20, 0), (1 << 40, 10, 0), (1 << 40, 1 << 20, 1)],
)
def test_a_write_error_restarts_the_server_once_the_disk_has_room(
    monkeypatch: pytest.MonkeyPatch, free_bytes: int, free_inodes: int, restarted: int
) -> None:
    room(monkeypatch, free_bytes, free_inodes)
    nats = FakeServer(FULL)
    assert server._WriteErrors().check(nats) is None  # type: ignore[arg-type]
    assert nats.restarts == restarted


def test_a_write_error_that_keeps_coming_back_is_restarted_ever_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error that returns after each restart (bytes free, the disk failing) restarted the
    server at every check, every 5 s, each restart dropping every client's connection."""
    room(monkeypatch, 1 << 40)
    nats = FakeServer(FULL, comes_back=True)
    watch = server._WriteErrors()
    clock = [1000.0]
    monkeypatch.setattr(server.time, "monotonic", lambda: clock[0])  # type: ignore[attr-defined]
    restarted_at = []
    for _ in range(200):  # 1000 s of checks, one every 5 s
        before = nats.restarts
        watch.check(nats)  # type: ignore[arg-type]
        if nats.restarts > before:
            restarted_at.append(clock[0] - 1000.0)
        clock[0] += 5.0
    assert restarted_at[:5] == [0.0, 10.0, 30.0, 70.0, 150.0], restarted_at
    assert len(restarted_at) < 10


def test_a_healthy_server_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    room(monkeypatch, 1 << 40)
    nats = FakeServer(None)
    server._WriteErrors().check(nats)  # type: ignore[arg-type]
    assert nats.restarts == 0
