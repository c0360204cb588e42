"""SIGHUP to ``broker serve``: a reload while its terminal is there (or it has none), a stop
when its terminal closed. ``broker serve`` runs here with a pseudo-terminal as its
controlling terminal, as in a shell; closing the terminal's side makes the kernel hang it up
and send SIGHUP, as closing a terminal window does."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from broker.embedded import NatsServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


class Terminal:
    """A pseudo-terminal; what the program writes to it is kept in ``output``."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.output = bytearray()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Never blocked in read(): a close() from another thread would then not release the
        # terminal (the read holds it) until something was written, and nothing hangs up.
        while not self._closing.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                self.output += chunk

    def wait_for(self, text: bytes, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while text not in self.output:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def close(self) -> None:
        """As a terminal window closing: the kernel hangs up the terminal's other side."""
        self._closing.set()
        self._reader.join()
        os.close(self.master)


def start_in(terminal: Terminal, nats: NatsServer, tmp_path: Path) -> subprocess.Popen[bytes]:
    def controlling_terminal() -> None:  # in the child: a session whose terminal this is
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    args = ["--port", str(free_port()), "--nats-url", nats.url, "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", *args, "--projection-workers", "0"],
        stdin=terminal.slave,
        stdout=terminal.slave,
        stderr=terminal.slave,
        env=env | {"BROKER_LOG_FORMAT": "json"},
        start_new_session=True,
        preexec_fn=controlling_terminal,  # noqa: PLW1509 - nothing threaded runs before it
    )


def test_sighup_reloads_and_a_closed_terminal_stops_the_broker(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    terminal = Terminal()
    broker = start_in(terminal, nats_server, tmp_path)
    try:
        assert terminal.wait_for(b"broker ready on", 60), terminal.output[-3000:]
        broker.send_signal(signal.SIGHUP)  # the terminal is there: a reload
        assert terminal.wait_for(b'"event": "reload"', 10), terminal.output[-3000:]
        assert b'"children": ["router-0"]' in terminal.output  # no TLS: not the ingress
        time.sleep(1)
        assert broker.poll() is None

        terminal.close()
        code = broker.wait(40)
        assert code == 0  # stopped as on SIGTERM; SIGHUP's default ended it with -1
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
        os.close(terminal.slave)
