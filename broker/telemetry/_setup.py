"""Per-process telemetry set-up: which of metrics and tracing are on, and the flush at exit."""

from __future__ import annotations

import atexit

from broker.settings import Settings, get_settings
from broker.telemetry import metrics, tracing

_done: set[str] = set()


def setup(component: str, settings: Settings | None = None) -> None:
    """Turn metrics on or off (``BROKER_METRICS``) and tracing on when ``OTEL_*`` or
    ``BROKER_TRACING`` ask for it; ``component`` (``ingress``, ``worker``, ``router``,
    ``agent``) names this process in traces (``service.name=broker-<component>`` unless
    ``OTEL_SERVICE_NAME`` says otherwise). Only the first call in a process acts."""
    if _done:
        return
    _done.add(component)
    settings = settings or get_settings()
    metrics.set_enabled(settings.metrics)
    atexit.register(metrics.flush)  # the last half second of counts
    tracing.configure_from_env(component, broker_tracing=settings.tracing)


def shutdown() -> None:
    """Write the counts and export the spans still buffered (on the way out of a process,
    on the thread that ran its event loop)."""
    metrics.flush()
    tracing.force_flush()
