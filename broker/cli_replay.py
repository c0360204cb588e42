"""``broker replay``: read a stream from any point into NDJSON (stdout or a file)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import typer

from broker import b64
from broker.errors import BrokerError

REPLAY_EPILOG = (
    "Examples:\n\n"
    "  broker replay MESSAGES --subject 'orders.>' --decode\n\n"
    "  broker replay MESSAGES --since 2026-11-24T10:00:00Z --to audit.ndjson\n\n"
    "  broker replay REGISTRY --from-seq 1\n\n"
    "  broker replay ROUTES --since 2026-11-25T10:00:00Z -o table"
)


class _OutputFailed(Exception):
    """The records could not be written where they go (a full disk, a file system gone)."""


class _RecordsLost(Exception):
    """``--strict``: records the replay asked for aged out or were purged."""


def _unwritable(where: Path | None, error: OSError) -> BaseException:
    """What a failed write is: :class:`_OutputFailed`, naming the output, but a reader that
    went away (``| head``) stays the ``BrokenPipeError`` that click ends quietly on."""
    if isinstance(error, BrokenPipeError):
        return error
    return _OutputFailed(f"cannot write {where or 'stdout'}: {error.strerror or error}")


class _Sink:
    """Where each record is written; a write that fails is :class:`_OutputFailed`."""

    def __init__(self, out: IO[bytes], where: Path | None) -> None:
        self.out, self.where = out, where

    def write(self, data: bytes) -> None:
        try:
            self.out.write(data)
        except OSError as e:
            raise _unwritable(self.where, e) from None

    def flush(self) -> None:
        try:
            self.out.flush()
        except OSError as e:
            raise _unwritable(self.where, e) from None


@contextlib.contextmanager
def _written(path: Path, mode: str, where: Path) -> Iterator[_Sink]:
    """``path`` opened for the records; opening, writing and closing it (its last flush)
    that fail are :class:`_OutputFailed`, a close after a failure is quiet."""
    try:
        out = path.open(mode)
    except OSError as e:
        raise _unwritable(where, e) from None
    done = False
    try:
        sink = _Sink(out, where)
        yield sink
        sink.flush()
        done = True
    finally:
        try:
            out.close()
        except OSError as e:
            if done:
                raise _unwritable(where, e) from None


@contextlib.contextmanager
def _output(to: Path | None) -> Iterator[_Sink]:
    """Where the records go: stdout, or ``to``. A file is written beside itself and renamed
    into place once the replay has ended, so a replay that fails leaves it as it was. Any
    write, the last flush and the rename included, that fails is :class:`_OutputFailed`."""
    if to is None:
        sink = _Sink(sys.stdout.buffer, None)
        yield sink
        sink.flush()
        return
    if to.exists() and not to.is_file():  # /dev/null, a FIFO: nothing there to keep
        with _written(to, "wb", to) as sink:
            yield sink
        return
    target = to.resolve()  # through a symlink: the file it names is replaced, not the link
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        with _written(partial, "xb", to) as sink:
            yield sink
        try:
            if target.exists():
                shutil.copymode(target, partial)
            os.replace(partial, target)
        except OSError as e:
            raise _unwritable(to, e) from None
    finally:
        partial.unlink(missing_ok=True)


async def _replay(
    url: str,
    stream: str,
    start_seq: int | None,
    since: datetime | None,
    subject: str | None,
    decode: bool,
    to: Path | None,
    table: bool = False,
    strict: bool = False,
) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from broker.cli import cli_credentials, cli_tls
    from broker.client import BrokerClient, RecordsLost

    def lost(what: RecordsLost) -> None:
        """A warning on stderr (stdout carries the records); with ``--strict``, the end."""
        if strict:
            raise _RecordsLost(f"{what}; --strict stops the replay there")
        typer.echo(f"warning: {what}", err=True)

    count = 0
    show = to is not None and sys.stderr.isatty()
    with (
        _output(to) as out,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.completed} messages"),
            disable=not show,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task("replay", total=None)
        async with BrokerClient(url, headers=cli_credentials(), verify=cli_tls()) as client:
            async for m in client.replay(
                stream,
                start_seq=start_seq,
                since=since,
                subject=subject,
                decode=decode,
                on_lost=lost,
            ):
                if table:
                    out.write(_table_line(m, decode).encode() + b"\n")
                    count += 1
                    progress.advance(task)
                    continue
                record = {
                    "stream": m.stream,
                    "seq": m.seq,
                    "subject": m.subject,
                    "time": m.time.isoformat() if m.time else None,
                    "headers": m.headers,
                    "payload_base64": b64.encode(m.payload),
                }
                if decode:
                    record["value" if m.decode_error is None else "decode_error"] = (
                        m.value if m.decode_error is None else m.decode_error
                    )
                out.write(orjson.dumps(record) + b"\n")
                count += 1
                progress.advance(task)
    return count


def _table_line(m: Any, decode: bool) -> str:
    """One aligned line per message: seq, time, subject, content type, size (and value)."""
    when = m.time.strftime("%Y-%m-%dT%H:%M:%S") if m.time else "-"
    content_type = (m.headers or {}).get("Content-Type", "-")
    line = f"{m.seq:>10}  {when}  {m.subject:<40} {content_type:<28} {len(m.payload):>8}"
    if decode:
        shown = m.decode_error if m.decode_error is not None else orjson.dumps(m.value).decode()
        line += "  " + shown[:80]
    return line


def replay(
    stream: Annotated[
        str, typer.Argument(help="MESSAGES, REGISTRY, ROUTES, DLQ or AUDIT.")
    ] = "MESSAGES",
    from_seq: Annotated[
        int | None, typer.Option(min=1, help="Start at this stream sequence.")
    ] = None,
    since: Annotated[datetime | None, typer.Option(help="Start at this time (RFC 3339).")] = None,
    subject: Annotated[
        str | None, typer.Option(help="Filter in your namespace; * and > allowed.")
    ] = None,
    decode: Annotated[
        bool,
        typer.Option(
            help="Decode each payload with its writer's schema (JSON, Avro, Protobuf, "
            "msgpack, text); an undecodable one carries decode_error."
        ),
    ] = False,
    to: Annotated[Path | None, typer.Option(help="Write NDJSON here instead of stdout.")] = None,
    url: Annotated[
        str, typer.Option(envvar="BROKER_URL", help="Broker base URL.")
    ] = "http://127.0.0.1:8080",
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="ndjson (one JSON record per message) or table (for people)."
        ),
    ] = "ndjson",
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Fail (exit 1) instead of warning when records the replay asked for aged "
            "out or were purged; a --to file is then left as it was.",
        ),
    ] = False,
) -> None:
    """Replay a stream from a sequence or a time to its current end, as NDJSON.

    A dropped connection resumes from the last message received. When the stream no
    longer holds records the replay asked for (they aged out or were purged: a --from-seq,
    or a next page's start, below its first sequence; with neither --from-seq nor --since,
    any record gone; a --since not after the time of its first record), a warning says so
    on stderr. Exit codes: 0 ok, 1 refused (or the output could not be written, or records
    lost with --strict), 3 unavailable.
    """
    from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE

    if output not in {"ndjson", "table"}:
        raise typer.BadParameter("ndjson or table", param_hint="--output")
    table = output == "table"
    if to is not None and not to.parent.is_dir():
        raise typer.BadParameter(f"no directory {to.parent}", param_hint="--to")
    if to is not None and to.is_dir():
        raise typer.BadParameter(f"{to} is a directory; name a file in it", param_hint="--to")
    if since is not None and from_seq is not None:  # the client would drop --since
        raise typer.BadParameter("give --from-seq or --since, not both", param_hint="--since")
    if since is not None and since.tzinfo is None:  # the broker takes RFC 3339 only
        raise typer.BadParameter(
            "give a time zone, e.g. 2026-11-25T10:00:00Z", param_hint="--since"
        )
    try:
        count = asyncio.run(
            _replay(url, stream.upper(), from_seq, since, subject, decode, to, table, strict)
        )
    except BrokerError as e:
        typer.echo(f"error: {e.error_code}: {e.message}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE if e.status >= 500 else EXIT_REFUSED) from None
    except (_OutputFailed, _RecordsLost) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    if to:
        typer.echo(f"wrote {count} messages to {to}", err=True)
