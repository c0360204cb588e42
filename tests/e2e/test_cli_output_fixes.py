"""``broker replay`` and ``broker publish`` on their output, as a user runs them: a replay
whose output cannot be written (a full disk) says so and exits 1, not with a traceback, and
``broker publish -o`` takes json or table only, refused before anything is published."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e._broker import BrokerProcess

pytestmark = pytest.mark.e2e

FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk


def cli(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )


@pytest.fixture(scope="module")
def published(broker: BrokerProcess) -> str:
    with httpx.Client(base_url=broker.base_url, http1=False, http2=True, timeout=15) as client:
        for n in range(3):
            answer = client.post(
                "/v1/publish/cliout.full",
                content=b"x%d" % n,
                headers={"content-type": "text/plain"},
            )
            assert answer.status_code < 300, answer.text
    return "cliout.full"


@pytest.mark.skipif(not FULL.exists(), reason="no /dev/full")
@pytest.mark.parametrize("where", ["--to", "stdout"])
def test_replay_whose_output_cannot_be_written_says_so_and_exits_1(
    broker: BrokerProcess, published: str, where: str
) -> None:
    args = ["replay", "MESSAGES", "--subject", published, "--url", broker.base_url]
    if where == "--to":
        replayed = cli(*args, "--to", str(FULL))
    else:
        with FULL.open("wb") as full:
            replayed = cli(*args, stdout=full.fileno())
    assert replayed.returncode == 1, replayed.stderr
    assert "Traceback" not in replayed.stderr
    assert "cannot write" in replayed.stderr
    assert "No space left on device" in replayed.stderr


def test_publish_output_other_than_json_or_table_is_a_usage_error(tmp_path: Path) -> None:
    payload = tmp_path / "payload.txt"
    payload.write_text("hello")
    # Nothing listens on port 1: a publish that got as far as sending would exit 3.
    published = cli("publish", "a.b", str(payload), "-o", "yaml", "--url", "http://127.0.0.1:1")
    assert published.returncode == 2, published.stderr
    assert "--output" in published.stderr
    assert published.stdout == ""


def test_replay_from_a_seq_and_a_time_is_a_usage_error() -> None:
    """The client reads from the sequence and dropped --since without a word."""
    since = "2026-11-25T10:00:00Z"
    replayed = cli("replay", "--from-seq", "5", "--since", since, "--url", "http://127.0.0.1:1")
    assert replayed.returncode == 2, replayed.stderr
    assert "--since" in replayed.stderr
