"""One-shot commands that talk to NATS directly (``dlq``, ``projections status``,
``routes simulate``) answer an unreachable NATS within seconds with one line naming it
(credentials hidden) and exit 3: not two minutes of retries with a traceback per attempt."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

#: Nothing listens on port 1; the password must not be printed.
CLOSED = "nats://operator:s3cr3tPw@127.0.0.1:1"


@pytest.mark.parametrize(
    "args",
    [
        ("dlq", "list"),
        ("dlq", "replay", "3"),
        ("projections", "status"),
        ("routes", "simulate", "--policy", "{policy}"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_unreachable_nats_is_one_error_line_and_exit_3(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: unreachable-1\n")
    command = [a.format(policy=policy) for a in args]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "broker", *command, "--nats-url", CLOSED],
        capture_output=True,
        text=True,
        timeout=60,  # without the fix: about two minutes of retries
        cwd=tmp_path,  # projections status makes its default replica under ./.broker
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 3, output
    assert "Traceback" not in output
    assert "s3cr3tPw" not in output
    assert done.stderr.startswith("error: cannot reach NATS at nats://***@127.0.0.1:1: "), output
    assert done.stdout == ""
    assert elapsed < 20, elapsed
