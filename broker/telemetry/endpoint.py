"""``/metrics`` for a process started on its own (``broker worker``, ``broker router``).

Under ``broker serve`` every child writes to one multiprocess directory and the ingress's
``/metrics`` shows them all. A worker or router started by itself (compose, another
machine) has nobody to show its metrics, so ``--metrics-port`` serves them from a small
HTTP/1.1 server on a background thread: ``GET /metrics`` (Prometheus text) and ``GET
/healthz``. Values are at most one flush interval old (:data:`metrics.FLUSH_SECONDS`): the
hot paths count in memory and the recording thread flushes them on its timer.

With ``BROKER_METRICS_TOKEN`` set, ``/metrics`` here and on the ingress answers only a
scrape that presents it (``Authorization: Bearer <token>``, Prometheus's ``authorization``
setting): the labels name tenants, agents and subjects' streams. ``/healthz`` stays open.

Every connection has :data:`REQUEST_TIMEOUT_SECONDS` for each read and write: one that
sends half a request, or nothing, is closed then instead of holding its thread forever.
"""

from __future__ import annotations

import hmac
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import structlog

from broker.telemetry import metrics

if TYPE_CHECKING:
    from broker.telemetry.tls_expiry import NatsTlsExpiry

log = structlog.get_logger(__name__)


#: The answer to a scrape without the token (the ingress answers the same).
UNAUTHENTICATED = (
    b'{"error_code":"unauthenticated","message":"/metrics needs Authorization: Bearer '
    b'<BROKER_METRICS_TOKEN>"}'
)
WWW_AUTHENTICATE = 'Bearer realm="broker-metrics"'

#: How long a connection may stall on one read or write (a scrape takes milliseconds).
REQUEST_TIMEOUT_SECONDS = 10.0


def scrape_allowed(token: str | None, authorization: str | None) -> bool:
    """Whether a scrape with this ``Authorization`` header may read the metrics: always
    when no token is configured, else only with ``Bearer <token>`` (compared in constant
    time)."""
    if token is None:
        return True
    scheme, _, presented = (authorization or "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented or not token:
        return False
    return hmac.compare_digest(presented.encode(), token.encode())


#: What a scrape of a broker with metrics off is told (404), here and by the ingress.
METRICS_OFF = "metrics are off in this broker (BROKER_METRICS=false)"
_METRICS_OFF = orjson.dumps({"error_code": "not_found", "message": METRICS_OFF})


class _Handler(BaseHTTPRequestHandler):
    server_version = "broker-metrics"
    token: str | None = None  # set on the subclass serve_metrics makes
    nats_tls: NatsTlsExpiry | None = None  # likewise
    timeout: ClassVar[float | None] = REQUEST_TIMEOUT_SECONDS  # setup() applies it

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics" and not scrape_allowed(self.token, self.headers["Authorization"]):
            self._answer(401, UNAUTHENTICATED, "application/json", WWW_AUTHENTICATE)
            return
        if path == "/metrics" and not metrics.enabled():  # as the ingress: not a page of zeros
            body, content_type, status = _METRICS_OFF, "application/json", 404
        elif path == "/metrics":
            body, content_type, status = self._metrics(), metrics.CONTENT_TYPE, 200
        elif path == "/healthz":
            body, content_type, status = b'{"status":"ok"}', "application/json", 200
        else:
            body = b'{"error_code":"not_found","message":"try /metrics"}'
            content_type, status = "application/json", 404
        self._answer(status, body, content_type)

    def _metrics(self) -> bytes:
        if self.nats_tls is None:
            return metrics.render()
        return metrics.render() + metrics.tls_expiry_exposition(self.nats_tls.samples())

    def _answer(
        self, status: int, body: bytes, content_type: str, challenge: str | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if challenge is not None:
            self.send_header("WWW-Authenticate", challenge)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        return


def serve_metrics(
    host: str,
    port: int,
    token: str | None = None,
    *,
    request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    nats_tls: NatsTlsExpiry | None = None,
) -> ThreadingHTTPServer:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread, to scrapes presenting
    ``token`` when one is given; a connection stalled ``request_timeout`` seconds on a read
    or write is closed. With ``nats_tls``, each scrape also tells when the process's NATS
    client certificate and CA stop being valid. Returns the server (its ``server_address``
    has the port when ``port`` is 0). Raises ``OSError`` if it cannot bind."""
    attributes = {"token": token, "timeout": request_timeout, "nats_tls": nats_tls}
    handler = type("_TokenHandler", (_Handler,), attributes)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # a connection's thread never holds up shutdown
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics_listening", host=host, port=server.server_address[1], token=token is not None)
    return server
