"""The git revision the broker reports (``/version``, ``broker_build_info``): its own
checkout's, never that of a repository it happens to be installed inside."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import broker
from broker.http import state

pytestmark = pytest.mark.unit


def repository(root: Path) -> str:
    """A repository at ``root`` with one commit; its short revision."""
    root.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (root / "file").write_text("x")
    subprocess.run([*git, "add", "file"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    return subprocess.run(
        [*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("inside", ["", "venv/lib/python3.11/site-packages"])
def test_only_the_packages_own_checkout_gives_the_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inside: str
) -> None:
    revision = repository(tmp_path / "repo")
    package = tmp_path / "repo" / inside / "broker"
    package.mkdir(parents=True)
    monkeypatch.delenv("BROKER_GIT_REVISION", raising=False)
    monkeypatch.setattr(broker, "__file__", str(package / "__init__.py"))
    state.git_revision.cache_clear()
    try:
        found = state.git_revision()
    finally:
        state.git_revision.cache_clear()
    assert found == (revision if not inside else "unknown")
