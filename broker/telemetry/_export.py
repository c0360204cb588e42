"""Where ended spans go: span processors at once, exporters in batches on one thread.

:class:`SpanPipeline` is the broker's batch span processor. A span that ends is appended to
a queue (a deque append and a length check on the request's thread); a daemon thread
exports the queue in batches every ``OTEL_BSP_SCHEDULE_DELAY`` milliseconds, or as soon as
``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` spans wait; past ``OTEL_BSP_MAX_QUEUE_SIZE`` waiting
spans new ones are dropped (and counted). The variables and their defaults (5000, 512,
2048) are the OpenTelemetry SDK's.

The OTLP/HTTP exporter gets each batch encoded by :mod:`broker.telemetry._otlp` and sent
with its settings (endpoint, headers, compression, TLS, timeout: all its
``OTEL_EXPORTER_OTLP_*`` variables) over a kept-alive ``http.client`` connection, or through
its own HTTP client where that would do more than a plain POST (proxies, a credential
provider) and for its retries (:class:`_PlainHttpPost`); any other exporter, and every span
processor (a test's ``SimpleSpanProcessor(InMemorySpanExporter())``), gets the SDK's
``ReadableSpan``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gzip
import http.client
import os
import ssl
import threading
import urllib.parse
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from broker.telemetry import _otlp
from broker.telemetry._spans import FinishedSpan, to_readable

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["BatchSettings", "SpanPipeline", "batch_settings"]

log = structlog.get_logger(__name__)

Send = Callable[[Sequence[FinishedSpan]], None]


class BatchSettings:
    """When the pipeline exports (``OTEL_BSP_*``)."""

    __slots__ = ("max_batch", "max_queue", "schedule_delay_s")

    def __init__(self, schedule_delay_s: float, max_queue: int, max_batch: int) -> None:
        self.schedule_delay_s = schedule_delay_s
        self.max_queue = max_queue
        self.max_batch = min(max_batch, max_queue)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        log.warning("otel_setting_invalid", variable=name, value=raw[:40], using=default)
        return default
    if value <= 0:
        log.warning("otel_setting_invalid", variable=name, value=raw[:40], using=default)
        return default
    return value


def batch_settings() -> BatchSettings:
    """The batch settings from ``OTEL_BSP_SCHEDULE_DELAY`` (ms), ``OTEL_BSP_MAX_QUEUE_SIZE``
    and ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``."""
    return BatchSettings(
        _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
        _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
    )


def _otlp_http_post(exporter: SpanExporter) -> Callable[[bytes], Any] | None:
    """The OTLP/HTTP exporter's own client for an encoded request, when this exporter is one
    and its version has it (``_client.export(bytes)``); otherwise ``None``."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:  # pragma: no cover - a dependency of the broker
        return None
    if not isinstance(exporter, OTLPSpanExporter):
        return None
    client = getattr(exporter, "_client", None)
    post = getattr(client, "export", None)
    if not callable(post):
        return None
    return _PlainHttpPost.for_client(client, post) or post


#: Where ``requests`` (the OTLP exporter's HTTP client) would do more than a plain POST: a
#: proxy for the endpoint's scheme.
_PROXY_VARIABLES = {
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
}
#: Where ``requests`` finds its CA bundle when told to verify (``trust_env``), before its own.
_CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def _uncompressed(body: bytes) -> bytes:
    return body


def _compressor(compression: object) -> Callable[[bytes], bytes] | None:
    """The body encoding for ``OTEL_EXPORTER_OTLP_COMPRESSION``: gzip and deflate at level 1.
    (The exporter's client compresses at gzip's default, level 9: on a batch of 512 spans
    2.2 ms of CPU against 0.26 ms at level 1, for a body 1.5 % larger; the collector reads
    any level.)"""
    if compression in {None, "none"}:
        return _uncompressed
    if compression == "gzip":
        return lambda body: gzip.compress(body, compresslevel=1, mtime=0)
    if compression == "deflate":
        return lambda body: zlib.compress(body, 1)
    return None


