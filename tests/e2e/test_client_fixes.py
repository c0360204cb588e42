"""The Python client and JWT claims against the real server: agent writes whose answer was
lost, subjects and names that must stay one path segment, identity providers' tokens."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

from broker.client import BrokerClient
from broker.embedded import NatsServer
from broker.errors import InvalidSubject, Unavailable, Unprocessable
from tests.e2e._broker import BrokerProcess, start_broker, stored_count

pytestmark = pytest.mark.e2e

_HEADERS_FRAME = 0x1


class AnswerDropper:
    """A TCP proxy in front of the broker. Armed, it passes the next connection's request
    on but drops everything the broker sends back, and cuts that connection as soon as the
    broker starts answering a request (an HTTP/2 HEADERS frame on a stream): the request was
    done, its answer lost. Later connections pass both ways."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = False
        self.connections = 0
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._open:
            writer.close()  # ends the pipes still passing answers
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop, self.armed = self.armed, False
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._open |= {client_w, broker_w}
        upward = asyncio.create_task(_pipe(client_r, broker_w))
        if drop:
            await _until_answered(broker_r)
            self.cut.set()
        else:
            await _pipe(broker_r, client_w)
        upward.cancel()
        await asyncio.gather(upward, return_exceptions=True)
        for writer in (client_w, broker_w):
            writer.close()
            self._open.discard(writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass


async def _until_answered(reader: asyncio.StreamReader) -> None:
    """Read HTTP/2 frames until one is a response's HEADERS (or the connection ends)."""
    buffer = b""
    while chunk := await reader.read(65536):
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, stream = buffer[3], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            if kind == _HEADERS_FRAME and stream:
                return
            buffer = buffer[9 + length :]


@pytest_asyncio.fixture
async def dropper(broker: BrokerProcess) -> AsyncIterator[tuple[AnswerDropper, str]]:
    proxy = AnswerDropper(broker.port)
    url = await proxy.start()
    yield proxy, url
    await proxy.close()


def manifest(name: str, version: str = "1.0.0") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "description": "Summarises documents.",
        "capabilities": [{"action": "summarise", "content_types": ["text/plain"]}],
    }


async def test_an_unconditional_agent_write_whose_answer_was_lost_is_not_repeated(
    broker: BrokerProcess, dropper: tuple[AnswerDropper, str]
) -> None:
    """Repeated, the put was answered ``changed=False`` for the call that registered the
    agent, and the delete ``NotFound`` for the call that deregistered it. Now each says
    that its outcome is unknown, and was sent once."""
    proxy, url = dropper
    name = f"lost-{uuid.uuid4().hex[:8]}"
    async with BrokerClient(url, timeout=10) as client:
        proxy.armed, proxy.connections = True, 0
        with pytest.raises(Unavailable, match="may or may not have been done"):
            await client.put_agent(manifest(name))
        assert proxy.cut.is_set()
        assert proxy.connections == 1
        proxy.armed, proxy.connections = True, 0
        proxy.cut.clear()
        with pytest.raises(Unavailable, match="may or may not have been done"):
            await client.delete_agent(name)
        assert proxy.cut.is_set()
        assert proxy.connections == 1
    async with BrokerClient(broker.base_url) as direct:
        history = [e["type"] for e in await direct.agent_history(name)]
    assert history == ["AgentRegistered", "AgentDeregistered"]


async def test_a_conditional_agent_write_whose_answer_was_lost_is_retried(
    broker: BrokerProcess, dropper: tuple[AnswerDropper, str]
) -> None:
    """With ``if_match`` a repeat is safe: the broker answers it ``changed=False``."""
    proxy, url = dropper
    name = f"lost-if-{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as direct:
        first = await direct.put_agent(manifest(name))
    async with BrokerClient(url, timeout=10) as client:
        proxy.armed = True
        updated = await client.put_agent(manifest(name, "1.1.0"), if_match=first.seq)
        assert proxy.cut.is_set()
        assert (updated.changed, updated.seq > first.seq) == (False, True)
    async with BrokerClient(url, timeout=10) as client:  # a new connection, to be cut
        proxy.armed = True
        proxy.cut.clear()
        deleted = await client.delete_agent(name, if_match=updated.seq)
        assert proxy.cut.is_set()
        assert deleted.changed is False
    async with BrokerClient(broker.base_url) as direct:
        history = [e["type"] for e in await direct.agent_history(name)]
    assert history == ["AgentRegistered", "AgentUpdated", "AgentDeregistered"]


