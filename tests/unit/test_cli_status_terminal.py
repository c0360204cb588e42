"""What ``broker status`` writes to a terminal: the document's texts (agent names, subjects,
DLQ errors: whatever a publisher wrote) as text, never as escape sequences or rich markup;
``--json`` exactly as the API returned it; and Ctrl-C ending ``--watch`` with exit code 130
in both modes."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from broker import cli_status
from broker.cli import app
from broker.cli_status import printable, render

pytestmark = pytest.mark.unit

#: An OSC that retitles the window (ended by BEL), a screen clear, a C1 CSI, DEL, a bidi
#: override, and rich markup.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x7f\u202e[red]x[/red]"
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x7f\\u202e[red]x[/red]"


def hostile_document() -> dict[str, Any]:
    """A status document with :data:`HOSTILE` in every text a stream or a heartbeat fills."""
    return {
        "generated_at": "2024-05-01T12:00:00Z",
        "broker": {
            "version": "1.0",
            "git_revision": "abc",
            "nats_server_version": "2.10",
            "tenant": HOSTILE,
        },
        "streams": [
            {
                "name": f"S{HOSTILE}",
                "messages": 1,
                "bytes": 10,
                "first_seq": 1,
                "last_seq": 1,
                "consumers": 1,
            }
        ],
        "consumers": [
            {
                "stream": "S",
                "name": f"c{HOSTILE}",
                "kind": "other",
                "lag": 0,
                "ack_pending": 0,
                "redelivered": 0,
            }
        ],
        "consumers_unlisted": {f"U{HOSTILE}": 3},
        "agents": [
            {
                "name": f"agent{HOSTILE}",
                "registered": True,
                "version": HOSTILE,
                "load": {
                    "instances": 1,
                    "in_flight": 0,
                    "qps": 0.0,
                    "p99_ms": 1.0,
                    "error_rate": 0,
                },
            }
        ],
        "routes": [
            {
                "time": "2024-05-01T12:00:00.000Z",
                "subject": f"task.{HOSTILE}",
                "message_seq": 1,
                "agent": f"a{HOSTILE}",
                "reason": HOSTILE,
                "candidates": [{"agent": f"b{HOSTILE}", "score": 0.5}],
                "trace_id": HOSTILE,
            }
        ],
        "dlq": [
            {
                "seq": 1,
                "time": "2024-05-01T12:00:00Z",
                "source": f"router{HOSTILE}",
                "origin_stream": "TASKS",
                "origin_seq": 1,
                "error": f"boom {HOSTILE}",
            }
        ],
    }


def shown(document: dict[str, Any], *, terminal: bool) -> str:
    out = io.StringIO()
    Console(file=out, width=400, force_terminal=terminal).print(render(document))
    return out.getvalue()


def test_printable_escapes_every_control_and_bidi_character() -> None:
    assert printable(HOSTILE) == SHOWN
    assert printable("\t\n\x00\x85\u2066é ✓") == "\\t\\n\\x00\\x85\\u2066é ✓"


def test_the_table_shows_the_documents_control_characters_and_markup_as_text() -> None:
    out = shown(hostile_document(), terminal=False)

    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", out)  # only its newlines
    assert out.count(SHOWN) >= 12  # every cell, the header and the consumers' title
    assert f"3 more on U{SHOWN} not listed" in " ".join(out.split())  # nor a title's


def test_on_a_terminal_only_the_tables_own_styles_are_escape_sequences() -> None:
    out = shown(hostile_document(), terminal=True)

    assert "\x07" not in out
    assert "\x9b" not in out
    assert "\u202e" not in out
    assert "\x1b" not in re.sub("\x1b\\[[0-9;]*m", "", out)  # SGR (colours) and nothing else
    assert "[red]x[/red]" in out


def test_the_command_prints_the_table_without_the_documents_escapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_status, "_read", lambda url, recent: hostile_document())

    result = CliRunner().invoke(app, ["status"], env={"COLUMNS": "400"})

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert "\x07" not in result.output
    assert f"boom {SHOWN}" in result.output


def test_json_stays_the_document_as_the_api_returned_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_status, "_read", lambda url, recent: hostile_document())

    result = CliRunner().invoke(app, ["status", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == hostile_document()


def test_an_error_page_is_printed_without_its_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy's answer is the broker's error message too: it reaches stderr printable."""

    def refused(url: str, recent: int) -> dict[str, Any]:
        raise cli_status._NoStatus(f"<html>{HOSTILE}</html>", 1)

    monkeypatch.setattr(cli_status, "_read", refused)

    result = CliRunner().invoke(app, ["status"])

    assert result.exit_code == 1
    assert result.stderr.strip() == f"<html>{SHOWN}</html>"


@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["table", "json"])
def test_ctrl_c_ends_watch_with_exit_code_130(
    mode: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during ``--watch`` exits 130 (128 + SIGINT) whether it draws a table or prints
    JSON lines, after what it had shown."""
    reads = []

    def read(url: str, recent: int) -> dict[str, Any]:
        reads.append(url)
        return hostile_document()

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_status, "_read", read)
    monkeypatch.setattr(cli_status.time, "sleep", interrupted)

    result = CliRunner().invoke(app, ["status", "--watch", *mode])

    assert result.exit_code == 130, result.output
    assert reads  # it had read the status before the interrupt
    assert "Aborted" not in result.output


def test_help_says_what_ctrl_c_exits_with() -> None:
    result = CliRunner().invoke(app, ["status", "--help"], env={"COLUMNS": "200"})

    assert "Refresh until Ctrl-C (exit code 130)." in result.output
