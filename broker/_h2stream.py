"""One full-duplex HTTP/2 request on asyncio (httpx sends the whole body before reading).

Used by :meth:`broker.client.BrokerClient.publish_stream`: the request body is written from
an async iterator while response data is read and handed out as it arrives.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events

from broker.errors import Unavailable


class DuplexRequest:
    """``async for chunk in DuplexRequest(url, headers).exchange(body_chunks)``."""

    def __init__(
        self, url: str, headers: dict[str, str], *, ssl_context: ssl.SSLContext | None = None
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
        self.status: int | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = None
        if self._tls:
            context = self._ssl or ssl.create_default_context()
            context.set_alpn_protocols(["h2"])
        try:
            reader, writer = await asyncio.open_connection(self._host, self._port, ssl=context)
        except OSError as e:
            raise Unavailable(f"cannot reach the broker: {e}") from e
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
        conn, stream_id = self._conn, self._stream_id
        async for chunk in body:
            view = memoryview(chunk)
            while view:
                room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if room <= 0:  # wait for the server to read: flow control is the backpressure
                    self._window_opened.clear()
                    await self._window_opened.wait()
                    continue
                conn.send_data(stream_id, bytes(view[:room]))
                writer.write(conn.data_to_send())
                view = view[room:]
            await writer.drain()
        conn.end_stream(stream_id)
        writer.write(conn.data_to_send())

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
                    elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        return
                writer.write(self._conn.data_to_send())
        finally:
            await self._received.put(None)

    async def exchange(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """Send ``body`` and yield response data as it arrives, both at once."""
        reader, writer = await self._connect()
        sender = asyncio.create_task(self._send_body(body, writer))
        reading = asyncio.create_task(self._read_frames(reader, writer))
        try:
            while (chunk := await self._received.get()) is not None:
                yield chunk
            if sender.done() and (error := sender.exception()) is not None:
                raise error
        finally:
            for task in (sender, reading):
                task.cancel()
            writer.close()
