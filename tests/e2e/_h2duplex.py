"""A minimal full-duplex HTTP/2 client (httpx sends the whole body before reading)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events


class DuplexStream:
    """One HTTP/2 request whose body is sent piece by piece while the response is read."""

    def __init__(
        self, host: str, port: int, path: str, headers: dict[str, str], method: str = "POST"
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.stream_id = self.conn.get_next_available_stream_id()
        request = [
            (":method", method),
            (":path", path),
            (":scheme", "http"),
            (":authority", f"{host}:{port}"),
            *headers.items(),
        ]
        self.conn.send_headers(self.stream_id, request)
        self.sock.sendall(self.conn.data_to_send())
        self.status: int | None = None
        self.body = b""
        self.ended = False

    def send(self, data: bytes, *, end: bool = False) -> None:
        """Send ``data`` within HTTP/2 flow control, reading the peer's window updates."""
        view = memoryview(data)
        while view and not self.ended:
            window = min(
                self.conn.local_flow_control_window(self.stream_id),
                self.conn.max_outbound_frame_size,
            )
            if window <= 0:
                self._pump()
                continue
            self.conn.send_data(self.stream_id, bytes(view[:window]))
            self.sock.sendall(self.conn.data_to_send())
            view = view[window:]
        if end:
            self.end()

    def end(self) -> None:
        self.conn.end_stream(self.stream_id)
        self.sock.sendall(self.conn.data_to_send())

    def read_until(self, predicate: Callable[[DuplexStream], bool]) -> None:
        """Read frames until ``predicate(self)`` holds or the stream ends."""
        while not predicate(self) and not self.ended:
            self._pump()

    def _pump(self) -> None:
        """Read once from the socket and process what arrived."""
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended = True
        self.sock.sendall(self.conn.data_to_send())

    def lines(self) -> list[bytes]:
        return [line for line in self.body.split(b"\n") if line]

    def close(self) -> None:
        self.sock.close()
