"""structlog set-up: JSON lines, or a readable console format when a terminal is attached.

Every line carries the running span's ``trace_id``/``span_id`` when tracing is on, and
secrets (credential fields, passwords in URLs) and payloads are blanked before rendering
(:mod:`broker.telemetry.logfields`). The standard library's records (nats-py's, asyncio's,
granian's, any library's) are written in the same format through the same processors.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog
from structlog.processors import JSONRenderer
from structlog.typing import Processor

LogFormat = Literal["json", "console"]
#: The values ``BROKER_LOG_FORMAT`` takes. Any other (``jsonl``, a typo) means ``json``,
#: for structlog's lines, granian's and every other library's alike, and is said once at
#: start-up (``log_setting_unknown``).
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")


def _log_format_setting() -> str:
    return os.environ.get("BROKER_LOG_FORMAT", "").strip().lower()  # "JSON" is json too


def log_format() -> LogFormat:
    """``BROKER_LOG_FORMAT``, else ``console`` on a terminal and ``json`` otherwise; any
    value but ``console`` is ``json``. The one place the format is decided: structlog's
    renderer, the root logger's formatter and granian's all follow it."""
    chosen = _log_format_setting()
    if not chosen:
        return "console" if sys.stderr.isatty() else "json"
    return "console" if chosen == "console" else "json"


def _renderer(fmt: LogFormat) -> Processor:
    return structlog.dev.ConsoleRenderer() if fmt == "console" else JSONRenderer()


def _processors() -> list[Processor]:
    """What every line goes through before it is rendered, structlog's own and the
    standard library's."""
    from broker.telemetry.logfields import add_trace_ids, redact_secrets

    return [
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
    ]


def _add_logger_name(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``logger``: the standard-library logger's name (``_granian`` written ``granian``)."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["logger"] = record.name.lstrip("_")
    return event_dict


class LineFormatter(structlog.stdlib.ProcessorFormatter):
    """Standard-library records as the lines structlog writes, in ``fmt`` (default: what
    :func:`log_format` says), through the same processors: trace ids, and no secret
    (:func:`~broker.telemetry.logfields.redact_secrets` sees the message, the logger's name
    and the formatted traceback)."""

    def __init__(self, fmt: LogFormat | None = None) -> None:
        super().__init__(
            processors=[_renderer(fmt or log_format())],
            foreign_pre_chain=[
                _add_logger_name,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *_processors(),
            ],
        )


class JsonLineFormatter(LineFormatter):
    """Standard-library records as JSON lines (granian's, when the format is JSON)."""

    def __init__(self) -> None:
        super().__init__("json")


def granian_log_config() -> dict[str, Any] | None:
    """A ``logging.config`` dict that makes granian log JSON lines to stderr, or ``None``
    (granian's own format) when :func:`log_format` is ``console``."""
    if log_format() == "console":
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
    (``{...}{...}``) that a JSON-lines reader cannot parse. A line that cannot be written
    is dropped."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            stream = sys.stderr
            try:
                stream.write(message + "\n")
                stream.flush()
            except (OSError, ValueError):
                # A terminal that hung up (EIO), a pipe nobody reads, a closed file: the line
                # is lost, and the code that logged it goes on (a broker whose terminal
                # closed ended on its next log line).
                pass

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


class _StderrHandler(logging.Handler):
    """The root logger's handler: each standard-library record that reaches the root
    (nats-py's, asyncio's, any library's) written as :class:`_StderrLogger` writes
    structlog's lines, in one ``write`` to the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _StderrLogger().msg(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _install_root_handler(level: int, fmt: LogFormat) -> None:
    """One :class:`_StderrHandler` on the root logger, writing ``fmt``: configured again,
    the handler there gets the new format, no second one is added. The root's other
    handlers (an embedding application's, pytest's) stay."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(LineFormatter(fmt))
    handler.setLevel(level)
    # Lowered to let the handler see what it writes, never raised: an application that
    # embeds the broker keeps what its own handlers get.
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)


def configure_logging(level: str | None = None) -> None:
    """Configure structlog, and the standard library's root logger, once per process.

    ``BROKER_LOG_LEVEL`` (default ``info``) and ``BROKER_LOG_FORMAT`` (``json``/``console``;
    default: console on a terminal, JSON otherwise; any other value: JSON). Other
    libraries' records, warnings and worse, get the same format and the same redaction.
    """
    name = (level or os.environ.get("BROKER_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelNamesMapping().get(name, logging.INFO)
    fmt = log_format()
    structlog.configure(
        processors=[*_processors(), _renderer(fmt)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )
    _install_root_handler(max(numeric, logging.WARNING), fmt)
    # Said once the logger works: an unknown value used to fall back without a word.
    if name not in logging.getLevelNamesMapping():
        structlog.get_logger(__name__).warning(
            "log_setting_unknown", variable="BROKER_LOG_LEVEL", value=name.lower(), using="info"
        )
    setting = _log_format_setting()
    if setting and setting not in LOG_FORMATS:
        structlog.get_logger(__name__).warning(
            "log_setting_unknown", variable="BROKER_LOG_FORMAT", value=setting, using=fmt
        )
