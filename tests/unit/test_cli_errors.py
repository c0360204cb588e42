"""The CLI answers bad input and an unreachable broker with a message and its documented
exit code (2 usage, 3 unavailable), not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app

pytestmark = pytest.mark.unit


def test_cli_errors_are_messages_and_exit_codes_not_tracebacks(tmp_path: Path) -> None:
    runner = CliRunner()
    unreachable = ["--url", "http://127.0.0.1:1"]
    for args, code in (
        (["agents", "list", *unreachable], 3),
        (["agents", "get", "x", *unreachable], 3),
        (["publish", "a.b", str(tmp_path / "missing.json")], 2),
        (["replay", "MESSAGES", "--to", str(tmp_path / "nodir" / "out.ndjson")], 2),
        (["replay", "MESSAGES", "--since", "2026-11-26 22:13:00", *unreachable], 2),
        (["agents", "import-a2a", __file__, "-o", str(tmp_path / "nodir" / "m.yaml")], 2),
        # an -o the command does not print is a usage error, not its default printed
        (["agents", "get", "x", "-o", "table", *unreachable], 2),
        (["agents", "list", "-o", "yaml", *unreachable], 2),
        (["agents", "history", "x", "-o", "bogus", *unreachable], 2),
        (["agents", "get", "x", "-o", "yaml", *unreachable], 3),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert not isinstance(result.exception, OSError | TypeError), args


def test_the_client_maps_every_error_code_whatever_was_imported() -> None:
    """In a fresh interpreter that imported only the client, a stale If-Match used to come
    back as a plain Conflict, not VersionConflict."""
    import subprocess
    import sys

    code = (
        "import httpx\n"
        "from broker.client import _error\n"
        "answer = {'error_code': 'version_conflict', 'message': 'm'}\n"
        "print(type(_error(httpx.Response(409, json=answer))).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.stdout.strip() == b"VersionConflict", done.stderr


def test_an_unknown_log_setting_is_said_not_silently_replaced() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "BROKER_LOG_LEVEL": "bogus", "BROKER_LOG_FORMAT": "weird"}
    code = "from broker.logs import configure_logging; configure_logging()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env)
    assert done.stderr.count(b"log_setting_unknown") == 2, done.stderr
