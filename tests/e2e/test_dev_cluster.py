"""``broker dev-cluster`` as a user runs it: a 3-node cluster with R3 streams, the HTTP/2
ingress, a projection worker and a router, all stopped by one SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import orjson
import pytest

from broker.server import NATS_URL_FILE, running_nats_url
from tests._wait import wait_for
from tests.e2e._broker import alive, children, free_port

pytestmark = pytest.mark.e2e

READY_LINE = "Ctrl-C stops everything."
MIB = 1024 * 1024


async def _messages_on_three_nodes(nats_url: str) -> None:
    nc = await nats.connect(nats_url.split(","))
    try:
        info = await nc.jetstream().stream_info("MESSAGES")
    finally:
        await nc.close()
    assert info.config.num_replicas == 3
    assert info.cluster is not None
    assert info.cluster.leader in {"n0", "n1", "n2"}
    assert len(info.cluster.replicas or []) == 2


def _commands_beside_find_the_nodes(broker_data_dir: Path, nats_url: str) -> None:
    """A command run beside a dev cluster on ``<broker data dir>/dev-cluster``, given no
    ``--nats-url``, talks to its nodes (not to 4222)."""
    assert running_nats_url(broker_data_dir / "dev-cluster") == nats_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    listed = subprocess.run(
        [sys.executable, "-m", "broker", "dlq", "list", "-o", "json"],
        env={**env, "BROKER_DATA_DIR": str(broker_data_dir)},
        capture_output=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr.decode()[-2000:]
    assert orjson.loads(listed.stdout) == []


def _dev_cluster(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | (env or {})
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "dev-cluster", *args],
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
    return proc, out, err


def _replica_subjects(db: Path) -> list[str]:
    try:
        with sqlite3.connect(db) as conn:
            return [row[0] for row in conn.execute("SELECT subject FROM replica_messages")]
    except sqlite3.Error:  # the worker has not created its tables yet
        return []


async def test_dev_cluster_serves_http2_on_r3_streams_and_sigterm_stops_every_process(
    tmp_path: Path,
) -> None:
    """Publish over HTTP/2, read the message back through the replay API and the SQLite
    replica, check the stream has 3 replicas on 3 nodes; SIGTERM leaves no process."""
    port = free_port()
    data = tmp_path / "dev-cluster"  # where a broker's data dir (here tmp_path) keeps one
    proc, out, err = _dev_cluster(tmp_path, "--data-dir", str(data), "--port", str(port))
    descendants: list[int] = []
    try:
        started = wait_for(
            lambda: READY_LINE in out.read_text() or proc.poll() is not None, timeout=90
        )
        assert started, err.read_text()[-3000:]
        assert proc.poll() is None, err.read_text()[-3000:]
        banner = out.read_text()
        assert f"http://127.0.0.1:{port}" in banner
        assert "curl --http2-prior-knowledge" in banner
        match = re.search(r"^NATS URL: (\S+)$", banner, re.MULTILINE)
        assert match, banner
        nats_url = match.group(1)
        assert len(nats_url.split(",")) == 3
        # 3 nodes, the ingress and its granian process and worker, a worker, a router
        descendants = children(proc.pid)
        assert len(descendants) >= 7, descendants

        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", http1=False, http2=True, timeout=15
        ) as client:
            published = await client.post(
                "/v1/publish/devcluster.check",
                json={"hello": "cluster"},
                headers={"Idempotency-Key": "dev-cluster-1"},
            )
            assert published.http_version == "HTTP/2"
            assert published.status_code == 200, published.text
            seq = published.json()["seq"]
            replay = await client.get(
                "/v1/streams/MESSAGES/messages", params={"start_seq": seq, "limit": 1}
            )
        assert replay.status_code == 200, replay.text
        record = orjson.loads(replay.text.splitlines()[0])
        assert record["seq"] == seq
        assert record["subject"].endswith("devcluster.check")
        assert orjson.loads(base64.b64decode(record["payload_base64"])) == {"hello": "cluster"}

        await _messages_on_three_nodes(nats_url)
        await asyncio.to_thread(_commands_beside_find_the_nodes, tmp_path, nats_url)

        replica_db = data / "replica.db"
        assert wait_for(
            lambda: any(s.endswith("devcluster.check") for s in _replica_subjects(replica_db)),
            timeout=30,
            interval=0.2,
        ), (data / "logs" / "worker-0.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0, err.read_text()[-3000:]
    assert "dev cluster stopped" in err.read_text()
    assert not (data / NATS_URL_FILE).exists()  # the commands beside it no longer read it
    assert descendants
    assert wait_for(lambda: not any(alive(pid) for pid in descendants), timeout=10), [
        pid for pid in descendants if alive(pid)
    ]


def test_dev_cluster_refuses_a_busy_port_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _, err = _dev_cluster(
            tmp_path, "--data-dir", str(tmp_path / "c"), "--port", str(port)
        )
        assert proc.wait(30) == 4
    assert f"cannot listen on 127.0.0.1:{port}" in err.read_text()
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--replicas", "5"), "5 replicas need at least as many --nodes (3)"),
        (("--sync-interval", "soon"), "use `always` or a duration"),
        (("--nodes", "2"), "--nodes"),
    ],
)
def test_dev_cluster_rejects_bad_options_with_usage_errors(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    proc, _, err = _dev_cluster(tmp_path, "--data-dir", str(tmp_path / "c"), *args)
    assert proc.wait(30) == 2
    assert message in " ".join(err.read_text().replace("│", " ").split())


def test_dev_cluster_stores_a_message_over_8_mib_under_a_raised_message_limit(
    tmp_path: Path,
) -> None:
    """The nodes' max_payload was NATS's 8 MiB whatever BROKER_MAX_MESSAGE_BYTES said: with
    a 12 MiB limit, a 10 MiB message the ingress took was refused by NATS (413). The nodes
    follow the limit now, with room for headers, as ``broker serve``'s embedded server."""
    port = free_port()
    proc, out, err = _dev_cluster(
        tmp_path,
        *("--data-dir", str(tmp_path / "cluster"), "--port", str(port)),
        *("--projection-workers", "0", "--routers", "0"),
        env={"BROKER_MAX_MESSAGE_BYTES": str(12 * MIB)},
    )
    try:
        started = wait_for(
            lambda: READY_LINE in out.read_text() or proc.poll() is not None, timeout=90
        )
        assert started, err.read_text()[-3000:]
        assert proc.poll() is None, err.read_text()[-3000:]
        with httpx.Client(http1=False, http2=True, timeout=60) as client:
            answer = client.post(
                f"http://127.0.0.1:{port}/v1/publish/devcluster.big",
                content=b"x" * (10 * MIB),
                headers={"content-type": "application/octet-stream"},
            )
        assert answer.status_code == 200, answer.text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0, err.read_text()[-3000:]


def test_dev_cluster_refuses_a_message_limit_nats_cannot_carry_before_starting_anything(
    tmp_path: Path,
) -> None:
    """A limit whose max_payload would be over NATS's 64 MiB is exit 4, as for ``serve``."""
    proc, _, err = _dev_cluster(
        tmp_path,
        *("--data-dir", str(tmp_path / "c"), "--port", "0"),
        env={"BROKER_MAX_MESSAGE_BYTES": str(64 * MIB)},
    )
    try:
        exited = wait_for(lambda: proc.poll() is not None, timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(90)
    assert exited, "the dev cluster started with a limit NATS cannot carry"
    assert proc.returncode == 4, err.read_text()[-3000:]
    assert "BROKER_MAX_MESSAGE_BYTES (67108864)" in err.read_text()
    assert "Traceback" not in err.read_text()
    assert not (tmp_path / "c").exists()