def _tls_context(transport: Any) -> ssl.SSLContext:
    """The TLS settings the exporter's ``requests`` session would use: its ``verify`` (a CA
    file or directory, or ``True``: ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` where the session
    trusts the environment, else ``requests``' own bundle) and its client certificate and key
    (``cert``). A session told not to verify raises ``ValueError``: ``requests`` may still
    verify it (an environment bundle overrides ``False``), and a plain POST is never to check
    less than the exporter would, so it keeps its own client."""
    from requests.utils import DEFAULT_CA_BUNDLE_PATH

    session = transport._session
    verify, cert = session.verify, session.cert
    if verify is False:
        raise ValueError("the exporter's session does not verify certificates")
    if verify is True or verify is None:
        bundles = (os.environ.get(name) for name in _CA_BUNDLE_VARIABLES)
        from_env = next((b for b in bundles if b), None) if session.trust_env else None
        verify = from_env or DEFAULT_CA_BUNDLE_PATH
    if not isinstance(verify, str):
        raise TypeError(f"verify={verify!r}")
    if os.path.isdir(verify):
        context = ssl.create_default_context(capath=verify)
    else:
        context = ssl.create_default_context(cafile=verify)
    if isinstance(cert, str):
        context.load_cert_chain(cert)
    elif isinstance(cert, tuple):
        context.load_cert_chain(*cert)
    elif cert is not None:
        raise TypeError(f"cert={cert!r}")
    return context


