"""``broker routes simulate`` refuses an ``--embedder`` or ``--tenant`` it cannot use with a
usage error (exit 2) that names the value, before it connects to NATS or reads a decision:
not after the connection (``cannot reach NATS``, exit 3) or the registry replay."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app

pytestmark = pytest.mark.unit

#: Nothing listens on port 1: a command that got as far as NATS would exit 3.
CLOSED = "nats://127.0.0.1:1"


def simulate(tmp_path: Path, *extra: str) -> list[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: fixes-1\n")
    return ["routes", "simulate", "--policy", str(policy), "--nats-url", CLOSED, *extra]


@pytest.mark.parametrize("spec", ["bogus", "hashing|bogus", "hashing:x", "static+hashing:2"])
def test_an_unusable_embedder_is_a_usage_error_before_nats(tmp_path: Path, spec: str) -> None:
    result = CliRunner().invoke(app, simulate(tmp_path, "--embedder", spec))
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--embedder" in result.output
    assert "cannot reach NATS" not in result.output


def test_an_unknown_embedder_is_named_with_the_choices(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, simulate(tmp_path, "--embedder", "bogus"))
    assert result.exit_code == 2, (result.output, result.exception)
    flat = " ".join(result.output.replace("│", " ").split())
    assert "unknown embedder 'bogus'" in flat
    assert "'minilm'" in flat
    assert "'hashing'" in flat


@pytest.mark.parametrize("tenant", ["a.b", "a*", "", "x" * 65, "routes", "_", "é"])
def test_a_name_no_tenant_can_have_is_a_usage_error_before_nats(
    tmp_path: Path, tenant: str
) -> None:
    """The tenant rule is :func:`broker.auth.valid_tenant`'s (one subject token, 1-64 of
    A-Z a-z 0-9 _ -, not a stream's name): a filter by any other name matches nothing."""
    result = CliRunner().invoke(app, simulate(tmp_path, "--tenant", tenant))
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--tenant" in result.output
    assert "cannot reach NATS" not in result.output


def test_a_valid_tenant_and_embedder_get_as_far_as_nats(tmp_path: Path) -> None:
    args = simulate(tmp_path, "--tenant", "acme-1", "--embedder", "hashing")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, (result.output, result.exception)
    assert "cannot reach NATS" in result.output
