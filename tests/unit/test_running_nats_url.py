"""Which NATS the commands run beside a broker read: the one the broker holding the data
dir embeds, never a URL a broker that stopped (or was killed) left behind."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from broker.server import NATS_URL_FILE, lock_data_dir, running_nats_url

pytestmark = pytest.mark.unit
URL = "nats://127.0.0.1:40123"


def test_a_running_brokers_nats_is_found(tmp_path: Path) -> None:
    lock = lock_data_dir(tmp_path)
    assert isinstance(lock, int)
    try:
        (tmp_path / NATS_URL_FILE).write_text(URL + "\n")
        assert running_nats_url(tmp_path) == URL
        assert running_nats_url(tmp_path) == URL  # the check leaves the lock as it was
        assert isinstance(lock_data_dir(tmp_path), str)  # still held: a second broker refused
    finally:
        os.close(lock)


def test_what_a_stopped_broker_left_is_not_read(tmp_path: Path) -> None:
    lock = lock_data_dir(tmp_path)
    assert isinstance(lock, int)
    (tmp_path / NATS_URL_FILE).write_text(URL + "\n")
    os.close(lock)  # as the kernel does when the broker is SIGKILLed
    assert running_nats_url(tmp_path) is None


def test_no_data_dir_no_file_or_an_empty_one_is_nothing(tmp_path: Path) -> None:
    assert running_nats_url(tmp_path / "missing") is None
    lock = lock_data_dir(tmp_path)
    assert isinstance(lock, int)
    try:
        assert running_nats_url(tmp_path) is None  # a broker given --nats-url writes none
        (tmp_path / NATS_URL_FILE).write_text("\n")
        assert running_nats_url(tmp_path) is None
    finally:
        os.close(lock)


def test_a_broker_starting_while_a_command_looks_is_not_refused(tmp_path: Path) -> None:
    """A command beside the broker holds a shared lock on the data dir for a moment (in
    :func:`running_nats_url`); a broker that starts in that moment waits it out rather than
    reporting another broker running there."""
    (tmp_path / "broker.lock").write_text("")
    reader = os.open(tmp_path / "broker.lock", os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.1, os.close, (reader,)).start()  # the command lets go
    lock = lock_data_dir(tmp_path)
    assert isinstance(lock, int), lock
    os.close(lock)
