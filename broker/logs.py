"""structlog set-up: JSON lines, or a readable console format when a terminal is attached.

Every line carries the running span's ``trace_id``/``span_id`` when tracing is on, and
secrets (credential fields, passwords in URLs) and payloads are blanked before rendering
(:mod:`broker.telemetry.logfields`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog


def log_format() -> str:
    """``BROKER_LOG_FORMAT``, else ``console`` on a terminal and ``json`` otherwise."""
    chosen = os.environ.get("BROKER_LOG_FORMAT", "").strip().lower()  # "JSON" is json too
    return chosen or ("console" if sys.stderr.isatty() else "json")


class JsonLineFormatter(logging.Formatter):
    """Standard-library records (granian's) as the same JSON lines structlog writes."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "event": record.getMessage(),
            "level": record.levelname.lower(),
            "logger": record.name.lstrip("_"),
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        from broker.telemetry.logfields import redact_secrets

        return orjson.dumps(redact_secrets(None, record.levelname, line)).decode()


def granian_log_config() -> dict[str, Any] | None:
    """A ``logging.config`` dict that makes granian log JSON lines to stderr, or ``None``
    (granian's own format) when logs go to a terminal."""
    if log_format() != "json":
        return None
    formatter = {"()": f"{__name__}.JsonLineFormatter"}
    handler = {"formatter": "json", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": formatter, "generic": formatter, "access": formatter},
        "handlers": {"console": handler, "access": handler},
        "loggers": {
            "_granian": {"handlers": ["console"], "level": "INFO", "propagate": False},
            "granian.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


class _StderrLogger:
    """structlog's output: one line to whatever ``sys.stderr`` is when the line is written.
    structlog's own PrintLogger keeps the file it was given, so a command configured while
    ``sys.stderr`` was redirected (typer's CliRunner, a capture) went on writing to that
    file after it was closed, and every later log call raised.

    The line and its newline go in one ``write``: redirected to a file, ``sys.stderr`` is
    unbuffered, and ``print`` writes the newline separately, so the processes of one broker
    sharing a log file (its routers, say) could interleave two lines into one
    (``{...}{...}``) that a JSON-lines reader cannot parse."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str | None = None) -> None:
    """Configure structlog (and stdlib logging) once per process.

    ``BROKER_LOG_LEVEL`` (default ``info``) and ``BROKER_LOG_FORMAT`` (``json``/``console``;
    default: console on a terminal, JSON otherwise).
    """
    name = (level or os.environ.get("BROKER_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelNamesMapping().get(name, logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if log_format() == "console"
        else structlog.processors.JSONRenderer()
    )
    from broker.telemetry.logfields import add_trace_ids, redact_secrets

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            # Tracebacks become the ``exception`` string before redact_secrets, which then
            # scrubs it like any field: an exception's message may hold a URL password or a
            # card number. Also for the console renderer, which would otherwise format
            # ``exc_info`` itself, after every processor (and with Rich, the frames' locals).
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    # Said once the logger works: an unknown value used to fall back without a word.
    if name not in logging.getLevelNamesMapping():
        structlog.get_logger(__name__).warning(
            "log_setting_unknown", variable="BROKER_LOG_LEVEL", value=name.lower(), using="info"
        )
    if log_format() not in {"json", "console"}:
        structlog.get_logger(__name__).warning(
            "log_setting_unknown", variable="BROKER_LOG_FORMAT", value=log_format(), using="json"
        )
