"""With NATS TLS configured, no credential goes out over a connection that is not TLS.

nats-py upgrades a connection to TLS only when the server's first ``INFO`` says
``tls_required``: a server (or anything on the path) that leaves it out was sent the
``CONNECT``, user and password, in clear.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker.natsconn import NatsConnectFailed, connect, connect_options
from broker.settings import Settings
from tests._certs import make_pki

pytestmark = pytest.mark.integration

PASSWORD = "TopSecretPw"


async def test_a_server_that_does_not_ask_for_tls_gets_no_credentials(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def plaintext_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b'INFO {"server_id":"FAKE","version":"2.15.1","proto":1,'
            b'"max_payload":1048576,"headers":true,"auth_required":true}\r\n'
        )
        await writer.drain()
        try:
            received.append(await asyncio.wait_for(reader.read(4096), 5))
            writer.write(b"PONG\r\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(plaintext_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Settings(
        nats_url=f"nats://127.0.0.1:{port}",
        nats_tls_ca=make_pki(tmp_path).ca.cert,
        nats_user="broker",
        nats_password=SecretStr(PASSWORD),
    )
    try:
        with pytest.raises(NatsConnectFailed):
            await connect(
                connect_options(settings, name="downgrade"),
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
    finally:
        server.close()
        await server.wait_closed()
    sent = b"".join(received)
    assert b"CONNECT" not in sent
    assert PASSWORD.encode() not in sent
    assert sent.startswith(b"\x16\x03")  # a TLS ClientHello, not the NATS protocol
