"""A broker that stops while a CLI command reads its answer (HTTP/2 GOAWAY, then a PING,
which python-h2 refuses) is exit code 3 and a message, not a traceback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import GoAwayFrame, PingFrame
from typer.testing import CliRunner

from broker.cli import app

pytestmark = pytest.mark.unit


def _answer_then_go_away(listener: socket.socket) -> None:
    """Serve one connection: start a 200 answer, then stop as granian does (GOAWAY for
    every stream, then a PING), and close."""
    conn_sock, _ = listener.accept()
    with conn_sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        conn_sock.sendall(conn.data_to_send())
        while data := conn_sock.recv(65535):
            events = conn.receive_data(data)
            conn_sock.sendall(conn.data_to_send())
            requests = [e for e in events if isinstance(e, h2.events.RequestReceived)]
            if requests:
                stream = requests[0].stream_id
                conn.send_headers(
                    stream, [(":status", "200"), ("content-type", "application/json")]
                )
                conn.send_data(stream, b'{"agents": [')
                # python-h2 will not send a PING after a GOAWAY either: raw frames.
                goaway = GoAwayFrame(0)
                goaway.last_stream_id = 2**31 - 1
                ping = PingFrame(0)
                ping.opaque_data = b"stopping"
                conn_sock.sendall(conn.data_to_send())
                # The answer has begun when the stop comes: the client is reading its body.
                time.sleep(0.2)
                conn_sock.sendall(goaway.serialize() + ping.serialize())
                break


@pytest.fixture
def stopping_broker() -> Iterator[str]:
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_answer_then_go_away, args=(listener,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    thread.join(5)


@pytest.mark.parametrize("command", [["agents", "list"], ["status"]])
def test_a_broker_stopping_mid_answer_is_exit_3(stopping_broker: str, command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--url", stopping_broker])
    assert result.exit_code == 3, result.output
    assert "cannot reach the broker" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
