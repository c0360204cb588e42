"""``broker routes simulate`` prints a policy's version, agents' names and the CSV path as
the text they are: a version or a name that looks like rich markup (``[/x]``, ``[bold]``)
is neither a traceback nor styled away."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli_routes import _print_table

pytestmark = pytest.mark.unit


def test_markup_like_version_names_and_path_are_printed_as_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = {
        "policy_version": "c[/oops]",
        "decisions": 2,
        "changed": 1,
        "unreadable": 0,
        "moves": [{"from": "[bold]ocr", "to": "ocr[/]", "count": 1}],
    }
    _print_table(report, Path("out[red].csv"))
    out = capsys.readouterr().out
    assert "policy c[/oops]: 1 of 2 decisions would change (50.0%)" in out
    assert "[bold]ocr" in out
    assert "ocr[/]" in out
    assert "every decision: out[red].csv" in out
