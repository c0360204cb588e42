"""The granian process: ``python -m broker.http.granian_process`` (started by ``broker serve``).

Reads its settings from ``BROKER_*`` like the workers it spawns. It runs in its own session,
so a terminal's Ctrl-C reaches only ``broker serve``, which then stops it with exactly one
SIGTERM: granian's supervisor was seen to deadlock when a second stop signal arrived while
it was handling the first.

The HTTP limits are set here on purpose rather than left to granian's defaults (whose HTTP/2
header list limit is 16 MiB). What one connection can make the server hold is bounded by:

- headers: ``BROKER_MAX_HEADER_LIST_BYTES`` per request (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE;
  the HTTP/1 read buffer is sized from it), times at most ``BROKER_MAX_CONCURRENT_STREAMS``;
- unread body bytes: the flow-control windows below (a client cannot send past them), and the
  broker reads at most ``max_*_bytes`` of a body (413) within ``BROKER_BODY_READ_TIMEOUT``
  (408), see ``broker.http._rsgi.read_body``;
- idle or dead peers: HTTP/2 keep-alive pings close a connection whose peer stops answering,
  and HTTP/1 clients must send their headers within ``HTTP1_HEADER_READ_TIMEOUT_MS``.

TLS (``BROKER_TLS_CERT`` + ``BROKER_TLS_KEY``): granian (rustls) serves HTTPS on the port,
offers ALPN ``h2`` and ``http/1.1``, and accepts TLS 1.3 only (``ssl_protocol_min``);
plaintext and TLS 1.2 handshakes fail. With ``BROKER_TLS_CLIENT_CA`` every client must
present a certificate that chains to that CA, or the handshake fails (mTLS). See
:func:`tls_options` and docs/tls.md.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, TypedDict

from broker._process import die_with_parent
from broker.logs import configure_logging, granian_log_config
from broker.settings import Settings, get_settings

if TYPE_CHECKING:
    from pathlib import Path

    from granian.constants import SSLProtocols
    from granian.http import HTTP1Settings, HTTP2Settings

#: One stream may have this much body in flight (enough for a 1 MiB message in one window).
HTTP2_STREAM_WINDOW = 1024 * 1024
#: All streams of one connection together: the most unread body a connection can buffer.
HTTP2_CONNECTION_WINDOW = 2 * 1024 * 1024
#: Ping an idle HTTP/2 connection this often; no answer within the timeout closes it.
HTTP2_KEEP_ALIVE_INTERVAL_MS = 30_000
HTTP2_KEEP_ALIVE_TIMEOUT_S = 20
#: An HTTP/1 client must send its whole request head within this time.
HTTP1_HEADER_READ_TIMEOUT_MS = 10_000
#: hyper's smallest HTTP/1 read buffer.
_HTTP1_MIN_BUFFER = 8192


def http_settings(settings: Settings) -> tuple[HTTP1Settings, HTTP2Settings]:
    """granian's HTTP/1 and HTTP/2 settings, every limit chosen (none left to its defaults)."""
    from granian.http import HTTP1Settings, HTTP2Settings

    http1 = HTTP1Settings(
        header_read_timeout=HTTP1_HEADER_READ_TIMEOUT_MS,
        keep_alive=True,
        # The read buffer bounds a request head: a larger one is refused (431).
        max_buffer_size=max(_HTTP1_MIN_BUFFER, settings.max_header_list_bytes),
        pipeline_flush=False,
    )
    http2 = HTTP2Settings(
        adaptive_window=False,  # fixed windows: a fast client cannot grow our buffers
        initial_connection_window_size=HTTP2_CONNECTION_WINDOW,
        initial_stream_window_size=HTTP2_STREAM_WINDOW,
        keep_alive_interval=HTTP2_KEEP_ALIVE_INTERVAL_MS,
        keep_alive_timeout=HTTP2_KEEP_ALIVE_TIMEOUT_S,
        max_concurrent_streams=settings.max_concurrent_streams,
        max_frame_size=16 * 1024,  # the protocol's default; larger frames buy nothing here
        max_headers_size=settings.max_header_list_bytes,
        max_send_buffer_size=400 * 1024,
    )
    return http1, http2


class TLSOptions(TypedDict):
    """granian's TLS keyword arguments."""

    ssl_cert: Path | None
    ssl_key: Path | None
    ssl_protocol_min: SSLProtocols
    ssl_ca: Path | None
    ssl_client_verify: bool


def tls_options(settings: Settings) -> TLSOptions:
    """granian's TLS arguments: TLS 1.3 minimum; client certificates required and verified
    against ``tls_client_ca`` when it is set. Without a certificate and key, plain h2c."""
    from granian.constants import SSLProtocols

    return TLSOptions(
        ssl_cert=settings.tls_cert,
        ssl_key=settings.tls_key,
        ssl_protocol_min=SSLProtocols.tls13,
        ssl_ca=settings.tls_client_ca,
        ssl_client_verify=settings.tls_client_ca is not None,
    )


def main() -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, TaskImpl

    die_with_parent(signal.SIGTERM)
    configure_logging()
    settings = get_settings()
    http1, http2 = http_settings(settings)
    Granian(
        "broker.http.app:create_app",
        factory=True,
        interface=Interfaces.RSGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=HTTPModes.auto,
        websockets=False,
        # Each request an asyncio task with a copy of the context: the trace context a
        # request makes current stays its own (granian's Rust tasks share one context).
        task_impl=TaskImpl.asyncio,
        http1_settings=http1,
        http2_settings=http2,
        **tls_options(settings),
        log_access=False,
        log_dictconfig=granian_log_config(),
        respawn_failed_workers=True,
        workers_kill_timeout=10,  # a worker that ignores the stop signal is killed
    ).serve()


if __name__ == "__main__":
    main()
