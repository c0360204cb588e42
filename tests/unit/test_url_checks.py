"""The checks every command runs on its NATS and replica URLs before connecting to anything:
``nats_url_problem`` takes what nats-py connects with and refuses what names no server;
``replica_problem`` refuses an in-memory SQLite database, which holds no replica."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from broker import natsconn
from broker.natsconn import nats_url_problem
from broker.server import replica_problem

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "urls",
    [
        "nats://127.0.0.1:4222",
        "nats://n1:4222,nats://n2:4222,nats://n3:4222",
        " nats://n1:4222 , n2:4222,",  # spaces around each, a trailing comma
        "tls://nats.example.com:4443",
        "nats://nats.example.com",  # nats-py adds :4222
        "localhost",
        "127.0.0.1:4222",
        "nats://[::1]:4222",
        f"nats://user:{SECRET}@127.0.0.1:4222",
        f"user:{SECRET}@127.0.0.1:4222",
        "nats://user:p@ss word:x@127.0.0.1:4222",  # nats-py sends the password as it is
        "ws://127.0.0.1:8080,wss://nats.example.com/path",
    ],
)
def test_urls_nats_py_connects_with_pass(urls: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(natsconn, "websockets_available", lambda: True)
    assert nats_url_problem(urls) is None
    servers = [url.strip() for url in urls.split(",") if url.strip()]
    Client()._setup_server_pool(servers)  # nats-py's own reading takes them too


@pytest.mark.parametrize(
    ("urls", "said"),
    [
        ("nats://h:notaport", "its port is not a number"),
        ("nats://h:0", "its port is not a number"),
        ("nats://h:65536", "its port is not a number"),
        (f"nats://u:{SECRET}@h:notaport", "set BROKER_NATS_USER and BROKER_NATS_PASSWORD"),
        (f"nats://u:{SECRET}/x@h:4222", "a password with / ? or # cannot be written"),
        ("bogus://x", "its scheme is not nats, tls, ws or wss"),
        ("NATS://h:4222", "its scheme is not"),
        ("nats://", "it names no host"),
        ("nats://:4222", "it names no host"),
        ("nats://a b:4222", "its host or port holds a space"),
        ("nats://h:4222\n", None),  # stripped, as a list's pieces are
        ("nats://h\x00:4222", "its host or port holds a space or a control character"),
        ("nats://h:42 22", "its host or port holds a space"),
        ("", "names no NATS server"),
        (" , ", "names no NATS server"),
        ("nats://n1:4222,nats://n2:x", "nats://n2:x is not a NATS server URL"),
        ("ws://n1:8080,nats://n2:4222", "mixes ws:// or wss:// with other schemes"),
    ],
)
def test_urls_that_name_no_server_are_refused_naming_the_option(
    urls: str, said: str | None
) -> None:
    problem = nats_url_problem(urls)
    if said is None:
        assert problem is None
        return
    assert problem is not None
    assert problem.startswith("--nats-url"), problem
    assert said in problem
    assert SECRET not in problem


def test_the_option_named_is_the_callers() -> None:
    problem = nats_url_problem("bogus://x", option="BROKER_NATS_URL")
    assert problem is not None
    assert problem.startswith("BROKER_NATS_URL: bogus://x ")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://"])
def test_an_in_memory_sqlite_replica_is_refused(url: str) -> None:
    problem = replica_problem(url)
    assert problem is not None
    assert "in-memory SQLite database, which holds no replica" in problem


@pytest.mark.parametrize(
    "url", [None, "sqlite:///replica.db", "sqlite:////var/lib/broker/replica.db"]
)
def test_a_sqlite_file_or_the_default_replica_passes(url: str | None) -> None:
    assert replica_problem(url) is None


def test_websocket_urls_without_aiohttp_are_refused_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nats-py's WebSocket transport needs aiohttp, which nothing installed: the URL passed
    and every connect attempt failed with an ImportError."""
    monkeypatch.setattr(natsconn, "websockets_available", lambda: False)
    problem = nats_url_problem(f"wss://user:{SECRET}@nats.example.com:443")
    assert problem is not None
    assert "need the aiohttp package" in problem
    assert "agent-broker[websocket]" in problem
    assert SECRET not in problem
    assert nats_url_problem("nats://n1:4222") is None  # only WebSocket URLs need it
