"""The granian process: ``python -m broker.http.granian_process [--stop-timeout S]`` (started
by ``broker serve``).

Reads its settings from ``BROKER_*`` like the workers it spawns. It runs in its own session,
so a terminal's Ctrl-C reaches only ``broker serve``, which then stops it with exactly one
SIGTERM: granian's supervisor was seen to deadlock when a second stop signal arrived while
it was handling the first. After that SIGTERM its workers finish the requests in flight for
up to ``--stop-timeout`` (serve's) less a margin (:func:`workers_kill_timeout`), then are
killed. If it cannot start (its port was taken after serve checked it, say) it says why on
one line and exits with 2, a usage error, as a child whose settings are wrong does.

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
present a certificate that chains to that CA, or the handshake fails (mTLS), and one that
``BROKER_TLS_CRL``'s revocation lists name is refused. SIGHUP (which ``broker serve`` sends
once it has checked the files again) makes granian start its workers anew, each reading the
TLS files as it starts. See :func:`tls_options` and docs/tls.md.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import TYPE_CHECKING, TypedDict

from broker._process import die_with_parent, kill_group_after_parent
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
#: The largest frame a client may send (SETTINGS_MAX_FRAME_SIZE): one stream's window.
HTTP2_MAX_FRAME = HTTP2_STREAM_WINDOW
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
        # Frames as large as a stream's window (the protocol's default is 16 kB): a Python
        # client sending a 200 kB message paid per frame, and published 40 % more of them
        # a second with these. Flow control still bounds what a client may send unread.
        max_frame_size=HTTP2_MAX_FRAME,
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
    ssl_crl: list[Path]
    ssl_client_verify: bool


def tls_options(settings: Settings) -> TLSOptions:
    """granian's TLS arguments: TLS 1.3 minimum; client certificates required and verified
    against ``tls_client_ca`` when it is set, and against its revocation lists (``tls_crl``).
    Without a certificate and key, plain h2c."""
    from granian.constants import SSLProtocols

    return TLSOptions(
        ssl_cert=settings.tls_cert,
        ssl_key=settings.tls_key,
        ssl_protocol_min=SSLProtocols.tls13,
        ssl_ca=settings.tls_client_ca,
        ssl_crl=settings.tls_crl_files,
        ssl_client_verify=settings.tls_client_ca is not None,
    )


#: Seconds of serve's stop timeout left to granian to kill its late workers and exit before
#: ``broker serve`` kills it (orphaned workers would then finish their requests unsupervised).
_KILL_MARGIN = 2.0
#: ``broker serve``'s default stop timeout (``--stop-timeout``), for a granian started alone.
DEFAULT_STOP_TIMEOUT = 30.0
#: The exit code of a usage error: ``broker serve`` stops with 4 when the first ingress exits so.
_USAGE_ERROR = 2


def workers_kill_timeout(stop_timeout: float) -> int:
    """Seconds granian's workers get to finish their requests in flight after SIGTERM before
    they are killed: ``stop_timeout`` (all that serve gives the ingress) less a margin for
    granian to kill them and exit; at least 1. It was a fixed 10 s: ``--stop-timeout 60`` cut
    a 40 s request off at 10 s."""
    return max(1, math.floor(stop_timeout - _KILL_MARGIN))


#: Seconds granian and its workers live on once ``broker serve`` is gone (SIGKILLed): its
#: SIGTERM starts their graceful stop, and this bounds it (see kill_group_after_parent).
_ORPHAN_GRACE_SECONDS = 5.0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m broker.http.granian_process")
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT)
    return parser.parse_args(argv)


def _worker_signals_until_ready() -> None:
    """In each worker granian forks, until the worker installs its own stop handler: SIGTERM
    ends it (it holds no socket, connection or request yet). The handler it inherits is
    granian's main process's, which sets flags on the worker's own copy of the server that
    nothing reads: a worker still loading the app (about a second, longer under load) when
    granian stopped it swallowed the signal, started serving, and granian waited its kill
    timeout (28 s) for it, at a normal stop as after a SIGKILL of `broker serve`. SIGINT is
    ignored, as the worker itself sets it once started."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, TaskImpl

    parent = os.getppid()
    die_with_parent(signal.SIGTERM, parent=parent)
    kill_group_after_parent(parent, _ORPHAN_GRACE_SECONDS)
    configure_logging()
    arguments = _arguments(argv)
    settings = get_settings()
    http1, http2 = http_settings(settings)
    server = Granian(
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
        # A worker that has not finished its requests by then is killed.
        workers_kill_timeout=workers_kill_timeout(arguments.stop_timeout),
    )
    listening = False

    def _listening() -> None:  # granian's start-up hooks run once its socket is bound
        nonlocal listening
        listening = True

    server.on_startup(_listening)
    os.register_at_fork(after_in_child=_worker_signals_until_ready)
    try:
        server.serve()
    except Exception as e:
        if listening:
            raise
        # Not a traceback (with RUST_BACKTRACE, ninety lines of it): what is wrong, on one line.
        reason = next(iter(str(e).splitlines()), "") or type(e).__name__
        where = f"{settings.host}:{settings.port}"
        print(f"error: the ingress cannot start on {where}: {reason}", file=sys.stderr, flush=True)
        sys.exit(_USAGE_ERROR)


if __name__ == "__main__":
    main()
