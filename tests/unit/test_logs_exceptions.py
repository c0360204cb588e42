"""What ``configure_logging`` writes for an exception: its traceback is scrubbed like any
field, in JSON and on the console, and so are the keys of a dict logged as a field; and
each line reaches stderr in one write."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from broker.logs import JsonLineFormatter, configure_logging

pytestmark = pytest.mark.unit

PASSWORD = "hunter2"
CARD = "4111 1111 1111 1111"
SECRET_TEXT = f"cannot use nats://svc:{PASSWORD}@nats-1:4222 for card {CARD}"
MASKED_URL = "nats://***@nats-1:4222"
MASKED_CARD = "[card ****1111]"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """structlog's and the root logger's set-up as they were before the test."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def _configure(monkeypatch: pytest.MonkeyPatch, fmt: str) -> structlog.stdlib.BoundLogger:
    """``configure_logging`` in ``fmt``, from the test's body: its lines go to the stderr
    that capsys reads (the one of a fixture's set-up is another)."""
    monkeypatch.setenv("BROKER_LOG_FORMAT", fmt)
    configure_logging("info")
    logger: structlog.stdlib.BoundLogger = structlog.get_logger("test")
    return logger


def _fail_to_connect() -> None:
    try:
        raise ConnectionError(SECRET_TEXT)
    except ConnectionError as e:
        raise RuntimeError(f"route decision failed, card {CARD}") from e


