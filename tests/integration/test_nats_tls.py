"""NATS over TLS with client certificates and a password, through :mod:`broker.natsconn`.

The server (a real nats-server) requires TLS, verifies client certificates against the test
CA (``verify: true``) and requires user ``broker`` with its password; certificates are made
at test time.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue
from pydantic import SecretStr
from structlog.testing import capture_logs

from broker.agent import Agent, Request
from broker.embedded import NatsServer, ServerSpec
from broker.natsconn import (
    ONE_SHOT,
    InvalidNatsSettings,
    NatsConnectFailed,
    connect,
    connect_options,
)
from broker.publisher import Publisher
from broker.server import provision_streams
from broker.settings import Settings
from broker.streams import AGENT_LOAD_BUCKET, Stream
from tests._certs import Pki, make_pki, secure_nats_config
from tests._wait import await_until

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_nats(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    tls_and_auth = secure_nats_config(pki, PASSWORD)
    spec = ServerSpec(store_dir=tmp_path_factory.mktemp("nats"), extra_config=tls_and_auth)
    server = NatsServer(spec).start()
    yield server
    server.stop()


@pytest.fixture
def good(secure_nats: NatsServer, pki: Pki) -> Settings:
    """Settings that satisfy the server: its CA, a client certificate, user and password."""
    return Settings(
        nats_url=secure_nats.url,
        nats_tls_ca=pki.ca.cert,
        nats_tls_cert=pki.client.cert,
        nats_tls_key=pki.client.key,
        nats_user="broker",
        nats_password=SecretStr(PASSWORD),
        nats_connect_timeout=3,
    )


def connections(server: NatsServer) -> list[dict[str, Any]]:
    """The server's view of its client connections (monitoring ``/connz``)."""
    with urllib.request.urlopen(f"{server.monitor_url}/connz?auth=true", timeout=5) as r:
        conns: list[dict[str, Any]] = json.load(r)["connections"] or []
    return conns


async def refused(settings: Settings) -> str:
    """Connect once (no retries); the :class:`NatsConnectFailed` message."""
    options = connect_options(settings, name="test-refused")
    with pytest.raises(NatsConnectFailed) as failure:
        await connect(options, allow_reconnect=False, max_reconnect_attempts=0)
    return failure.value.message


# --- connecting --------------------------------------------------------------------------


async def test_good_settings_connect_over_tls_1_3_as_the_user_and_jetstream_works(
    good: Settings, secure_nats: NatsServer
) -> None:
    nc = await connect(connect_options(good, name="test-good"), allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name="TLS_CHECK", subjects=["tls.check"]))
        ack = await js.publish("tls.check", b"over tls")
        assert ack.stream == "TLS_CHECK"
        assert ack.seq == 1
        stored = await js.get_msg("TLS_CHECK", 1)
        assert stored.data == b"over tls"
        (seen,) = [c for c in connections(secure_nats) if c.get("name") == "test-good"]
        assert seen["tls_version"] == "1.3"
        assert seen["authorized_user"] == "broker"
    finally:
        await nc.close()