class _PlainHttpPost:
    """The OTLP/HTTP exporter's POST over one kept-alive ``http.client`` connection, for a
    collector reached directly (a sidecar, a node agent, a vendor's endpoint over TLS).

    The exporter's own client sends through ``requests``, which costs about 0.8 ms of CPU per
    request on the benchmark machine against 0.1 ms here, several times that inside a loaded
    ingress, where it was most of the export thread's time; with gzip it compresses at level
    9, another 2 ms per batch of 512 spans. Used when the exporter asks for nothing a plain
    POST cannot do: ``http`` or ``https`` (with the session's CA bundle, ``verify`` and
    client certificate), no compression, gzip or deflate, no proxy in the environment for
    the scheme, no credential provider, no ``.netrc`` entry for the host; the request carries
    the exporter's headers. A send that fails on a kept-alive connection is tried once more on
    a fresh one (a collector closes idle ones); one that fails on a fresh connection, or is
    answered with other than 2xx/3xx, is handed to the exporter's own client, whose retries,
    backoff and logging apply as before. After a failed TLS handshake the CA and client
    certificate files are read again (a rotated certificate is picked up).
    """

    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str],
        timeout: float,
        fallback: Callable[[bytes], Any],
        *,
        compress: Callable[[bytes], bytes] = _uncompressed,
        tls: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(endpoint)
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if tls is not None else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = headers
        self._timeout = timeout
        self._fallback = fallback
        self._compress = compress
        self._tls_factory = tls
        self._tls = tls() if tls is not None else None
        self._tls_failed = False  # read the certificate files again before connecting
        self._connection: http.client.HTTPConnection | None = None
        self._pid = os.getpid()

    @classmethod
    def for_client(cls, client: Any, fallback: Callable[[bytes], Any]) -> _PlainHttpPost | None:
        """The plain POST for an exporter's client, or ``None`` where it would not be one."""
        try:
            from opentelemetry.sdk.environment_variables import (
                _OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER as provider,
            )
            from opentelemetry.sdk.environment_variables import (
                _OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER as traces_provider,
            )
            from requests.utils import get_netrc_auth

            endpoint = client._endpoint
            headers = dict(client._headers)
            timeout = float(client._timeout)
            compression = getattr(client._compression, "value", client._compression)
        except (ImportError, AttributeError, TypeError, ValueError):
            return None  # another version of the exporter: its own client it is
        if not isinstance(endpoint, str):
            return None
        scheme = urllib.parse.urlsplit(endpoint).scheme
        compress = _compressor(compression)
        variables = (*_PROXY_VARIABLES.get(scheme, ()), provider, traces_provider)
        if (
            scheme not in _PROXY_VARIABLES
            or compress is None
            or any(os.environ.get(name) for name in variables)
            or get_netrc_auth(endpoint)
        ):
            return None
        if compression not in {None, "none"} and not any(
            key.lower() == "content-encoding" for key in headers
        ):
            headers["Content-Encoding"] = str(compression)
        if scheme != "https":
            return cls(endpoint, headers, timeout, fallback, compress=compress)
        transport = getattr(client, "_transport", None)
        try:
            return cls(
                endpoint,
                headers,
                timeout,
                fallback,
                compress=compress,
                tls=functools.partial(_tls_context, transport),
            )
        except (AttributeError, ImportError, OSError, TypeError, ValueError) as e:
            log.info("otlp_plain_post_unused", reason=f"TLS settings: {e!r}"[:200])
            return None

    def _connect(self) -> http.client.HTTPConnection:
        if self._tls_failed:
            self._renew_tls()
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def __call__(self, body: bytes) -> Any:
        if self._pid != os.getpid():  # a forked child: the parent's socket is not ours
            self._connection, self._pid = None, os.getpid()
        data = self._compress(body)
        for _ in range(2):
            kept = self._connection is not None
            connection = self._connection or self._connect()
            sent = False
            try:
                connection.request("POST", self._path, body=data, headers=self._headers)
                sent = True
                response = connection.getresponse()
                response.read()
            except (OSError, ValueError, http.client.HTTPException) as e:
                connection.close()
                self._connection = None
                if isinstance(e, ssl.SSLError):
                    self._tls_failed = True
                if sent and isinstance(e, TimeoutError):
                    # The whole batch went out and no answer came in time: the collector may
                    # well have stored it, and sent again it could be stored twice.
                    return _UNANSWERED
                if kept:  # the collector may have closed an idle connection: once more
                    continue
                break  # a new connection failed: the exporter's client, with its backoff
            self._connection = None if response.will_close else connection
            if response.will_close:
                connection.close()
            if 200 <= response.status < 400:
                return _SENT
            break
        return self._fallback(body)  # uncompressed: the exporter's client compresses itself

    def _renew_tls(self) -> None:
        """Read the CA and client certificate files again after a failed handshake (they may
        have been rotated since); the old settings stay if they cannot be read now."""
        self._tls_failed = False
        if self._tls_factory is None:
            return
        try:
            self._tls = self._tls_factory()
        except (AttributeError, OSError, TypeError, ValueError) as e:
            log.warning("otlp_tls_settings_unreadable", error=repr(e)[:200])

    def close(self) -> None:
        """Close the kept-alive connection (the pipeline's shutdown); a later POST opens one."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class _Sent:
    success = True


class _Unanswered:
    """A batch sent whose answer did not come in time: not sent again (nor by the
    exporter's own client), counted as failed."""

    success = False


_SENT = _Sent()
_UNANSWERED = _Unanswered()


class SpanPipeline:
    """Hands each ended span to the processors, and queues it for the exporters."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        *,
        exporters: Iterable[SpanExporter] = (),
        processors: Iterable[SpanProcessor] = (),
        settings: BatchSettings | None = None,
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.dropped = 0
        #: Exceptions raised by span processors' ``on_end`` (logged, never raised).
        self.processor_errors = 0
        self._settings = settings or batch_settings()
        # Read on every span ended: plain attributes, not two attribute lookups each.
        self._max_queue, self._max_batch = self._settings.max_queue, self._settings.max_batch
        self._exporters = list(exporters)
        self._processors = list(processors)
        self._plain_posts: list[_PlainHttpPost] = []  # their connections close at shutdown
        self._sends = [self._sender(e) for e in self._exporters]
        self._queue: collections.deque[FinishedSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopped = False
        #: ``(queue, max queue, max batch)`` while an ended span only has to be queued (there
        #: are exporters, no span processors, and the pipeline runs), else ``None``: the C
        #: ``end_timing`` (``broker/codecs/_lazy.c``) appends to that queue itself, and calls
        #: :meth:`ended` only otherwise or when the queue is full, and :meth:`batch_ready`
        #: when a batch waits. Kept current through a fork and the shutdown.
        self.direct: tuple[collections.deque[FinishedSpan], int, int] | None = None
        self._thread: threading.Thread | None = None
        self._set_direct()
        if self._sends:
            self._start_thread()
            after_fork = weakref.WeakMethod(self._after_fork)

            def in_child() -> None:  # the pipeline itself is not kept alive by the hook
                method = after_fork()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=in_child)

    def _set_direct(self) -> None:
        direct = self._sends and not self._processors and not self._stopped
        self.direct = (self._queue, self._max_queue, self._max_batch) if direct else None

    # --- the request's thread --------------------------------------------------------------

    def ended(self, span: FinishedSpan, /) -> None:
        """Take a span that just ended (:class:`~broker.telemetry._spans.RecordedSpan`
        calls this)."""
        if self._processors:
            readable = to_readable(span, self.resource, self.scope)
            for processor in self._processors:
                try:
                    processor.on_end(readable)
                except Exception as e:  # tracing never fails the code it traces
                    self.processor_errors += 1
                    if self.processor_errors == 1 or self.processor_errors % 10_000 == 0:
                        log.warning(
                            "span_processor_failed",
                            processor=type(processor).__qualname__,
                            error=repr(e)[:200],
                            errors=self.processor_errors,
                        )
        if not self._sends or self._stopped:
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("spans_dropped", dropped=self.dropped, queue=len(queue))
            return
        queue.append(span)
        if len(queue) >= self._max_batch:
            self.batch_ready()

    def batch_ready(self) -> None:
        """A batch waits in the queue: wake the export thread (unless woken already)."""
        if not self._wake.is_set():
            self._wake.set()

    # --- the export thread -----------------------------------------------------------------

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="broker-span-export", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        """In a forked child: a fresh queue and thread (the parent's thread is not there)."""
        self._queue = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._set_direct()
        if not self._stopped:
            self._start_thread()

    def _run(self) -> None:
        wake = self._wake
        while not self._stopped:
            wake.wait(self._settings.schedule_delay_s)
            wake.clear()
            self.export()

    def export(self) -> None:
        """Export every queued span now, in batches (the export thread, or a flush)."""
        with self._export_lock:
            queue, size = self._queue, self._settings.max_batch
            while queue:
                batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                for send in self._sends:
                    try:
                        send(batch)
                    except Exception:
                        log.exception("span_export_failed", spans=len(batch))

    def _sender(self, exporter: SpanExporter) -> Send:
        post = _otlp_http_post(exporter)
        if post is not None:
            parts = _otlp.envelope(self.resource, self.scope)
            if isinstance(post, _PlainHttpPost):
                self._plain_posts.append(post)

            def send_otlp(batch: Sequence[FinishedSpan]) -> None:
                result = post(_otlp.encode(batch, parts))
                if not getattr(result, "success", True):
                    log.warning("span_export_failed", spans=len(batch), exporter="otlp")

            return send_otlp

        def send_readable(batch: Sequence[FinishedSpan]) -> None:
            exporter.export([to_readable(s, self.resource, self.scope) for s in batch])

        return send_readable

    # --- life cycle --------------------------------------------------------------------------

    def force_flush(self, timeout_ms: int = 5000) -> None:
        """Export what is queued now, on this thread; flush the processors."""
        self.export()
        for processor in self._processors:
            with contextlib.suppress(Exception):
                processor.force_flush(timeout_ms)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Export what is queued, stop the thread, shut the exporters and processors down."""
        if self._stopped:
            return
        self._stopped = True
        self._set_direct()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self.export()
        for plain in self._plain_posts:
            plain.close()
        for exporter in self._exporters:
            with contextlib.suppress(Exception):
                exporter.shutdown()
        for processor in self._processors:
            with contextlib.suppress(Exception):
                processor.shutdown()
