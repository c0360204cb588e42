"""compose.yaml and deploy/ as an operator deploys them: the image builds from what the
Dockerfile copies, and a PostgreSQL password of any characters reaches the workers."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
#: A generated password: every character that means something in a URL.
HOSTILE_PASSWORD = "p@ss:w/rd#1?%2F&x=y$HOME"


def _copied_into_image() -> set[str]:
    """The paths of the build context (the repository root) that the Dockerfile COPYs."""
    copied: set[str] = set()
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            copied |= {source.rstrip("/") for source in words[1:-1] if not source.startswith("--")}
    return copied


def _wheel_build_reads() -> set[str]:
    """What ``pip install .`` (hatchling) reads besides pyproject.toml: the readme, the
    packages, and the custom build hook's script (hatchling fails without it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"]}
    custom = wheel.get("hooks", {}).get("custom")
    if custom is not None:
        needed.add(custom.get("path", "hatch_build.py"))
    return needed


def test_the_image_copies_every_file_the_wheel_build_reads() -> None:
    """The Dockerfile copied no ``hatch_build.py``: ``pip install .`` in the image failed
    with "Build script does not exist: hatch_build.py", so ``docker compose build`` (and
    ``up``) could not make the broker image at all."""
    missing = _wheel_build_reads() - _copied_into_image()
    assert not missing, f"deploy/Dockerfile does not COPY {sorted(missing)}"


def test_the_files_the_image_copies_build_a_wheel(tmp_path: Path) -> None:
    """The same, for real: hatchling builds the wheel from only what the Dockerfile copies
    (where hatchling is importable)."""
    build = pytest.importorskip("hatchling.build")
    context = tmp_path / "context"
    context.mkdir()
    for source in _copied_into_image():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, context / source)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(context)
        patch.setenv("BROKER_NO_C_EXTENSION", "1")
        name = build.build_wheel(str(tmp_path / "dist"))
    assert name.endswith(".whl")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """compose's ``${VAR}`` / ``${VAR:-default}`` substitution (values are not re-read)."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", one, value)


def test_a_postgres_password_of_any_characters_reaches_the_workers() -> None:
    """``POSTGRES_PASSWORD`` was pasted into ``BROKER_REPLICA_URL``
    (``postgresql://broker:${POSTGRES_PASSWORD}@postgres…``) unencoded: a password with
    ``@``, ``:``, ``/`` or ``#`` made a URL naming another host, port or database, and every
    worker (and its healthcheck) failed to start. The URL now carries no password; libpq
    reads it from ``PGPASSWORD``, which takes any characters."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    env = {"POSTGRES_PASSWORD": HOSTILE_PASSWORD}
    postgres_password = _interpolate(services["postgres"]["environment"]["POSTGRES_PASSWORD"], env)
    assert postgres_password == HOSTILE_PASSWORD
    worker = services["worker"]["environment"]
    worker_env = {key: _interpolate(str(value), env) for key, value in worker.items()}
    url = make_url(worker_env["BROKER_REPLICA_URL"])
    assert (url.host, url.port, url.database) == ("postgres", 5432, "broker")
    assert url.username == "broker"
    password = url.password if url.password is not None else worker_env.get("PGPASSWORD")
    assert password == HOSTILE_PASSWORD
