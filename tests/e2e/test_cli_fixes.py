"""The operator commands on awkward data and failures, as a user runs them: ``broker status``
and ``broker dlq list`` print data that looks like rich markup as text, ``broker dlq replay``
refuses a bad sequence with a usage error and routes a routing dead letter again, and
``broker replay --to FILE`` leaves FILE as it was when the replay fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.agent import Request
from broker.embedded import NatsServer, free_port
from tests._wait import await_until
from tests.e2e._agents import Behaviour, manifest, running
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e

MARKUP_TYPE = "text/x-[/x]"  # "[/x]" closes a tag rich never opened: a MarkupError as markup


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    workdir = tmp_path_factory.mktemp("cli-fixes")
    policy = workdir / "policy.yaml"
    policy.write_text("version: cli-fixes-1\nthreshold: -1.0\n")  # content types decide
    process = start_broker(
        workdir,
        nats_url=module_nats.url,
        args=("--projection-workers", "0", "--routing-policy", str(policy)),
    )
    yield process
    process.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300"}  # wide enough that rich cuts no cell
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def dead_letters(nats_url: str) -> list[dict[str, Any]]:
    listed = cli("dlq", "list", "--nats-url", nats_url, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    return rows


async def test_status_and_dlq_list_print_markup_like_data_as_text(
    client: httpx.AsyncClient, broker: BrokerProcess, module_nats: NatsServer
) -> None:
    """A content type nobody accepts that looks like markup ends up in the DLQ's error:
    both tables print it as it is, instead of failing on it."""
    refused = f"no agent accepts {MARKUP_TYPE}"

    async def dead_lettered() -> bool:  # once the router knows an agent, for text only
        routed = await client.post(
            "/v1/route/cli.markup", content=b"bracketed", headers={"content-type": MARKUP_TYPE}
        )
        assert routed.status_code == 200, routed.text
        return refused in routed.json()["decision"]["detail"]

    async with running(manifest("cli-text", "reads plain text"), module_nats.url):
        assert await await_until(dead_lettered, timeout=20, interval=0.2)

    status = cli("status", "--url", broker.base_url)
    assert status.returncode == 0, status.stderr
    assert refused in status.stdout, status.stdout

    listed = cli("dlq", "list", "--nats-url", module_nats.url)
    assert listed.returncode == 0, listed.stderr
    assert refused in listed.stdout, listed.stdout


def test_dlq_replay_of_sequence_zero_is_a_usage_error(module_nats: NatsServer) -> None:
    replayed = cli("dlq", "replay", "0", "--nats-url", module_nats.url)
    assert replayed.returncode == 2, replayed.stderr
    assert "Traceback" not in replayed.stderr
    assert "dlq_seq" in replayed.stderr  # the usage error names the argument


async def test_dlq_replay_routes_a_routing_dead_letter_again(
    client: httpx.AsyncClient, module_nats: NatsServer
) -> None:
    """Nobody took the message; once an agent for it runs, ``broker dlq replay`` hands the
    same payload to a router again, which routes it to that agent. The caller who waited
    is long gone: the copy carries no reply address and no deadline to miss."""
    content_type = "text/x-cli-replayed"
    waited = await client.post(
        "/v1/route/cli.later",
        content=b"route me again",
        headers={"content-type": content_type},
        params={"wait": "true", "timeout": "2"},
    )
    assert waited.status_code == 503, waited.text
    (dead,) = [row for row in dead_letters(module_nats.url) if content_type in (row["error"] or "")]
    assert dead["projection"] == "router"

    spec = manifest("cli-later", "takes what nobody took", content_types=[content_type])
    seen = Behaviour(reply="cli-later")
    async with running(spec, module_nats.url, seen):

        async def live() -> bool:  # a probe routes to it: the router sees the agent live
            probe = await client.post(
                "/v1/route/cli.probe", content=b"probe", headers={"content-type": content_type}
            )
            return bool(probe.json()["decision"]["agent"] == "cli-later")

        assert await await_until(live, timeout=20, interval=0.2)
        replayed = cli("dlq", "replay", str(dead["dlq_seq"]), "--nats-url", module_nats.url)
        assert replayed.returncode == 0, replayed.stderr
        new_seq = int(replayed.stdout.split()[-1])

        def request() -> Request | None:
            return next((r for r in seen.seen if r.message_seq == new_seq), None)

        async def delivered() -> bool:
            return request() is not None

        assert await await_until(delivered, timeout=20, interval=0.1), replayed.stdout
    got = request()
    assert got is not None
    assert got.payload == b"route me again"
    assert got.content_type == content_type
    assert got.deadline is None
    assert got.headers["Broker-Replayed-From-Dlq"] == str(dead["dlq_seq"])
    assert "Broker-Reply-To" not in got.headers
    assert got.route.message_subject == "msg.default.cli.later"


def test_replay_to_a_file_keeps_it_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    kept = tmp_path / "audit.ndjson"
    kept.write_bytes(b'{"seq": 1}\n')
    replayed = cli(
        "replay", "MESSAGES", "--to", str(kept), "--url", f"http://127.0.0.1:{free_port()}"
    )
    assert replayed.returncode == 3, replayed.stderr
    assert kept.read_bytes() == b'{"seq": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.ndjson"]  # no partial left


def test_replay_to_a_file_replaces_it_once_the_replay_ends(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    with httpx.Client(base_url=broker.base_url, http1=False, http2=True, timeout=15) as client:
        published = client.post(
            "/v1/publish/cli.replayed", content=b"kept", headers={"content-type": "text/plain"}
        )
    assert published.status_code < 300, published.text
    out = tmp_path / "audit.ndjson"
    out.write_bytes(b"old contents\n")
    out.chmod(0o640)
    replayed = cli(
        "replay", "MESSAGES", "--subject", "cli.replayed", "--to", str(out), "--url",
        broker.base_url,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    records = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["subject"] for r in records] == ["msg.default.cli.replayed"]
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.ndjson"]
