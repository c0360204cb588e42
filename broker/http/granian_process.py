"""The granian process: ``python -m broker.http.granian_process`` (started by ``broker serve``).

Reads its settings from ``BROKER_*`` like the workers it spawns. It runs in its own session,
so a terminal's Ctrl-C reaches only ``broker serve``, which then stops it with exactly one
SIGTERM: granian's supervisor was seen to deadlock when a second stop signal arrived while
it was handling the first.
"""

from __future__ import annotations

import signal

from broker._process import die_with_parent
from broker.logs import configure_logging, granian_log_config
from broker.settings import get_settings


def main() -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP2Settings

    die_with_parent(signal.SIGTERM)
    configure_logging()
    settings = get_settings()
    Granian(
        "broker.http.app:create_app",
        factory=True,
        interface=Interfaces.RSGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=HTTPModes.auto,
        websockets=False,
        http2_settings=HTTP2Settings(
            max_headers_size=settings.max_header_list_bytes,
            max_concurrent_streams=settings.max_concurrent_streams,
        ),
        ssl_cert=settings.tls_cert,
        ssl_key=settings.tls_key,
        log_access=False,
        log_dictconfig=granian_log_config(),
        respawn_failed_workers=True,
        workers_kill_timeout=10,  # a worker that ignores the stop signal is killed
    ).serve()


if __name__ == "__main__":
    main()
