"""``broker serve`` as a user runs it: embedded NATS, restarts, signals, TLS, the CLI."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.api import StreamConfig

from broker.embedded import NatsServer, ServerSpec
from tests._wait import wait_for
from tests.e2e._broker import alive, children, start_broker

pytestmark = pytest.mark.e2e


def publish(base_url: str, subject: str, body: bytes = b"{}", **kw: object) -> httpx.Response:
    with httpx.Client(http1=False, http2=True, timeout=15, **kw) as c:  # type: ignore[arg-type]
        return c.post(
            f"{base_url}/v1/publish/{subject}",
            content=body,
            headers={"content-type": "application/json"},
        )


def test_embedded_nats_keeps_data_across_restarts_and_stops_cleanly(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    try:
        descendants = children(broker.proc.pid)
        assert descendants, "embedded nats-server and granian worker expected"
        first = publish(broker.base_url, "orders.created").json()
        assert first["seq"] == 1
    finally:
        assert broker.stop() == 0, broker.log_tail()
    assert wait_for(lambda: not any(alive(pid) for pid in descendants), timeout=10)
    assert (tmp_path / "data" / "nats").is_dir()

    again = start_broker(tmp_path)  # same data dir: the stream and its messages survive
    try:
        assert publish(again.base_url, "orders.created").json()["seq"] == 2
    finally:
        again.stop()


def test_the_commands_beside_a_broker_find_its_embedded_nats(tmp_path: Path) -> None:
    """``make run`` puts NATS on a free port; ``broker dlq list`` run beside it (its data
    dir in ``BROKER_DATA_DIR``, no ``--nats-url``) reads the broker's NATS, not 4222."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATA_DIR"] = str(data)
    broker = start_broker(tmp_path)
    try:
        url = (data / "nats.url").read_text().strip()
        assert url.startswith("nats://127.0.0.1:")
        assert not url.endswith(":4222")
        listed = subprocess.run(
            [sys.executable, "-m", "broker", "dlq", "list", "-o", "json"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr.decode()[-2000:]
        assert json.loads(listed.stdout) == []
    finally:
        assert broker.stop() == 0, broker.log_tail()
    assert not (data / "nats.url").exists()


def test_ctrl_c_stops_everything_cleanly(tmp_path: Path) -> None:
    """SIGINT to the whole foreground process group, as a terminal sends it."""
    broker = start_broker(tmp_path, args=("--workers", "2"))
    descendants = children(broker.proc.pid)
    assert publish(broker.base_url, "a").status_code == 200
    os.killpg(broker.proc.pid, signal.SIGINT)
    assert broker.proc.wait(30) == 0, broker.log_tail()
    assert wait_for(lambda: not any(alive(pid) for pid in descendants), timeout=15)


def test_sigkill_of_the_broker_leaves_no_orphans(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, args=("--workers", "2"))
    descendants = children(broker.proc.pid)
    names = {pid: _command(pid) for pid in descendants}
    assert len(descendants) >= 3, "nats-server + 2 workers expected"
    assert publish(broker.base_url, "a").status_code == 200
    broker.proc.send_signal(signal.SIGKILL)
    broker.proc.wait(5)
    assert wait_for(lambda: not any(alive(pid) for pid in descendants), timeout=15), [
        names[pid] for pid in descendants if alive(pid)
    ]


def _command(pid: int) -> str:
    """A process's command line, to say which one outlived its parent."""
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid}: (gone)"


def test_nats_outage_answers_503_then_recovers(tmp_path: Path) -> None:
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats")).start()
    broker = start_broker(tmp_path / "b", nats_url=server.url)
    try:
        assert publish(broker.base_url, "a").status_code == 200
        server.stop()
        down = publish(broker.base_url, "a")
        assert down.status_code == 503
        assert down.json()["error_code"] in {"nats_unavailable", "publish_timeout"}
        assert int(down.headers["retry-after"]) >= 1
        # The registry and replay routes answer the same way (they answered a bare 500).
        manifest = {
            "name": "outage",
            "version": "1.0.0",
            "description": "Waits it out.",
            "capabilities": [{"action": "wait"}],
        }
        with httpx.Client(http1=False, http2=True, timeout=30) as c:
            others = [
                c.put(f"{broker.base_url}/v1/agents/outage", json=manifest),
                c.get(f"{broker.base_url}/v1/agents/outage/history"),
                c.get(f"{broker.base_url}/v1/streams/MESSAGES/messages", params={"limit": 1}),
            ]
        for answer in others:
            assert answer.status_code == 503, (answer.request.url, answer.text)
            assert answer.json()["error_code"] in {"nats_unavailable", "publish_timeout"}
        server.restart()

        def recovered() -> bool:
            return publish(broker.base_url, "a").status_code == 200

        assert wait_for(recovered, timeout=30, interval=0.25)
        with httpx.Client(http1=False, http2=True) as c:
            assert c.get(f"{broker.base_url}/readyz").status_code in {200, 503}
    finally:
        broker.stop()
        server.stop()


def test_conflicting_stream_config_is_reported_at_start(tmp_path: Path) -> None:
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats")).start()
    try:

        async def precreate() -> None:
            nc = await nats.connect(server.url)
            await nc.jetstream().add_stream(
                StreamConfig(name="ROUTES", subjects=["route.>"], max_msgs=10)
            )
            await nc.close()

        import asyncio

        asyncio.run(precreate())
        broker = start_broker(tmp_path / "b", nats_url=server.url, wait=False)
        assert broker.proc.wait(30) == 4
        log = broker.log_tail()
        assert "stream_config_conflict" in log
        assert "ROUTES" in log
        assert "max_msgs" in log
    finally:
        server.stop()


def test_tls_serves_http2_over_alpn(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    broker = start_broker(
        tmp_path, args=("--tls-cert", str(cert), "--tls-key", str(key)), scheme="https", wait=False
    )
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        broker.wait_ready(verify=trust)
        with httpx.Client(http2=True, verify=trust) as c:
            r = c.post(
                f"{broker.base_url}/v1/publish/secure",
                content=b"{}",
                headers={"content-type": "application/json"},
            )
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
    finally:
        broker.stop()


def test_cli_publish_reads_stdin_and_prints_the_ack(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker",
                "publish",
                "cli.test",
                "-",
                "--url",
                broker.base_url,
                "-t",
                "application/json",
                "--key",
                "cli-1",
            ],
            input=b'{"x": 1}',
            capture_output=True,
            timeout=60,
            env={**os.environ},
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["seq"] == 1
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker",
                "publish",
                "cli.test",
                "-",
                "--url",
                broker.base_url,
                "-t",
                "application/x-www-form-urlencoded",
            ],
            input=b"a=1",
            capture_output=True,
            timeout=60,
        )
        assert bad.returncode == 1
        assert b"unsupported_media_type" in bad.stdout
    finally:
        broker.stop()
    unreachable = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "publish",
            "x",
            "-",
            "--url",
            f"http://127.0.0.1:{broker.port}",
        ],
        input=b"1",
        capture_output=True,
        timeout=60,
    )
    assert unreachable.returncode == 3


