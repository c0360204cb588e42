"""The SQL replica as a user gets it: `broker serve` runs a projection worker, and the
`broker projections` / `broker dlq` commands operate it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from broker.embedded import NatsServer
from projections.checkpoints import create_sql_engine
from tests._wait import wait_for
from tests.e2e._broker import children, start_broker

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=60
    )


def rows(engine: sa.Engine) -> list[Any]:
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    sa.text("SELECT seq, subject, payload_json FROM replica_messages ORDER BY seq")
                )
            )
    except sa.exc.OperationalError:  # the worker has not created the table yet
        return []


def test_serve_keeps_a_queryable_replica_and_the_cli_operates_it(
    tmp_path: Path, module_nats: NatsServer
) -> None:
    data = tmp_path / "b" / "data"
    broker = start_broker(tmp_path / "b", nats_url=module_nats.url)
    engine = create_sql_engine(f"sqlite:///{data / 'replica.db'}")
    try:
        for i in range(3):
            answer = httpx.post(
                f"{broker.base_url}/v1/publish/replica.demo", json={"n": i}, timeout=10
            )
            assert answer.status_code == 200, answer.text
        assert wait_for(lambda: len(rows(engine)) >= 3, timeout=30), broker.log_tail()
        got = rows(engine)
        assert [(r.subject, json.loads(r.payload_json)) for r in got[-3:]] == [
            ("replica.demo", {"n": i}) for i in range(3)
        ]
        status = cli(
            "projections",
            "status",
            "--nats-url",
            module_nats.url,
            "--data-dir",
            str(data),
            "-o",
            "json",
        )
        assert status.returncode == 0, status.stderr
        by_name = {r["projection"]: r for r in json.loads(status.stdout)}
        assert by_name["replica_messages"]["lag"] == 0
        assert set(by_name) >= {"replica_agents", "replica_schemas", "replica_routes"}
    finally:
        assert broker.stop() == 0, broker.log_tail()
    # With the workers stopped, a reset drops the tables and rebuilds the same rows.
    before = rows(engine)
    reset = cli(
        "projections",
        "reset",
        "replica_messages",
        "--yes",
        "--nats-url",
        module_nats.url,
        "--data-dir",
        str(data),
    )
    assert reset.returncode == 0, reset.stderr
    assert "rebuilt from" in reset.stdout
    assert rows(engine) == before
    dlq = cli("dlq", "list", "--nats-url", module_nats.url, "-o", "json")
    assert dlq.returncode == 0, dlq.stderr
    assert json.loads(dlq.stdout) == []
    engine.dispose()


def test_worker_help_explains_scaling() -> None:
    answer = cli("worker", "--help")
    assert answer.returncode == 0
    assert "--replica-url" in answer.stdout
    assert "split the partitions" in answer.stdout


def test_a_masked_card_number_is_audited_and_the_tenant_replays_its_audit_trail(
    tmp_path: Path, module_nats: NatsServer
) -> None:
    """With card detection on, the replica masks the number and the audit event it relays
    to AUDIT is readable with the replay API, in the tenant's own namespace."""
    tenant = "audited"
    broker = start_broker(
        tmp_path / "audit",
        nats_url=module_nats.url,
        env={"BROKER_DETECT_CARD_NUMBERS": "true", "BROKER_TENANT": tenant},
    )
    try:
        answer = httpx.post(
            f"{broker.base_url}/v1/publish/payments.captured",
            json={"order": 7, "card": "4242 4242 4242 4242"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        seq = answer.json()["seq"]

        def audit_records() -> list[dict[str, Any]]:
            got = httpx.get(f"{broker.base_url}/v1/streams/AUDIT/messages?decode=json", timeout=10)
            assert got.status_code == 200, got.text
            return [json.loads(line) for line in got.text.splitlines()]

        assert wait_for(lambda: bool(audit_records()), timeout=30), broker.log_tail()
        (record,) = audit_records()
        assert record["subject"] == f"audit.{tenant}.card_redacted"
        assert record["value"]["seq"] == seq
        assert "4242 4242 4242 4242" not in json.dumps(record)
    finally:
        assert broker.stop() == 0, broker.log_tail()


def test_serve_hands_its_replica_url_to_the_workers_off_their_command_line(
    tmp_path: Path, module_nats: NatsServer
) -> None:
    """The URL may hold a password: the worker gets it from the environment, not argv."""
    target = tmp_path / "elsewhere" / "custom.db"
    target.parent.mkdir()
    url = f"sqlite:///{target}"
    broker = start_broker(
        tmp_path / "b", nats_url=module_nats.url, args=("--replica-url", url, "--routers", "0")
    )
    engine = create_sql_engine(url)
    try:
        answer = httpx.post(f"{broker.base_url}/v1/publish/replica.env", json={"n": 1}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert wait_for(lambda: any(r.subject == "replica.env" for r in rows(engine)), 30)
        workers = [
            Path(f"/proc/{pid}/cmdline").read_bytes()
            for pid in children(broker.proc.pid)
            if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert workers
        assert not [w for w in workers if str(target).encode() in w]
    finally:
        broker.stop()
        engine.dispose()
