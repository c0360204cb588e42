"""The examples in docs/*.md run against a real broker, so they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker.embedded import NatsServer
from tests.e2e._broker import BrokerProcess

pytestmark = pytest.mark.e2e
DOCS = Path(__file__).resolve().parents[2] / "docs"


def python_blocks(page: Path) -> str:
    return "\n\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL))


def test_client_guide_examples_run(
    broker: BrokerProcess, module_nats: NatsServer, tmp_path: Path
) -> None:
    script = tmp_path / "client_examples.py"
    script.write_text(python_blocks(DOCS / "client.md"))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BROKER_URL": broker.base_url, "BROKER_NATS_URL": module_nats.url},
    )
    assert done.returncode == 0, done.stderr
    assert "[True, False, True]" in done.stdout
    assert "invalid_subject 422" in done.stdout
    assert "changed since we read it" in done.stdout
    assert "why not: ['backward, new reads existing schema 1 of 1:" in done.stdout
    assert "decoded: {'id': 'o-7', 'qty': 2}" in done.stdout
    assert "reply from greeter {'reply': 'hello, good morning'}" in done.stdout
    assert "no route: no_route" in done.stdout
