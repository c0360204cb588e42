"""A max age shorter than the duplicate window is refused at start, by the settings' names:
JetStream refused the stream with error 10052, which names neither."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.settings import Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"messages_max_age_seconds": 60}, "messages_max_age_seconds (60 s)"),
        ({"routes_max_age_seconds": 30}, "routes_max_age_seconds (30 s)"),
        ({"dlq_max_age_seconds": 119.5}, "dlq_max_age_seconds (119.5 s)"),
        (
            {"messages_max_age_seconds": 3600, "duplicate_window_seconds": 7200},
            "duplicate_window_seconds (7200 s)",
        ),
    ],
)
def test_a_max_age_shorter_than_the_window_is_refused(values: dict[str, float], named: str) -> None:
    with pytest.raises(ValidationError, match=r"shorter than duplicate_window_seconds") as e:
        Settings(**values)  # type: ignore[arg-type]
    assert named in str(e.value)


@pytest.mark.parametrize(
    "values",
    [
        {},  # kept for ever
        {"messages_max_age_seconds": 120},
        {"messages_max_age_seconds": 60, "duplicate_window_seconds": 60},
        {"messages_max_age_seconds": 3600, "routes_max_age_seconds": 0},  # ROUTES for ever
    ],
)
def test_max_ages_at_least_the_window_are_taken(values: dict[str, float]) -> None:
    Settings(**values)  # type: ignore[arg-type]


def test_the_cli_names_the_settings_and_exits_2(tmp_path: Path) -> None:
    """Before anything starts (no NATS, no port taken)."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--data-dir", str(tmp_path)],
        env={"BROKER_MESSAGES_MAX_AGE_SECONDS": "60", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: messages_max_age_seconds (60 s) is shorter"), done.stderr
