"""``/metrics`` for a process started on its own (``broker worker``, ``broker router``).

Under ``broker serve`` every child writes to one multiprocess directory and the ingress's
``/metrics`` shows them all. A worker or router started by itself (compose, another
machine) has nobody to show its metrics, so ``--metrics-port`` serves them from a small
HTTP/1.1 server on a background thread: ``GET /metrics`` (Prometheus text) and ``GET
/healthz``. Values are at most one flush interval old (:data:`metrics.FLUSH_SECONDS`): the
hot paths count in memory and the recording thread flushes them on its timer.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from broker.telemetry import metrics

log = structlog.get_logger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server_version = "broker-metrics"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type, status = metrics.render(), metrics.CONTENT_TYPE, 200
        elif path == "/healthz":
            body, content_type, status = b'{"status":"ok"}', "application/json", 200
        else:
            body = b'{"error_code":"not_found","message":"try /metrics"}'
            content_type, status = "application/json", 404
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        return


def serve_metrics(host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the server (its
    ``server_address`` has the port when ``port`` is 0). Raises ``OSError`` if it cannot bind."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics_listening", host=host, port=server.server_address[1])
    return server
