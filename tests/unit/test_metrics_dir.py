"""Where ``broker serve``'s processes keep their memory-mapped metrics files."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from broker.server import default_metrics_dir

pytestmark = pytest.mark.unit

Usage = namedtuple("Usage", "total used free")


def test_in_dev_shm_one_directory_per_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not os.access("/dev/shm", os.W_OK):
        pytest.fail("this machine has no writable /dev/shm: the test cannot see the choice")
    one, other = tmp_path / "one", tmp_path / "other"
    assert default_metrics_dir(one).parent == Path("/dev/shm")
    assert default_metrics_dir(one) != default_metrics_dir(other)
    monkeypatch.chdir(tmp_path)
    assert default_metrics_dir(Path("one")) == default_metrics_dir(one)  # relative or not


def test_in_the_data_dir_without_a_writable_dev_shm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    assert default_metrics_dir(tmp_path) == tmp_path / "metrics"


def test_in_the_data_dir_when_dev_shm_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full /dev/shm kills a process with SIGBUS as a full disk does."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(64 << 20, 60 << 20, 4 << 20))
    assert default_metrics_dir(tmp_path) == tmp_path / "metrics"