def test_cli_streams_ndjson_and_summarises(tmp_path: Path) -> None:
    records = tmp_path / "records.ndjson"
    lines = [{"data": {"n": n}, "idempotency_key": f"rec-{n}"} for n in range(3)]
    lines.append({"subject": "bad.*", "data": 0})
    lines.append([1, 2])  # not a record: skipped (it used to hang the stream)
    records.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    broker = start_broker(tmp_path)
    try:

        def run(*extra: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "broker",
                    "publish",
                    "cli.stream",
                    str(records),
                    "--ndjson",
                    "--url",
                    broker.base_url,
                    *extra,
                ],
                capture_output=True,
                timeout=60,
            )

        first = run()
        assert first.returncode == 1, first.stderr  # one record was refused, one skipped
        summary = {"sent": 4, "acked": 3, "duplicates": 0, "failed": 2, "error": None}
        assert json.loads(first.stdout) == summary
        assert b"invalid_subject" in first.stderr
        assert b"line 5: not a JSON object" in first.stderr
        again = run()
        assert json.loads(again.stdout) == {**summary, "duplicates": 3}
        per_message = run("--key", "k1")
        assert per_message.returncode == 2
        assert b"--key" in per_message.stderr
    finally:
        broker.stop()


def test_help_texts() -> None:
    for args in (["--help"], ["serve", "--help"], ["publish", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "broker", *args], capture_output=True, timeout=60
        )
        assert done.returncode == 0
        assert b"Usage" in done.stdout


