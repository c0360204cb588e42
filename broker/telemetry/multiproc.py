"""The directory where every process of one ``broker serve`` writes its metrics.

Kept apart from :mod:`broker.telemetry.metrics` on purpose: prometheus-client decides
whether it runs in multiprocess mode when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; ``broker serve`` sets that variable for its children with
these helpers without importing the metrics (or prometheus-client) itself.
"""

from __future__ import annotations

import os
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The shared metrics directory of this process, if it runs under ``broker serve``."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def prepare_multiprocess_dir(path: Path) -> Path:
    """Empty (or create) the metrics directory of a new ``broker serve`` run and return its
    absolute path: values left by an earlier run must not be added to this one's."""
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.glob("*.db"):
        entry.unlink(missing_ok=True)
    return path


def process_exited(pid: int) -> None:
    """Forget the live gauges of a child process that exited (its counters and histograms
    stay: they are totals over the run)."""
    where = multiprocess_dir()
    if where is None:
        return
    for entry in where.glob(f"gauge_live*_{pid}.db"):
        entry.unlink(missing_ok=True)
