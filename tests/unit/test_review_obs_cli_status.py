"""``broker status --watch`` with its output not on a terminal (``| tee``, a file, a log
collector): each refresh is written as it is read, not kept in a screen nobody sees."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from broker import cli_status
from broker.cli import app

pytestmark = pytest.mark.unit


def document(n: int) -> dict[str, Any]:
    """A status document whose stream holds ``n`` messages (the refresh's number)."""
    return {
        "generated_at": f"2024-05-01T12:00:0{n}Z",
        "broker": {"version": "1.0", "git_revision": "abc", "tenant": "default"},
        "streams": [
            {
                "name": "MESSAGES",
                "messages": 1000 + n,
                "bytes": 10,
                "first_seq": 1,
                "last_seq": 1000 + n,
                "consumers": 0,
            }
        ],
        "consumers": [],
        "agents": [],
        "routes": [],
        "dlq": [],
    }


def watched(monkeypatch: pytest.MonkeyPatch, refreshes: int, fail_at: int | None = None) -> Any:
    """``broker status --watch`` through ``refreshes`` reads, then Ctrl-C; the read number
    ``fail_at`` finds the broker unreachable."""
    reads: list[int] = []

    def read(url: str, recent: int) -> dict[str, Any]:
        reads.append(len(reads) + 1)
        if len(reads) == fail_at:
            raise cli_status._NoStatus("cannot reach the broker", 3)
        return document(len(reads))

    def sleep(seconds: float) -> None:
        if len(reads) >= refreshes:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_status, "_read", read)
    monkeypatch.setattr("broker.cli_status.time.sleep", sleep)
    return CliRunner().invoke(app, ["status", "--watch"], env={"COLUMNS": "200"})


def test_watch_not_on_a_terminal_writes_every_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch drew into a full-screen display that a pipe never shows: nothing at all
    was written, not even after Ctrl-C."""
    result = watched(monkeypatch, refreshes=3)

    assert result.exit_code == 130, result.output
    for n in (1, 2, 3):
        assert f"1,00{n}" in result.stdout, result.stdout
    assert result.stdout.count("streams") == 3
    assert "\x1b[?1049h" not in result.stdout  # no switch to the terminal's other screen


def test_watch_not_on_a_terminal_says_when_a_refresh_failed_and_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = watched(monkeypatch, refreshes=3, fail_at=2)

    assert result.exit_code == 130, result.output
    assert "1,001" in result.stdout
    assert "1,003" in result.stdout
    assert "cannot reach the broker (retrying every 2 s)" in result.stderr