def _assert_scrubbed(text: str) -> None:
    assert PASSWORD not in text
    assert CARD not in text
    assert CARD.replace(" ", "") not in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_traceback_of_log_exception_is_redacted(
    fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exception messages in a logged traceback (the cause's too) keep the traceback
    but lose the URL password and the card number, as the same text in a field does."""
    log = _configure(monkeypatch, fmt)
    try:
        _fail_to_connect()
    except RuntimeError:
        log.exception("route_decision_failed", subject="msg.default.x")
    err = capsys.readouterr().err
    _assert_scrubbed(err)
    assert "Traceback (most recent call last)" in err
    assert "route_decision_failed" in err
    assert MASKED_URL in err
    assert MASKED_CARD in err
    if fmt == "json":
        (line,) = err.splitlines()
        exception = json.loads(line)["exception"]
        assert f"ConnectionError: cannot use {MASKED_URL} for card {MASKED_CARD}" in exception
        assert f"RuntimeError: route decision failed, card {MASKED_CARD}" in exception


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_stack_field_is_redacted(
    fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``stack`` (printed apart from the fields by the console renderer) is scrubbed."""
    _configure(monkeypatch, fmt).warning("slow_path", stack=f"File x, line 1\n  {SECRET_TEXT}")
    err = capsys.readouterr().err
    _assert_scrubbed(err)
    assert MASKED_URL in err


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secret_keys_inside_a_dict_field_are_redacted(
    fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cfg={"password": ...}``: a key of a nested dict is a field name like a top-level
    one, at any depth, for secrets, payloads and server addresses."""
    _configure(monkeypatch, fmt).info(
        "settings_loaded",
        cfg={
            "password": PASSWORD,
            "nats": {"servers": [f"svc:{PASSWORD}@nats-1:4222"], "token": PASSWORD},
            "dlq": [{"payload": f"card {CARD}", "name": "kept"}],
        },
    )
    err = capsys.readouterr().err
    _assert_scrubbed(err)
    assert "***@nats-1:4222" in err
    assert "kept" in err
    if fmt == "json":
        cfg = json.loads(err)["cfg"]
        assert cfg["password"] == "[redacted]"
        assert cfg["nats"]["token"] == "[redacted]"
        assert cfg["dlq"][0]["payload"].startswith("[payload omitted")


def test_granian_json_lines_redact_their_exception() -> None:
    """Standard-library records (granian's) in JSON: the message and the traceback are
    scrubbed as structlog's lines are."""
    try:
        _fail_to_connect()
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "_granian", logging.ERROR, __file__, 1, "worker failed", (), exc_info
    )
    line = JsonLineFormatter().format(record)
    _assert_scrubbed(line)
    fields = json.loads(line)
    assert fields["logger"] == "granian"
    assert "Traceback (most recent call last)" in fields["exception"]
    assert MASKED_URL in fields["exception"]


def test_lines_go_to_the_stderr_of_the_moment_not_the_one_configured_with(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command run under typer's CliRunner configures logging while sys.stderr is the
    runner's buffer, which is closed afterwards: later log calls in the same process (other
    tests, an embedding application) must reach the stderr of their own time, not raise."""
    import io

    monkeypatch.setenv("BROKER_LOG_FORMAT", "json")
    borrowed = io.StringIO()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", borrowed)
        configure_logging("info")
        structlog.get_logger("test").info("while_borrowed")
    borrowed_lines = borrowed.getvalue()
    borrowed.close()
    structlog.get_logger("test").info("after_it_closed")
    assert "while_borrowed" in borrowed_lines
    assert json.loads(capsys.readouterr().err.strip())["event"] == "after_it_closed"


class _Writes:
    """A stand-in for an unbuffered ``sys.stderr``: every ``write`` call, as the file would
    get it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        return None


def test_each_log_line_reaches_stderr_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redirected to a file, stderr is unbuffered: a line written in two calls (the text, then
    its newline) can interleave with another process's line in a shared log file."""
    monkeypatch.setenv("BROKER_LOG_FORMAT", "json")
    writes = _Writes()
    monkeypatch.setattr(sys, "stderr", writes)
    configure_logging("info")
    structlog.get_logger("test").info("first_line", n=1)
    structlog.get_logger("test").info("second_line", n=2)
    assert len(writes.calls) == 2
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in writes.calls)
    assert [json.loads(call)["event"] for call in writes.calls] == ["first_line", "second_line"]


@pytest.mark.parametrize("value", ["JSON", " Json ", "json"])
def test_the_log_format_is_read_whatever_its_case(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Upper case once made structlog write JSON and granian its own plain text."""
    from broker.logs import granian_log_config, log_format

    monkeypatch.setenv("BROKER_LOG_FORMAT", value)
    assert log_format() == "json"
    assert granian_log_config() is not None


# --- other libraries' records ------------------------------------------------------------


def _root_handlers_of_ours() -> list[logging.Handler]:
    from broker.logs import LineFormatter

    return [h for h in logging.getLogger().handlers if isinstance(h.formatter, LineFormatter)]


def test_another_librarys_record_is_one_redacted_json_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """nats-py's (or asyncio's) records went through the last-resort handler as plain,
    unredacted text: in JSON mode they are JSON lines, scrubbed like structlog's."""
    _configure(monkeypatch, "json")
    logging.getLogger("nats").error("connect to nats://u:secretpw@h:4222 failed")
    (line,) = capsys.readouterr().err.splitlines()
    fields = json.loads(line)
    assert "secretpw" not in line
    assert fields["event"] == "connect to nats://***@h:4222 failed"
    assert (fields["level"], fields["logger"]) == ("error", "nats")
    assert "timestamp" in fields


def test_configuring_twice_installs_one_root_handler(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Configured again (a second command in one process), another library's record is
    still written once, in the format configured last."""
    _configure(monkeypatch, "console")
    _configure(monkeypatch, "json")
    logging.getLogger("asyncio").warning("loop slow")
    assert len(_root_handlers_of_ours()) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["event"] == "loop slow"


def test_another_librarys_traceback_is_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """asyncio's "exception was never retrieved" carries a traceback: scrubbed too."""
    _configure(monkeypatch, "json")
    try:
        _fail_to_connect()
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    (line,) = capsys.readouterr().err.splitlines()
    _assert_scrubbed(line)
    assert MASKED_URL in json.loads(line)["exception"]


def test_another_librarys_record_is_redacted_on_the_console(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _configure(monkeypatch, "console")
    logging.getLogger("nats").error("connect to nats://u:secretpw@h:4222 failed")
    err = capsys.readouterr().err
    assert "secretpw" not in err
    assert "nats://***@h:4222" in err
    assert not err.lstrip().startswith("{")


def test_granians_config_keeps_its_loggers_and_the_root_handler(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """granian applies its dict config after ours: its records are one JSON line each
    (not repeated by the root handler), and other libraries' still reach the root's."""
    import logging.config

    from broker.logs import granian_log_config

    _configure(monkeypatch, "json")
    config = granian_log_config()
    assert config is not None
    granian = logging.getLogger("_granian")
    saved = granian.handlers[:], granian.propagate, granian.level
    try:
        logging.config.dictConfig(config)
        granian.error("worker nats://u:secretpw@h:4222 died")
        logging.getLogger("nats").error("still here")
    finally:
        granian.handlers[:], granian.propagate = saved[0], saved[1]
        granian.setLevel(saved[2])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(f["logger"], f["event"]) for f in lines] == [
        ("granian", "worker nats://***@h:4222 died"),
        ("nats", "still here"),
    ]


@pytest.mark.parametrize("value", ["jsonl", "text", "yaml"])
def test_an_unknown_log_format_is_json_everywhere(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``jsonl`` made structlog write JSON and granian plain text: one decision now, JSON
    for structlog, granian and other libraries alike, and said once."""
    from broker.logs import granian_log_config, log_format

    log = _configure(monkeypatch, value)
    assert log_format() == "json"
    assert granian_log_config() is not None
    log.info("structlog_line")
    logging.getLogger("nats").error("stdlib_line")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [f["event"] for f in lines] == ["log_setting_unknown", "structlog_line", "stdlib_line"]
    assert (lines[0]["value"], lines[0]["using"]) == (value, "json")


@pytest.mark.parametrize("value", ["console", " Console "])
def test_the_console_format_is_console_everywhere(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.logs import granian_log_config, log_format

    monkeypatch.setenv("BROKER_LOG_FORMAT", value)
    assert log_format() == "console"
    assert granian_log_config() is None


def test_configuring_never_raises_the_root_loggers_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """An application that embeds the broker with its root logger at DEBUG kept getting its
    own records before (``basicConfig`` left a configured root alone); setting the root to
    WARNING cut them off. The broker's handler filters for itself."""
    monkeypatch.setenv("BROKER_LOG_FORMAT", "json")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    configure_logging()
    assert root.level == logging.DEBUG
    ours = [h for h in root.handlers if type(h).__name__ == "_StderrHandler"]
    assert len(ours) == 1
    assert ours[0].level == logging.WARNING
