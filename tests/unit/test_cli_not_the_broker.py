"""A 2xx answer that is not the broker's (a proxy's login page, ``--url`` pointing at another
server) is exit code 3 and a message naming the URL, not a traceback, nor a wrong answer
printed as if it were the broker's. The fake server speaks real HTTP/2 (h2c) from a thread."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.client import RetryPolicy, SyncBrokerClient, _error
from broker.errors import DeadlineExceeded, Unavailable

pytestmark = pytest.mark.unit

LOGIN_PAGE = (b"<html>please log in</html>", "text/html")
WRONG_SHAPE = (b'{"hello": "world"}', "application/json")
MANIFEST = {
    "name": "summarizer",
    "version": "1.0.0",
    "description": "Summarises documents.",
    "endpoint": "route.default.summarizer",
    "capabilities": [{"action": "summarize", "description": "Shorten a document"}],
}


@dataclass
class Answer:
    """What the fake server answers every request with."""

    body: bytes
    content_type: str
    status: int = 200
    #: The header lists of the requests served so far, in order.
    seen: list[list[tuple[str, str]]] = field(default_factory=list)


def _serve(conn_sock: socket.socket, answer: Answer) -> None:
    """One h2c connection: every request, once its body is in, gets ``answer``."""
    with conn_sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        conn_sock.sendall(conn.data_to_send())
        while data := conn_sock.recv(65535):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    answer.seen.append(
                        [(bytes(k).decode(), bytes(v).decode()) for k, v in event.headers]
                    )
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    headers = [
                        (":status", str(answer.status)),
                        ("content-type", answer.content_type),
                        ("content-length", str(len(answer.body))),
                    ]
                    conn.send_headers(event.stream_id, headers)
                    conn.send_data(event.stream_id, answer.body, end_stream=True)
            conn_sock.sendall(conn.data_to_send())


def _accept(listener: socket.socket, answer: Answer) -> None:
    while True:
        try:
            conn_sock, _ = listener.accept()
        except OSError:  # the listener was closed: the test is over
            return
        threading.Thread(target=_serve, args=(conn_sock, answer), daemon=True).start()


@pytest.fixture
def answer() -> Answer:
    return Answer(*LOGIN_PAGE)


@pytest.fixture
def other_server(answer: Answer) -> Iterator[str]:
    """The URL of a server that answers every request with ``answer``."""
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_accept, args=(listener, answer), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
    listener.close()
    thread.join(5)


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"hello")
    manifest = tmp_path / "summarizer.json"
    manifest.write_text(json.dumps(MANIFEST))
    return {
        "agents list": ["agents", "list"],
        "agents list -o json": ["agents", "list", "-o", "json"],
        "agents get": ["agents", "get", "summarizer"],
        "agents history": ["agents", "history", "summarizer"],
        "agents apply": ["agents", "apply", "-f", str(manifest)],
        "publish": ["publish", "orders.created", str(payload)],
        "replay": ["replay"],
    }


COMMANDS = [
    "agents list",
    "agents list -o json",
    "agents get",
    "agents history",
    "agents apply",
    "publish",
    "replay",
]


@pytest.mark.parametrize("shape", [LOGIN_PAGE, WRONG_SHAPE], ids=["login-page", "wrong-json"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_answer_that_is_not_the_brokers_is_exit_3_with_the_url(
    other_server: str,
    answer: Answer,
    tmp_path: Path,
    command: str,
    shape: tuple[bytes, str],
) -> None:
    answer.body, answer.content_type = shape
    result = CliRunner().invoke(app, [*_commands(tmp_path)[command], "--url", other_server])
    assert result.exit_code == 3, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert f"the answer from {other_server}" in result.output
    assert "is not the broker's" in result.output
    assert '"hello"' not in result.stdout  # the other server's body is not shown as an answer


def test_a_redirect_answered_to_a_replay_is_exit_3(other_server: str, answer: Answer) -> None:
    """A proxy that sends the client to its login page: no messages, not an empty stream."""
    answer.status, answer.body = 302, b""
    result = CliRunner().invoke(app, ["replay", "--url", other_server])
    assert result.exit_code == 3, result.output
    assert "is not the broker's" in result.output


@pytest.mark.parametrize("shape", [LOGIN_PAGE, WRONG_SHAPE], ids=["login-page", "wrong-json"])
@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.publish("orders.created", b"x"),
        lambda c: c.route("orders.created", b"x"),
        lambda c: c.publish_batch([{"subject": "orders.created", "payload": "x"}]),
        lambda c: c.put_agent(MANIFEST),
        lambda c: c.get_agent("summarizer"),
        lambda c: c.list_agents(),
        lambda c: c.delete_agent("summarizer", if_match=1),
        lambda c: c.agent_history("summarizer"),
        lambda c: c.register_schema("s-value", '"string"'),
        lambda c: c.get_schema(1),
        lambda c: c.get_schema_version("s-value"),
        lambda c: c.list_subjects(),
        lambda c: c.check_compatibility("s-value", '"string"'),
        lambda c: c.set_compatibility("BACKWARD"),
    ],
    ids=[
        "publish",
        "route",
        "publish_batch",
        "put_agent",
        "get_agent",
        "list_agents",
        "delete_agent",
        "agent_history",
        "register_schema",
        "get_schema",
        "get_schema_version",
        "list_subjects",
        "check_compatibility",
        "set_compatibility",
    ],
)
def test_the_client_raises_unavailable_for_an_answer_not_the_brokers(
    other_server: str,
    answer: Answer,
    shape: tuple[bytes, str],
    call: Callable[[SyncBrokerClient], object],
) -> None:
    answer.body, answer.content_type = shape
    with SyncBrokerClient(other_server) as client, pytest.raises(Unavailable) as raised:
        call(client)
    assert f"the answer from {other_server}" in raised.value.message


#: A body with every key the SDK's get_agent and `broker status` read.
_EVERY_KEY = json.dumps(
    {
        "name": "summarizer",
        "seq": 1,
        "manifest": MANIFEST,
        **{key: [] for key in ("broker", "generated_at", "streams", "consumers", "agents")},
    }
).encode()


@pytest.mark.parametrize("command", [["agents", "get", "summarizer"], ["status", "--json"]])
def test_a_redirect_is_not_the_brokers_answer_even_with_its_keys(
    other_server: str, answer: Answer, command: list[str]
) -> None:
    """One check for the SDK and every command: a 3xx is a proxy's, whatever it carries."""
    answer.status, answer.body, answer.content_type = 302, _EVERY_KEY, "application/json"
    result = CliRunner().invoke(app, [*command, "--url", other_server])
    assert result.exit_code == 3, result.output
    assert f"the answer from {other_server}" in result.output
    assert "a redirect" in result.output
    assert result.stdout == ""
    with SyncBrokerClient(other_server) as client, pytest.raises(Unavailable) as raised:
        client.get_agent("summarizer")
    assert "a redirect" in raised.value.message


