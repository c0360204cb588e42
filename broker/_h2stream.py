"""One full-duplex HTTP/2 request on asyncio (httpx sends the whole body before reading).

Used by :meth:`broker.client.BrokerClient.publish_stream`: the request body is written from
an async iterator while response data is read and handed out as it arrives.

A stopping broker (granian) sends GOAWAY, then a PING, and waits for the PING's ACK before
it closes the connection. python-h2 takes a GOAWAY received for the end of the connection
and refuses every frame after it (the PING raises ``ProtocolError``: python-hyper/h2 issue
1199), so the exchange cannot finish on that connection. It ends at once with
:class:`ConnectionLost`, and the socket is closed, which lets the broker stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterable
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from broker.errors import Unavailable


class ConnectionLost(Unavailable):
    """The connection could not be had, failed, or was shut down by the broker (GOAWAY)
    before the response ended: what was sent may or may not have been done, and a new
    connection may well succeed."""


class DuplexRequest:
    """``async for chunk in DuplexRequest(url, headers).exchange(body_chunks)``."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        parts = urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self._headers = headers
        self._ssl = ssl_context
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self._stream_id = 0
        self._window_opened = asyncio.Event()
        self._received: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._connect_timeout = connect_timeout
        self._failure: BaseException | None = None  # why the exchange ended early
        self.ended = False  # the response's END_STREAM arrived
        self.status: int | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = None
        if self._tls:
            context = self._ssl or ssl.create_default_context()
            context.set_alpn_protocols(["h2"])
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=context),
                self._connect_timeout,
            )
        except (OSError, TimeoutError) as e:
            raise ConnectionLost(f"cannot reach the broker: {e!r}") from e
        self._conn.initiate_connection()
        self._stream_id = self._conn.get_next_available_stream_id()
        request = [
            (":method", "POST"),
            (":path", self._path),
            (":scheme", "https" if self._tls else "http"),
            (":authority", f"{self._host}:{self._port}"),
            *self._headers.items(),
        ]
        self._conn.send_headers(self._stream_id, request)
        writer.write(self._conn.data_to_send())
        return reader, writer

    async def _send_body(self, body: AsyncIterable[bytes], writer: asyncio.StreamWriter) -> None:
        """Send ``body``, then end the stream. If the body (the caller's iterator) or the
        connection fails, the stream is reset and the exchange ends with that error: the
        server must not wait for more body, nor the reader for more answers."""
        conn, stream_id = self._conn, self._stream_id
        try:
            async for chunk in body:
                view = memoryview(chunk)
                while view:
                    window = conn.local_flow_control_window(stream_id)
                    room = min(window, conn.max_outbound_frame_size)
                    if room <= 0:  # wait for the server to read: flow control is backpressure
                        self._window_opened.clear()
                        await self._window_opened.wait()
                        continue
                    conn.send_data(stream_id, bytes(view[:room]))
                    writer.write(conn.data_to_send())
                    view = view[room:]
                await writer.drain()
            conn.end_stream(stream_id)
            writer.write(conn.data_to_send())
        except Exception as e:
            if isinstance(e, (OSError, h2.exceptions.ProtocolError)):
                e = ConnectionLost(f"connection to the broker lost: {e!r}")
            self._failure = self._failure or e
            with contextlib.suppress(Exception):
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                writer.write(conn.data_to_send())
            await self._received.put(None)

    async def _read_frames(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                for event in self._conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        headers = {str(k): str(v) for k, v in event.headers or ()}
                        self.status = int(headers.get(":status", "0"))
                    elif isinstance(event, h2.events.DataReceived):
                        self._conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                        await self._received.put(event.data)
                    elif isinstance(event, h2.events.WindowUpdated):
                        self._window_opened.set()
                    elif isinstance(event, h2.events.StreamEnded):
                        self.ended = True
                        return
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self._failure = self._failure or ConnectionLost(
                            "the broker shut the connection down (HTTP/2 GOAWAY, error "
                            f"{event.error_code}) before the response ended"
                        )
                        return
                    elif isinstance(event, h2.events.StreamReset):
                        self._failure = self._failure or Unavailable(
                            f"the broker reset the stream (HTTP/2 error {event.error_code})"
                        )
                        return
                writer.write(self._conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError) as e:
            # A ProtocolError here is h2 refusing the frames after the broker's GOAWAY.
            lost = ConnectionLost(f"connection to the broker lost: {e!r}")
            self._failure = self._failure or lost
        finally:
            await self._received.put(None)

    async def exchange(self, body: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
        """Send ``body`` and yield response data as it arrives, both at once. Raises what
        made the body fail, :class:`ConnectionLost` when the connection ended (or was shut
        down) before the response did, or :class:`Unavailable` when the broker reset the
        stream."""
        reader, writer = await self._connect()
        sender = asyncio.create_task(self._send_body(body, writer))
        reading = asyncio.create_task(self._read_frames(reader, writer))
        try:
            while (chunk := await self._received.get()) is not None:
                yield chunk
            if self._failure is not None:
                raise self._failure
            if not self.ended:
                raise ConnectionLost("the broker closed the connection before the response ended")
        finally:
            for task in (sender, reading):
                task.cancel()
            writer.close()
