"""``broker publish``: one payload, or many NDJSON records streamed over one HTTP/2 request."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.errors import BrokerError


@dataclass
class Summary:
    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    failed: int = 0
    #: what cut the stream off; records sent and not acked then are neither acked nor failed
    cut_by: BrokerError | None = None

    def shown(self) -> dict[str, Any]:
        """The summary as printed: the counts and ``error`` (``{"error_code", "message"}`` of
        what cut the stream off, or ``None``)."""
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cut_by"}
        return {**counts, "error": self.cut_by.to_dict() if self.cut_by else None}

    def note(self, result: Any) -> None:
        """Count one record's result (a :class:`broker.client.PublishResult`)."""
        if result.ack is not None:
            self.acked += 1
            self.duplicates += result.ack.duplicate
        else:
            self.failed += 1
            assert result.error is not None
            error = result.error
            typer.echo(f"record failed: {error.error_code}: {error.message}", err=True)


def _lines(file: str) -> Iterator[tuple[int, bytes]]:
    """The file's lines that are not blank, each with its number in the file."""
    stream = sys.stdin.buffer if file == "-" else Path(file).open("rb")  # noqa: SIM115
    with stream:
        for number, line in enumerate(stream, 1):
            if line.strip():
                yield number, line


def _record(line: bytes) -> dict[str, Any] | str:
    """The record on an NDJSON line (an integer past 64 bits kept with its digits, as the
    broker stores it), or why it is not one."""
    from broker.exactjson import loads_exact

    try:
        record = loads_exact(line)
    except ValueError as e:
        return f"not valid JSON ({e})"
    return record if isinstance(record, dict) else "not a JSON object"


async def _stream(url: str, subject: str, file: str, timeout: float, show: bool) -> Summary:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from broker.cli import cli_credentials, cli_tls
    from broker.client import BrokerClient

    summary = Summary()
    total = None if file == "-" else sum(1 for _ in _lines(file))

    async def records() -> AsyncIterator[dict[str, Any]]:
        for number, line in _lines(file):
            record = _record(line)
            if isinstance(record, str):
                typer.echo(f"line {number}: {record}, skipped", err=True)
                summary.failed += 1
                continue
            summary.sent += 1
            yield record

    progress = Progress(
        TextColumn("publishing"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} acked"),
        TimeElapsedColumn(),
        disable=not show,
        transient=True,
    )
    with progress:
        task = progress.add_task("publish", total=total)
        async with BrokerClient(
            url, timeout=timeout, headers=cli_credentials(), verify=cli_tls()
        ) as client:
            try:
                async for result in client.publish_stream(records(), subject=subject):
                    summary.note(result)
                    progress.advance(task)
            except BrokerError as e:  # cut off: what was acked is counted; the rest is not
                summary.cut_by = e
    return summary