async def test_provisioning_at_serve_start_uses_tls_and_credentials(good: Settings) -> None:
    await provision_streams(good)
    nc = await connect(connect_options(good, name="test-check"), allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info(Stream.MESSAGES)
        assert info.config.name == Stream.MESSAGES
    finally:
        await nc.close()


async def test_the_publisher_connects_with_the_options(good: Settings) -> None:
    publisher = Publisher(
        [good.nats_url or ""],
        name="test-publisher",
        connect_options=connect_options(good, name="x"),
    )
    publisher.start()
    try:
        assert await publisher.wait_connected(10)
        await provision_streams(good)
        ack = await publisher.js.publish("msg.default.tls.publisher", b"{}")
        assert ack.stream == Stream.MESSAGES
    finally:
        await publisher.close()


async def test_an_agent_registers_and_heartbeats_over_tls_with_the_options(
    good: Settings, secure_nats: NatsServer
) -> None:
    await provision_streams(good)
    agent = Agent(
        {
            "name": "tls-agent",
            "version": "1.0.0",
            "description": "answers over TLS",
            "capabilities": [{"action": "echo", "description": "echo", "content_types": []}],
        },
        nats_url=good.nats_url or "",
        register=True,
        heartbeat_interval=0.2,
        connect_options=connect_options(good, name="ignored: the agent names itself"),
    )

    @agent.handler
    async def echo(request: Request) -> bytes:
        return request.payload

    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    nc = await connect(connect_options(good, name="test-observer"), allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        loads = await js.key_value(AGENT_LOAD_BUCKET)

        async def heartbeating() -> bool:
            return any(agent.instance in key for key in await _keys(loads))

        assert await await_until(heartbeating, timeout=15)
        registered = await js.get_last_msg(Stream.REGISTRY, "reg.default.agent.tls-agent")
        assert registered.data
        agent_conns = [
            c for c in connections(secure_nats) if str(c.get("name", "")).startswith("agent-")
        ]
        assert agent_conns
        assert all(c["tls_version"] == "1.3" for c in agent_conns)
        assert all(c["authorized_user"] == "broker" for c in agent_conns)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await nc.close()


async def _keys(bucket: KeyValue) -> list[str]:
    try:
        return list(await bucket.keys())
    except NoKeysError:
        return []


# --- refusals ----------------------------------------------------------------------------


async def test_a_wrong_password_is_refused_and_the_message_names_the_settings(
    good: Settings,
) -> None:
    wrong = good.model_copy(update={"nats_password": SecretStr("not the password")})
    message = await refused(wrong)
    assert "refused the credentials" in message
    assert "BROKER_NATS_PASSWORD" in message
    assert "not the password" not in message


async def test_no_client_certificate_is_refused(good: Settings) -> None:
    anonymous = good.model_copy(update={"nats_tls_cert": None, "nats_tls_key": None})
    message = await refused(anonymous)
    assert "client certificate" in message
    assert "BROKER_NATS_TLS_CERT" in message


async def test_a_client_certificate_from_an_unknown_ca_is_refused(good: Settings, pki: Pki) -> None:
    stranger = good.model_copy(
        update={"nats_tls_cert": pki.unknown_client.cert, "nats_tls_key": pki.unknown_client.key}
    )
    message = await refused(stranger)
    assert "client certificate" in message


async def test_a_server_certificate_from_a_ca_we_do_not_trust_is_refused(
    good: Settings, pki: Pki
) -> None:
    other_ca = good.model_copy(update={"nats_tls_ca": pki.unknown_ca.cert})
    message = await refused(other_ca)
    assert "server's certificate was refused" in message
    assert "BROKER_NATS_TLS_CA" in message


async def test_without_tls_settings_the_server_certificate_is_not_trusted(
    good: Settings,
) -> None:
    """The server requires TLS; nats-py then tries it with the system CAs only."""
    plain = good.model_copy(
        update={"nats_tls_ca": None, "nats_tls_cert": None, "nats_tls_key": None}
    )
    message = await refused(plain)
    assert "server's certificate was refused" in message


async def test_tls_settings_against_a_plaintext_server_fail_every_attempt_and_say_why(
    pki: Pki, nats_server: NatsServer
) -> None:
    """The upgrade fails the handshake, before any credential is sent. nats-py's close after
    that failed attempt used to wait for good (the socket was the TLS protocol's by then):
    the second attempt never came, and a command with retries hung."""
    settings = Settings(nats_tls_ca=pki.ca.cert, nats_connect_timeout=2.0)
    options = connect_options(settings, name="test-plaintext", servers=nats_server.url)
    with pytest.raises(NatsConnectFailed) as failure:
        await asyncio.wait_for(connect(options, **ONE_SHOT), 20)
    assert "did not answer in TLS" in failure.value.message
    assert "plaintext port" in failure.value.message


async def test_a_tls_url_is_tls_even_without_tls_settings(nats_server: NatsServer) -> None:
    """nats-py upgrades a ``tls://`` connection only when the server's INFO asks for TLS: to
    a plaintext server (or anything on the path that leaves ``tls_required`` out) it spoke
    in plaintext, credentials included."""
    url = nats_server.url.replace("nats://", "tls://")
    options = connect_options(Settings(nats_connect_timeout=2.0), name="test-tls-url", servers=url)
    with pytest.raises(NatsConnectFailed) as failure:
        await asyncio.wait_for(connect(options, **ONE_SHOT), 20)
    assert "did not answer in TLS" in failure.value.message


async def test_a_reconnecting_publisher_logs_why_without_the_password(good: Settings) -> None:
    wrong = good.model_copy(update={"nats_password": SecretStr("leaked?")})
    publisher = Publisher(
        [good.nats_url or ""], name="test-wrong", connect_options=connect_options(wrong, name="x")
    )
    with capture_logs() as logs:
        publisher.start()
        try:

            async def explained() -> bool:
                return any("refused the credentials" in str(e.get("error")) for e in logs)

            assert await await_until(explained, timeout=10)
            assert not publisher.connected
        finally:
            await publisher.close()
    assert "leaked?" not in repr(logs)


# --- settings checked before connecting ------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"nats_tls_key": None}, "BROKER_NATS_TLS_CERT and BROKER_NATS_TLS_KEY go together"),
        ({"nats_tls_ca": Path("/nonexistent/ca.pem")}, "is not a readable file"),
        ({"nats_token": SecretStr("t")}, "choose one kind of NATS credentials"),
        ({"nats_user": None}, "BROKER_NATS_PASSWORD is set without BROKER_NATS_USER"),
    ],
    ids=["cert-without-key", "missing-ca", "user-and-token", "password-without-user"],
)
def test_contradictory_or_unreadable_settings_are_refused_before_connecting(
    good: Settings, update: dict[str, Any], expected: str
) -> None:
    with pytest.raises(InvalidNatsSettings, match=expected):
        connect_options(good.model_copy(update=update), name="never")


def test_a_ca_file_that_is_not_a_certificate_is_refused(good: Settings, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(InvalidNatsSettings, match="holds no usable CA"):
        connect_options(good.model_copy(update={"nats_tls_ca": garbage}), name="never")


def test_the_options_carry_the_secrets_only_as_plain_values_for_nats_py(good: Settings) -> None:
    options = connect_options(good, name="n", servers="nats://a:4222, nats://b:4222")
    assert options["servers"] == ["nats://a:4222", "nats://b:4222"]
    assert options["user"] == "broker"
    assert options["password"] == PASSWORD
    assert "token" not in options
    assert options["connect_timeout"] == 3
    assert options["tls"].verify_mode.name == "CERT_REQUIRED"
    assert options["tls"].check_hostname
    assert PASSWORD not in repr(good)  # the settings themselves keep it a SecretStr
