"""``broker replay``: read a stream from any point into NDJSON (stdout or a file)."""

from __future__ import annotations

import asyncio
import base64
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer

from broker.errors import BrokerError

REPLAY_EPILOG = (
    "Examples:\n\n"
    "  broker replay MESSAGES --subject 'orders.>' --decode\n\n"
    "  broker replay MESSAGES --since 2026-11-24T10:00:00Z --to audit.ndjson\n\n"
    "  broker replay REGISTRY --from-seq 1"
)


async def _replay(
    url: str,
    stream: str,
    start_seq: int | None,
    since: datetime | None,
    subject: str | None,
    decode: bool,
    to: Path | None,
) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from broker.client import BrokerClient

    out = to.open("wb") if to else sys.stdout.buffer
    count = 0
    show = to is not None and sys.stderr.isatty()
    with Progress(
        SpinnerColumn(), TextColumn("{task.completed} messages"), disable=not show, transient=True
    ) as progress:
        task = progress.add_task("replay", total=None)
        async with BrokerClient(url) as client:
            async for m in client.replay(
                stream, start_seq=start_seq, since=since, subject=subject, decode=decode
            ):
                record = {
                    "stream": m.stream,
                    "seq": m.seq,
                    "subject": m.subject,
                    "time": m.time.isoformat() if m.time else None,
                    "headers": m.headers,
                    "payload_base64": base64.b64encode(m.payload).decode(),
                }
                if decode:
                    record["value" if m.decode_error is None else "decode_error"] = (
                        m.value if m.decode_error is None else m.decode_error
                    )
                out.write(orjson.dumps(record) + b"\n")
                count += 1
                progress.advance(task)
    if to:
        out.close()
    return count


def replay(
    stream: Annotated[str, typer.Argument(help="MESSAGES, REGISTRY or ROUTES.")] = "MESSAGES",
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
) -> None:
    """Replay a stream from a sequence or a time to its current end, as NDJSON.

    A dropped connection resumes from the last message received. Exit codes: 0 ok,
    1 refused, 3 unavailable.
    """
    from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE

    try:
        count = asyncio.run(_replay(url, stream.upper(), from_seq, since, subject, decode, to))
    except BrokerError as e:
        typer.echo(f"error: {e.error_code}: {e.message}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE if e.status >= 500 else EXIT_REFUSED) from None
    if to:
        typer.echo(f"wrote {count} messages to {to}", err=True)
