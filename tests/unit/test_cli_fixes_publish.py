"""``broker publish`` on bad input: a clear message and exit code, never a traceback, and
never a record changed on its way to the broker.

The NDJSON tests stand a recording client in for :class:`broker.client.BrokerClient`: it
encodes each record as the real one does (``orjson``) and acks it, so what the broker
would have been sent is what the test reads."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from typer.testing import CliRunner

import broker.client
from broker.cli import app
from broker.client import PublishResult
from broker.publisher import PublishAck

pytestmark = pytest.mark.unit

BIG = 123456789012345678901234567890


class RecordingClient:
    """Acks every record; ``sent`` holds the lines the real client would have sent."""

    sent: ClassVar[list[bytes]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def __aenter__(self) -> RecordingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def publish_stream(
        self, records: AsyncIterable[Mapping[str, Any]], *, subject: str | None = None
    ) -> AsyncIterator[PublishResult]:
        async for record in records:
            RecordingClient.sent.append(orjson.dumps(record))
            yield PublishResult(ack=PublishAck("MESSAGES", len(RecordingClient.sent), False))


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> type[RecordingClient]:
    monkeypatch.setattr(broker.client, "BrokerClient", RecordingClient)
    monkeypatch.setattr(RecordingClient, "sent", [])
    return RecordingClient


def ndjson(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "records.ndjson"
    path.write_text(text)
    return ["publish", "cli.fixes", str(path), "--ndjson"]


def _sent_data(recording: type[RecordingClient]) -> list[Any]:
    """Each sent record's ``data``, its integers read with every digit."""
    import json

    return [json.loads(line)["data"] for line in recording.sent]


def test_an_integer_past_64_bits_is_sent_with_every_digit(
    tmp_path: Path, recording: type[RecordingClient]
) -> None:
    """orjson reads ``123456789012345678901234567890`` as the float ``1.2345678901234568e29``:
    sent so, the broker would store another number than the file holds. The record goes
    with the number as written (the broker stores it so), and so does one past a double's
    range, which orjson refused as "not a JSON object"."""
    huge = int("9" * 400)
    args = ndjson(tmp_path, f'{{"data": {{"n": {BIG}}}}}\n{{"data": {huge}}}\n')
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _sent_data(recording) == [{"n": BIG}, huge]


def test_the_largest_64_bit_integers_are_sent_exactly(
    tmp_path: Path, recording: type[RecordingClient]
) -> None:
    low, high = -(2**63), 2**64 - 1
    args = ndjson(tmp_path, f'{{"data": [{low}, {high}, "{BIG}"]}}\n')
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _sent_data(recording) == [[low, high, str(BIG)]]


def test_a_line_that_is_not_json_says_so_and_why(
    tmp_path: Path, recording: type[RecordingClient]
) -> None:
    result = CliRunner().invoke(app, ndjson(tmp_path, '{"data": 1,}\n[1, 2]\n'))
    assert result.exit_code == 1, result.output
    assert "line 1: not valid JSON (" in result.output
    assert "line 2: not a JSON object, skipped" in result.output


def test_line_numbers_count_blank_lines(tmp_path: Path, recording: type[RecordingClient]) -> None:
    """The line a message names is the file's line, blank lines counted."""
    result = CliRunner().invoke(app, ndjson(tmp_path, '{"data": 1}\n\n   \n[1]\n'))
    assert result.exit_code == 1, result.output
    assert "line 4: not a JSON object" in result.output


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "0"),
        ("--timeout", "-1"),
        ("--timeout", "inf"),
        ("--url", "http://[::1"),
        ("--url", "127.0.0.1:8080"),
        ("--url", "ftp://127.0.0.1"),
        ("--key", "clé"),
        ("--content-type", "téxt/plain"),
    ],
)
def test_an_unusable_option_is_a_usage_error_before_anything_is_sent(
    tmp_path: Path, option: str, value: str
) -> None:
    """Each of these used to end in a traceback (``ValueError: deadline must not be NaN``,
    ``InvalidURL``, ``UnicodeEncodeError``) or in ``cannot reach the broker`` (exit 3).
    Nothing listens on port 1: a command that got as far as sending says so."""
    payload = tmp_path / "one.json"
    payload.write_text("{}")
    args = ["publish", "cli.fixes", str(payload), "--url", "http://127.0.0.1:1"]
    result = CliRunner().invoke(app, [*args, option, value])
    assert result.exit_code == 2, (result.output, result.exception)
    assert option in result.output
    assert "cannot reach" not in result.output


def test_an_unusable_timeout_is_a_usage_error_with_ndjson_too(
    tmp_path: Path, recording: type[RecordingClient]
) -> None:
    result = CliRunner().invoke(app, [*ndjson(tmp_path, '{"data": 1}\n'), "--timeout", "nan"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert recording.sent == []
