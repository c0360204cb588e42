"""``broker serve`` refuses auth settings it cannot run with as a usage error (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_a_reserved_broker_tenant_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    """``BROKER_TENANT=messages`` used to crash ``broker serve`` with a ValueError
    traceback (exit 1) where other auth settings get a clean refusal."""
    env = {**os.environ, "BROKER_TENANT": "messages"}
    env.pop("BROKER_AUTH_FILE", None)
    env.pop("BROKER_AUTH_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--data-dir", str(tmp_path)],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert b"BROKER_TENANT" in done.stderr
    assert b"reserved" in done.stderr
    assert b"Traceback" not in done.stderr
    assert b"auth-file" not in done.stderr  # named as the setting it is
    assert list(tmp_path.iterdir()) == []  # refused before anything started