def publish(
    subject: Annotated[str, typer.Argument(help="Subject, e.g. orders.created.")],
    file: Annotated[str, typer.Argument(help="Payload file; - (default) reads stdin.")] = "-",
    url: Annotated[
        str, typer.Option(envvar="BROKER_URL", help="Broker base URL.")
    ] = "http://127.0.0.1:8080",
    content_type: Annotated[
        str | None, typer.Option("--content-type", "-t", help="Content-Type of the payload.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Idempotency key (default: a fresh one).")
    ] = None,
    schema_id: Annotated[int | None, typer.Option(help="Schema registry id.")] = None,
    expected_seq: Annotated[
        int | None, typer.Option(help="Store only if the subject's last sequence is this.")
    ] = None,
    ndjson: Annotated[
        bool,
        typer.Option(
            help="FILE holds one JSON record per line, streamed; SUBJECT is their default."
        ),
    ] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="json or table.")] = "json",
    timeout: Annotated[float, typer.Option(help="Request timeout in seconds.")] = 30.0,
) -> None:
    """Publish a payload (or NDJSON records) through the HTTP/2 API.

    A single publish prints its ack. With --ndjson the records stream over one HTTP/2
    request with a progress bar (on a terminal) and a summary: sent, acked, duplicates,
    failed, and the error that cut the stream off, if one did. A single publish is retried
    with the same idempotency key, so it never duplicates; a stream whose connection is lost
    or shut down (the broker stopping) goes on in a new one, its records not acked sent
    again with their keys. If it is cut off all the same, re-send the records not acked
    (those with an idempotency_key are stored once however often).
    Exit codes: 0 ok, 1 refused (4xx or a failed record), 2 usage, 3 unavailable.
    """
    from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE, cli_credentials, cli_tls
    from broker.client import BrokerClient
    from broker.envelope import validate_subject

    if output not in {"json", "table"}:  # before anything is published, not after
        raise typer.BadParameter("json or table", param_hint="--output")
    _check_options(url, timeout, {"--key": key, "--content-type": content_type})
    try:
        validate_subject(subject)
    except BrokerError as e:
        raise typer.BadParameter(e.message, param_hint="SUBJECT") from None
    if file != "-" and not Path(file).is_file():
        raise typer.BadParameter(f"no such file: {file}", param_hint="FILE")
    per_message = {"--key": key, "--content-type": content_type, "--schema-id": schema_id}
    given = [name for name, value in per_message.items() if value is not None]
    if ndjson and (given or expected_seq is not None):
        names = ", ".join([*given, *(["--expected-seq"] if expected_seq is not None else [])])
        raise typer.BadParameter(
            f"{names} apply to one message; with --ndjson give them in each record "
            "(idempotency_key, content_type, ...)"
        )
    try:
        if ndjson:
            summary = asyncio.run(_stream(url, subject, file, timeout, sys.stderr.isatty()))
            shown = summary.shown()
            if output == "table":
                typer.echo("  ".join(f"{k} {v}" for k, v in shown.items()))
            else:
                typer.echo(json.dumps(shown))
            if summary.cut_by is not None:
                raise typer.Exit(EXIT_UNAVAILABLE if summary.cut_by.status >= 500 else EXIT_REFUSED)
            if summary.failed:
                raise typer.Exit(EXIT_REFUSED)
            return
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()

        async def one() -> dict[str, object]:
            async with BrokerClient(
                url, timeout=timeout, headers=cli_credentials(), verify=cli_tls()
            ) as client:
                ack = await client.publish(
                    subject,
                    data,
                    content_type=content_type or "application/octet-stream",
                    key=key,
                    schema_id=schema_id,
                    expected_last_subject_sequence=expected_seq,
                )
            return {"stream": ack.stream, "seq": ack.seq, "duplicate": ack.duplicate}

        ack = asyncio.run(one())
        typer.echo(
            json.dumps(ack) if output == "json" else "  ".join(f"{k} {v}" for k, v in ack.items())
        )
    except BrokerError as e:
        typer.echo(json.dumps(e.to_dict()))
        raise typer.Exit(EXIT_UNAVAILABLE if e.status >= 500 else EXIT_REFUSED) from None


def _check_options(url: str, timeout: float, headers: dict[str, str | None]) -> None:
    """Options the HTTP client could not use are usage errors before anything is sent, not
    a traceback (or "cannot reach the broker") after."""
    import httpx

    if not (math.isfinite(timeout) and timeout > 0):
        raise typer.BadParameter(
            f"{timeout} is not a number of seconds above 0", param_hint="--timeout"
        )
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise typer.BadParameter(f"{url!r} is not a URL: {e}", param_hint="--url") from None
    if parsed.scheme not in {"http", "https"} or not parsed.host:
        raise typer.BadParameter(
            f"{url!r} is not an http:// or https:// URL with a host", param_hint="--url"
        )
    for name, value in headers.items():  # sent as HTTP headers: printable ASCII only
        if value is not None and not (value.isascii() and value.isprintable()):
            raise typer.BadParameter(
                f"{value!r}: an HTTP header value is printable ASCII only", param_hint=name
            )


PUBLISH_EPILOG = (
    "Examples:\n\n"
    "  echo '{\"order\": 42}' | broker publish orders.created -t application/json\n\n"
    "  broker publish images.raw photo.png -t image/png --key photo-1\n\n"
    "  broker publish events records.ndjson --ndjson   # one JSON record per line"
)
