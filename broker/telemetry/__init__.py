"""Observability: traces across every hop, Prometheus metrics, log fields, broker status.

- :mod:`broker.telemetry.tracing`: ``span``, ``inject``, ``extract`` (W3C trace context in
  HTTP and NATS headers; OpenTelemetry SDK; off and free by default);
- :mod:`broker.telemetry.metrics`: every ``broker_*`` metric and the functions that record
  them; ``render()`` for ``/metrics`` across all of ``broker serve``'s processes;
- :mod:`broker.telemetry.http`: the request span and metrics at the RSGI edge;
- :mod:`broker.telemetry.logfields`: structlog processors (trace ids, redaction);
- :mod:`broker.telemetry.status`: what ``broker status`` and ``/ui`` show;
- :func:`setup`: once per process, from the settings and ``OTEL_*`` variables.

Submodules load on first use: the CLI imports this package for its log processors and
must not pay for OpenTelemetry or prometheus-client on every command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.telemetry import metrics, tracing
    from broker.telemetry._setup import setup, shutdown

__all__ = ["metrics", "setup", "shutdown", "tracing"]

_MODULES = frozenset({"metrics", "tracing"})
_SETUP = frozenset({"setup", "shutdown"})


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _SETUP:
        return getattr(importlib.import_module(f"{__name__}._setup"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
