"""SIGHUP to ``broker serve``: a reload while its terminal is there (or it has none), a stop
when its terminal closed. ``broker serve`` runs here with a pseudo-terminal as its
controlling terminal, as in a shell; closing the terminal's side makes the kernel hang it up
and send SIGHUP, as closing a terminal window does."""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.embedded import NatsServer, free_port
from broker.server import LOCK_FILE, _Terminal
from tests.e2e._broker import start_broker

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


def start_in(
    terminal: Terminal, nats: NatsServer, tmp_path: Path, *, controlling: bool = True
) -> subprocess.Popen[bytes]:
    """``broker serve`` writing to ``terminal``; ``controlling=False``: the terminal is not
    its session's (as a ``disown``ed job: its hang-up sends it no SIGHUP)."""

    def controlling_terminal() -> None:  # in the child: a session whose terminal this is
        if controlling:
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


@contextlib.contextmanager
def serving_in(
    nats: NatsServer, data_dir: Path, *, controlling: bool = True
) -> Iterator[tuple[Terminal, subprocess.Popen[bytes]]]:
    """``broker serve`` in a new terminal (:func:`start_in`); killed if the block leaves it
    running."""
    terminal = Terminal()
    broker = start_in(terminal, nats, data_dir, controlling=controlling)
    try:
        yield terminal, broker
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
        os.close(terminal.slave)


def test_sighup_reloads_and_a_closed_terminal_stops_the_broker(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with serving_in(nats_server, tmp_path) as (terminal, broker):
        assert terminal.wait_for(b"broker ready on", 60), terminal.output[-3000:]
        broker.send_signal(signal.SIGHUP)  # the terminal is there: a reload
        assert terminal.wait_for(b'"event": "reload"', 10), terminal.output[-3000:]
        assert b'"children": ["router-0"]' in terminal.output  # no TLS: not the ingress
        time.sleep(1)
        assert broker.poll() is None

        terminal.close()
        code = broker.wait(40)
        assert code == 0  # stopped as on SIGTERM; SIGHUP's default ended it with -1


def test_sighups_while_the_broker_starts_neither_end_it_nor_its_children(
    tmp_path: Path,
) -> None:
    """SIGHUP's default action ended a ``broker serve`` still starting its embedded NATS (a
    ``systemctl reload`` right after a restart), and a child still importing when a reload's
    SIGHUP reached it. Here SIGHUP comes every 0.3 s from the moment the broker holds its
    data dir, before it starts NATS (the CLI's imports before that: the test below)."""
    broker = start_broker(tmp_path, args=("--projection-workers", "0"), wait=False)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "data" / LOCK_FILE).exists():
            assert broker.proc.poll() is None, broker.log_tail()
            assert time.monotonic() < deadline, "the broker never took its data dir"
            time.sleep(0.01)
        ready = False
        with httpx.Client(http2=True, http1=False, timeout=1) as client:
            while time.monotonic() < deadline and not ready:
                broker.proc.send_signal(signal.SIGHUP)
                time.sleep(0.3)
                assert broker.proc.poll() is None, broker.log_tail()
                with contextlib.suppress(httpx.HTTPError):
                    ready = client.get(f"{broker.base_url}/readyz").status_code == 200
        assert ready, broker.log_tail()
        for _ in range(5):  # and once running
            broker.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
        log = broker.log_path.read_text()
        assert broker.proc.poll() is None, log[-3000:]
        assert "child_restarted" not in log, log[-3000:]
        assert '"event": "reload"' in log
    finally:
        assert broker.stop() == 0


def test_a_broker_whose_terminal_closed_long_ago_reloads_on_sighup(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Its terminal gone (not its controlling one, so no SIGHUP came with it), a later
    ``kill -HUP`` is a reload. Its next log line used to fail with EIO on the dead terminal
    and end the broker (exit 1)."""
    with serving_in(nats_server, tmp_path, controlling=False) as (terminal, broker):
        assert terminal.wait_for(b"broker ready on", 60), terminal.output[-3000:]
        terminal.close()
        time.sleep(_Terminal.HANGUP_WINDOW + 1.5)  # past the hang-up window
        assert broker.poll() is None
        broker.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert broker.poll() is None
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(40) == 0


def catches_sighup(pid: int) -> bool:
    """Whether process ``pid`` has a handler of its own for SIGHUP now (``SigCgt``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGHUP - 1) & 1)
    return False


def wait_until_it_catches_sighup(proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not catches_sighup(proc.pid):
        assert proc.poll() is None, "it ended before it caught SIGHUP"
        assert time.monotonic() < deadline, "SIGHUP never caught"
        time.sleep(0.002)


def test_sighup_while_the_cli_loads_neither_ends_the_broker_nor_is_lost(
    tmp_path: Path,
) -> None:
    """While Python imported the CLI (~0.7 s), SIGHUP's default action ended ``broker
    serve``. The entry point now holds it from its first imports: SIGHUPs sent from the moment
    it catches one, through the start, leave it running, and one that came before the broker's
    own handler is said to need nothing (every file is read at start)."""
    broker = start_broker(tmp_path, args=("--projection-workers", "0"), wait=False)
    try:
        wait_until_it_catches_sighup(broker.proc)
        deadline = time.monotonic() + 60
        while not (tmp_path / "data" / LOCK_FILE).exists():
            broker.proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
            assert broker.proc.poll() is None, broker.log_tail()
            assert time.monotonic() < deadline, "the broker never took its data dir"
        broker.wait_ready()
        log = broker.log_path.read_text()
        assert '"event": "reload_before_start"' in log, log[-3000:]
        assert broker.proc.poll() is None
    finally:
        assert broker.stop() == 0


def test_a_terminal_closed_while_the_cli_loads_stops_the_broker_before_it_starts(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The terminal's hang-up during the CLI's imports is a stop, as later: exit 0, before
    the broker takes its data dir or starts anything. (An attempt is made again when this
    test was too slow to close the terminal before the broker got that far.)"""
    for _attempt in range(3):
        data = tmp_path / f"attempt-{_attempt}"
        with serving_in(nats_server, data) as (terminal, broker):
            wait_until_it_catches_sighup(broker)
            started = (data / LOCK_FILE).exists()
            terminal.close()
            assert broker.wait(30) == 0
        if not started:
            assert not (data / LOCK_FILE).exists()  # it stopped before it took its data dir
            return
    pytest.fail("the broker took its data dir before the terminal could be closed, 3 times")
