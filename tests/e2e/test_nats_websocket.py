"""The whole broker over NATS's WebSocket listener (``ws://`` in ``BROKER_NATS_URL``, the
``websocket`` extra): the ingress appends and acks, the router routes to an SDK agent that
is itself connected over WebSocket and its reply comes back, publishing goes on after the
server restarts (nats-py's WebSocket transport reconnects), and ``wss://`` with a client
certificate works, and without one is explained."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.embedded import NatsServer, ServerSpec, free_port
from broker.natsconn import ONE_SHOT, NatsConnectFailed, connect, connect_options
from broker.settings import Settings
from tests._certs import make_pki
from tests._wait import await_until
from tests.e2e._agents import manifest, running
from tests.e2e._broker import BrokerProcess, start_broker, stored_count, within

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def ws_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, str]]:
    """A JetStream server that also listens for WebSocket clients; its ``ws://`` URL."""
    port = free_port()
    listener = f'websocket {{\n  listen: "127.0.0.1:{port}"\n  no_tls: true\n}}'
    spec = ServerSpec(store_dir=tmp_path_factory.mktemp("nats-ws"), extra_config=listener)
    server = NatsServer(spec).start()
    yield server, f"ws://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def broker(
    ws_nats: tuple[NatsServer, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """``broker serve`` over the WebSocket listener (the e2e ``client`` fixture speaks to it)."""
    _, ws_url = ws_nats
    workdir = tmp_path_factory.mktemp("broker-ws")
    policy = workdir / "policy.yaml"  # any agent that can take the request will do
    policy.write_text("version: ws-1\nthreshold: -1.0\n")
    process = start_broker(workdir, nats_url=ws_url, args=("--routing-policy", str(policy)))
    yield process
    process.stop()


async def test_publishes_over_websocket_are_stored_once_each(
    ws_nats: tuple[NatsServer, str], broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    server, _ = ws_nats
    answers = [
        await client.post(
            "/v1/publish/ws.orders", json={"n": n}, headers={"Idempotency-Key": f"o{n}"}
        )
        for n in range(20)
    ]
    assert [a.status_code for a in answers] == [200] * 20, answers[-1].text
    assert len({a.json()["seq"] for a in answers}) == 20
    # Read back over plain NATS: what the WebSocket connection stored is the stream's.
    assert await stored_count(server.url, "msg.default.ws.orders") == 20
    assert '"nats_connected"' in broker.log_path.read_text()


async def test_an_agent_on_websocket_answers_a_route_over_websocket(
    ws_nats: tuple[NatsServer, str], client: httpx.AsyncClient
) -> None:
    _, ws_url = ws_nats
    echo = manifest("ws-echo", "Echoes what it is told")

    async def routed() -> bool:
        answer = await client.post(
            "/v1/route/ws.tasks", content=b"ping", headers={"content-type": "text/plain"}
        )
        return answer.status_code == 200 and answer.json()["decision"]["agent"] == "ws-echo"

    async with running(echo, ws_url):
        assert await await_until(routed, timeout=20, interval=0.2)
        answer = await client.post(
            "/v1/route/ws.tasks",
            content=b"hello",
            params={"wait": "true", "timeout": "10"},
            headers={"content-type": "text/plain"},
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["broker-agent"] == "ws-echo"
    assert answer.json() == {"agent": "ws-echo", "attempt": 1, "mirror": False}


async def test_publishing_goes_on_after_the_server_restarts(
    ws_nats: tuple[NatsServer, str], broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    server, _ = ws_nats
    before = await client.post("/v1/publish/ws.restart", json={"n": 0})
    assert before.status_code == 200, before.text
    server.restart()

    async def stored() -> bool:
        answer = await client.post(
            "/v1/publish/ws.restart", json={"n": 1}, headers={"Idempotency-Key": "after"}
        )
        return answer.status_code == 200

    assert await await_until(stored, timeout=30, interval=0.3), broker.log_tail()
    assert await stored_count(server.url, "msg.default.ws.restart") == 2
    assert '"nats_reconnected"' in broker.log_path.read_text()  # a new WebSocket, same client


def test_wss_with_a_client_certificate(tmp_path: Path) -> None:
    """``wss://`` to a listener that verifies clients: the TLS context built from
    ``BROKER_NATS_TLS_*`` (:class:`broker.natsconn.RenewingContext`) is what aiohttp's
    WebSocket connection uses; without the client certificate, or with the wrong CA, the log
    says what to set."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    listener = f"""websocket {{
  listen: "127.0.0.1:{port}"
  tls {{
    cert_file: {json.dumps(str(pki.server.cert))}
    key_file: {json.dumps(str(pki.server.key))}
    ca_file: {json.dumps(str(pki.ca.cert))}
    verify: true
  }}
}}"""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats", extra_config=listener)).start()
    env = {
        "BROKER_NATS_TLS_CA": str(pki.ca.cert),
        "BROKER_NATS_TLS_CERT": str(pki.client.cert),
        "BROKER_NATS_TLS_KEY": str(pki.client.key),
    }
    lean = ("--routers", "0", "--projection-workers", "0")
    try:
        broker = start_broker(
            tmp_path / "broker", nats_url=f"wss://127.0.0.1:{port}", env=env, args=lean
        )
        try:
            with httpx.Client(http1=False, http2=True, timeout=15) as client:
                answer = client.post(f"{broker.base_url}/v1/publish/wss.demo", json={"over": "wss"})
            assert answer.status_code == 200, answer.text
            assert asyncio.run(stored_count(server.url, "msg.default.wss.demo")) == 1
        finally:
            broker.stop()
        # aiohttp wraps the ssl errors (its own classes, without ssl's attributes): the
        # broker still names what to set, as it does over nats:// and tls://.
        for name, ca, explained in (
            ("no-cert", pki.ca.cert, "the server may require a client certificate"),
            ("wrong-ca", pki.unknown_ca.cert, "the server's certificate was refused"),
        ):
            refused = start_broker(
                tmp_path / name,
                nats_url=f"wss://127.0.0.1:{port}",
                env={"BROKER_NATS_TLS_CA": str(ca)},
                args=lean,
                wait=False,
            )
            try:
                said = within(20, lambda: explained in refused.log_path.read_text())  # noqa: B023
                assert said, refused.log_tail()
                assert refused.proc.poll() is None  # still waiting for NATS, not crashed
                assert "Traceback" not in refused.log_path.read_text()
            finally:
                refused.stop()
    finally:
        server.stop()


def dlq_list(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``broker dlq list --nats-url url``: a one-shot command that connects to NATS."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "dlq", "list", "--nats-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung server, a load
    balancer whose backend is gone)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


async def test_a_websocket_handshake_that_never_ends_gives_up_at_the_connect_timeout(
    silent_port: int,
) -> None:
    """nats-py hands the connect timeout to aiohttp as its close timeout: each attempt used to
    wait aiohttp's 300 s (a CLI command 15 minutes, an agent's reconnect 5)."""
    options = connect_options(
        Settings(nats_connect_timeout=1.0), name="t", servers=f"ws://127.0.0.1:{silent_port}"
    )
    started = time.monotonic()
    with pytest.raises(NatsConnectFailed, match=r"did not answer within 1\.0 s"):
        await asyncio.wait_for(connect(options, **ONE_SHOT), 30)
    assert time.monotonic() - started < 10  # three attempts of 1 s, and the waits between


def test_a_failed_websocket_command_says_one_line(silent_port: int) -> None:
    """nats-py leaves a failed WebSocket connection's aiohttp session open: asyncio printed
    "Unclosed client session" under the command's error at exit."""
    for url in (f"ws://127.0.0.1:{silent_port}", f"ws://127.0.0.1:{free_port()}"):
        done = dlq_list(url, BROKER_NATS_CONNECT_TIMEOUT="1")
        assert done.returncode == 3, done.stderr
        assert done.stderr.startswith("error: "), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_ws_with_tls_settings_is_refused_and_wss_on_a_plain_listener_is_explained(
    ws_nats: tuple[NatsServer, str], tmp_path: Path
) -> None:
    _, ws_url = ws_nats
    pki = make_pki(tmp_path / "pki")
    ca = str(pki.ca.cert)
    # nats-py never upgrades a WebSocket: this ran in plaintext, credentials included.
    plain = dlq_list(ws_url, BROKER_NATS_TLS_CA=ca)
    assert plain.returncode == 2, (plain.stdout, plain.stderr)
    assert "plaintext WebSocket" in plain.stderr
    assert "use wss://" in plain.stderr
    tls_url = ws_url.replace("ws://", "wss://")
    wrong = dlq_list(tls_url, BROKER_NATS_TLS_CA=ca)
    assert wrong.returncode == 3, (wrong.stdout, wrong.stderr)
    assert "did not answer in TLS" in wrong.stderr, wrong.stderr


def test_ws_at_a_port_that_is_no_websocket_listener_says_so(
    ws_nats: tuple[NatsServer, str],
) -> None:
    server, _ = ws_nats
    client_port = server.url.replace("nats://", "ws://")  # NATS's TCP port: INFO, not HTTP
    done = dlq_list(client_port)
    assert done.returncode == 3, done.stderr
    assert "did not accept a WebSocket" in done.stderr, done.stderr
    assert "server_id" not in done.stderr  # not the INFO line quoted whole
    assert done.stderr.count("\n") == 1, done.stderr