# --- a proxy's errors, and headers the caller passes -----------------------------------------

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.01)


@pytest.mark.parametrize("status", [502, 504])
def test_a_proxys_gateway_error_is_unavailable_and_retried(
    other_server: str, answer: Answer, status: int
) -> None:
    """A load balancer's 502/504 page (no error code) was the broker's AgentFailed or
    DeadlineExceeded, and not retried; the broker's own 502/504 carry their codes."""
    answer.status, answer.body, answer.content_type = status, b"<h1>Bad Gateway</h1>", "text/html"
    with SyncBrokerClient(other_server, retry=FAST) as client, pytest.raises(Unavailable) as raised:
        client.publish("orders.created", b"x")
    assert "a gateway between answered" in raised.value.message
    assert len(answer.seen) == 3  # retried: a publish carries its idempotency key
    assert len({dict(h)["idempotency-key"] for h in answer.seen}) == 1


def test_the_brokers_own_gateway_timeout_keeps_its_error() -> None:
    """The broker's 504 says ``deadline_exceeded``: still DeadlineExceeded, not retried."""
    body = b'{"error_code": "deadline_exceeded", "message": "no reply"}'
    response = httpx.Response(504, content=body, request=httpx.Request("POST", "http://b/x"))
    assert isinstance(_error(response), DeadlineExceeded)


@pytest.mark.parametrize(
    ("status", "body"), [(302, b""), (200, b"<html>hi</html>")], ids=["redirect", "page"]
)
def test_a_reply_without_the_brokers_headers_is_not_taken_for_the_agents(
    other_server: str, answer: Answer, status: int, body: bytes
) -> None:
    """``request()`` took a proxy's redirect (or any 200) for the agent's empty reply."""
    answer.status, answer.body, answer.content_type = status, body, "text/html"
    with SyncBrokerClient(other_server, retry=FAST) as client, pytest.raises(Unavailable) as raised:
        client.request("orders.created", b"x")
    assert "broker-message-seq" in raised.value.message


def test_an_idempotency_key_in_headers_is_the_one_sent(other_server: str, answer: Answer) -> None:
    """``headers={"Idempotency-Key": ...}`` went out beside the client's own fresh key, which
    the broker read: a retried publish was stored twice. Names are compared without case."""
    answer.body, answer.content_type = (
        b'{"stream": "MESSAGES", "seq": 1, "duplicate": false}',
        ("application/json"),
    )
    with SyncBrokerClient(other_server, headers={"X-Api-Key": "k"}) as client:
        client.publish(
            "orders.created",
            b"x",
            headers={"Idempotency-Key": "order-1", "Content-Type": "text/csv"},
        )
        with pytest.raises(ValueError, match="given twice"):
            client.publish("orders.created", b"x", key="a", headers={"Idempotency-Key": "b"})
    sent = answer.seen[0]
    assert [v for k, v in sent if k == "idempotency-key"] == ["order-1"]
    assert [v for k, v in sent if k == "content-type"] == ["text/csv"]
    assert [v for k, v in sent if k == "x-api-key"] == ["k"]