@pytest.mark.parametrize(
    "suffix", ["?wait=true", "#fragment", "%2Eescaped", "/slash", "?timeout=1&wait=true"]
)
async def test_a_subject_stays_one_path_segment(
    broker: BrokerProcess, module_nats: NatsServer, suffix: str
) -> None:
    """``?``, ``#`` and ``%`` in a subject went into the URL as they were: ``a?wait=true``
    published to ``a`` with ``wait=true``, ``a%2Eescaped`` to ``a.escaped``. Now the
    broker sees the subject as given and refuses it (422 invalid_subject), storing nothing."""
    prefix = f"seg{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as client:
        with pytest.raises(InvalidSubject):
            await client.publish(prefix + suffix, b"x")
        with pytest.raises(InvalidSubject):
            await client.route(prefix + suffix, b"x")
    assert await stored_count(module_nats.url, f"msg.default.{prefix}.>") == 0
    assert await stored_count(module_nats.url, f"msg.default.{prefix}") == 0


@pytest.mark.parametrize("subject", [".", ".."])
async def test_a_dot_subject_is_not_a_dot_segment(broker: BrokerProcess, subject: str) -> None:
    """``.`` as a path segment made ``POST /v1/publish/.`` a batch publish to ``/v1/publish``."""
    async with BrokerClient(broker.base_url) as client:
        with pytest.raises(InvalidSubject):
            await client.publish(subject, [{"data": 1}])


async def test_an_agent_name_cannot_reach_another_path(broker: BrokerProcess) -> None:
    """The server decodes ``%2F`` before it routes: ``x/history`` read x's history."""
    name = f"seg-{uuid.uuid4().hex[:8]}"
    async with BrokerClient(broker.base_url) as client:
        await client.put_agent(manifest(name))
        for bad in (f"{name}/history", f"{name}?x=1", ".."):
            with pytest.raises(Unprocessable, match="agent name"):
                await client.get_agent(bad)
            with pytest.raises(Unprocessable, match="agent name"):
                await client.delete_agent(bad)
        assert (await client.get_agent(name))["name"] == name


JWT_SECRET = "f" * 48


@pytest.fixture(scope="module")
def jwt_broker(module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = "jwt:\n  algorithms: [HS256]\n  secret_env: FIXES_TEST_JWT_SECRET"
    env = {"BROKER_AUTH_CONFIG": config, "FIXES_TEST_JWT_SECRET": JWT_SECRET}
    process = start_broker(
        Path(tmp_path_factory.mktemp("jwt")),
        nats_url=module_nats.url,
        env=env,
        args=("--projection-workers", "0"),
    )
    yield process.base_url
    process.stop()


def bearer(**claims: Any) -> dict[str, str]:
    body = {"exp": int(time.time()) + 60, **claims}
    return {"authorization": "Bearer " + jwt.encode(body, JWT_SECRET, algorithm="HS256")}


def test_identity_provider_tokens(jwt_broker: str) -> None:
    """Scopes the broker does not know are ignored (they refused the token with 401); a
    token left with none of its scopes may read agents and gets 403 for publishing; a
    string tenant claim is one tenant (``acme corp`` granted ``acme`` and ``corp``)."""
    with httpx.Client(base_url=jwt_broker, http1=False, http2=True, timeout=20) as http:
        oidc = bearer(tenant="shop", scope="openid profile publish")
        assert http.post("/v1/publish/idp.x", content=b"x", headers=oidc).status_code == 200
        bare = bearer(tenant="shop", scope="openid profile")
        r = http.post("/v1/publish/idp.x", content=b"x", headers=bare)
        assert (r.status_code, r.json()["error_code"]) == (403, "forbidden")
        assert http.get("/v1/agents", headers=bare).status_code == 200
        two = bearer(tenant="acme corp", scope="publish")
        r = http.post("/v1/publish/idp.x", content=b"x", headers={**two, "broker-tenant": "corp"})
        assert (r.status_code, r.json()["error_code"]) == (401, "unauthenticated")
        assert "tenant 'acme corp' must be" in r.json()["message"]
        listed = bearer(tenant=["acme", "corp"], scope="publish")
        as_corp = {**listed, "broker-tenant": "corp"}
        r = http.post("/v1/publish/idp.x", content=b"x", headers=as_corp)
        assert r.status_code == 200
