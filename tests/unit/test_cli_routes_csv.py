"""``broker routes simulate --csv PATH`` checks PATH before it replays the decisions (which
can take minutes): a missing folder or a directory is a usage error at once, not a traceback
after the work is done."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app

pytestmark = pytest.mark.unit

#: Nothing listens on port 1: a command that got as far as NATS would exit 3.
CLOSED = "nats://127.0.0.1:1"


@pytest.mark.parametrize("where", ["missing/decisions.csv", "."], ids=["missing-dir", "a-dir"])
def test_an_unwritable_csv_path_is_a_usage_error_before_the_replay(
    tmp_path: Path, where: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: csv-1\n")
    args = ["routes", "simulate", "--policy", str(policy), "--nats-url", CLOSED]
    result = CliRunner().invoke(app, [*args, "--csv", str(tmp_path / where)])
    assert result.exit_code == 2, result.output
    assert "--csv" in result.output
    assert "cannot reach NATS" not in result.output
    assert not (tmp_path / "missing").exists()
