"""Every benchmark script starts: its imports resolve and `--help` answers. The benchmarks
run outside the suite, so a refactor that moved a helper they import broke two of them
unnoticed (replay.py and auth.py imported a launcher that no longer existed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    path.relative_to(ROOT)
    for path in [*ROOT.glob("benchmarks/*.py"), ROOT / "benchmarks/routing_quality/run.py"]
    if not path.name.startswith("_")
)


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_the_benchmark_starts_and_explains_itself(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