def test_a_route_waits_for_its_decision_no_longer_than_its_timeout(tmp_path: Path) -> None:
    """No router runs: the decision never comes. A caller that asked for one second hears so
    after about one second, not after BROKER_ROUTE_DECISION_TIMEOUT (5 s)."""
    broker = start_broker(tmp_path, args=("--projection-workers", "0", "--routers", "0"))
    try:
        with httpx.Client(http1=False, http2=True, timeout=30) as c:
            started = time.monotonic()
            answer = c.post(
                f"{broker.base_url}/v1/route/tasks.in",
                params={"wait": "true", "timeout": "1"},
                content=b"hello",
                headers={"content-type": "text/plain"},
            )
            elapsed = time.monotonic() - started
    finally:
        broker.stop()
    assert answer.status_code == 504, answer.text
    assert answer.json()["error_code"] == "deadline_exceeded"
    assert elapsed < 3.5, f"answered after {elapsed:.1f} s"


def _publish_ok(broker_url: str) -> bool:
    try:
        with httpx.Client(http1=False, http2=True, timeout=5) as c:
            r = c.post(
                f"{broker_url}/v1/publish/serve.alive",
                content=b"x",
                headers={"content-type": "text/plain"},
            )
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def test_a_second_broker_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    """It used to stop the first broker's nats-server and take its store: the first stayed
    up, healthy by /healthz, and answered every publish with 503."""
    first = start_broker(tmp_path)
    try:
        second = start_broker(tmp_path, wait=False)
        assert second.proc.wait(60) == 4
        assert b"another broker" in second.log_path.read_bytes()
        assert _publish_ok(first.base_url)
    finally:
        first.stop()


def test_the_embedded_nats_server_is_started_again_when_it_dies(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, args=("--projection-workers", "0", "--routers", "0"))
    try:
        nats_pids = [
            pid
            for pid in children(broker.proc.pid)
            if b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        ]
        assert len(nats_pids) == 1
        os.kill(nats_pids[0], signal.SIGKILL)
        assert wait_for(lambda: b"embedded_nats_restarted" in broker.log_path.read_bytes(), 30)
        assert wait_for(lambda: _publish_ok(broker.base_url), 30)
    finally:
        broker.stop()


def test_a_child_whose_settings_are_wrong_stops_the_broker(tmp_path: Path) -> None:
    """A router that exits with a usage error would fail the same way forever: it used to
    be started again about once a second while /readyz said 200."""
    broker = start_broker(tmp_path, env={"BROKER_ROUTING_EMBEDDER": "bogus"}, wait=False)
    try:
        assert broker.proc.wait(90) == 4
        assert b"child_cannot_start" in broker.log_path.read_bytes()
    finally:
        broker.stop()


def test_a_bad_setting_is_a_usage_error_naming_its_variable(tmp_path: Path) -> None:
    env = {**os.environ, "BROKER_PUBLISH_TIMEOUT": "-1"}
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--data-dir", str(tmp_path)],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert b"BROKER_PUBLISH_TIMEOUT" in done.stderr
    assert b"Traceback" not in done.stderr


def test_the_banner_comes_once_the_ingress_answers(tmp_path: Path) -> None:
    """It used to be printed before granian listened: the example curl right after it got
    'connection refused'."""
    broker = start_broker(
        tmp_path, args=("--projection-workers", "0", "--routers", "0"), wait=False
    )
    try:
        assert wait_for(lambda: b"broker ready on" in broker.log_path.read_bytes(), 60, 0.01)
        with httpx.Client(http1=False, http2=True, timeout=5) as c:
            assert c.get(f"{broker.base_url}/healthz").status_code == 200
    finally:
        broker.stop()
