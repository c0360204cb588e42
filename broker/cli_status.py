"""``broker status``: the whole broker on one screen, from ``GET /v1/status``.

Streams (messages, bytes, last sequence), durable consumers and their lag (a projection's
lag is its consumer's), agents with their live load, the latest routing decisions and the
latest DLQ entries. ``--watch`` redraws every ``--interval`` seconds (into a pipe or a
file, where nothing can be redrawn, it writes each refresh after the last); ``--json`` prints the
document as the API returns it (one line per refresh with ``--watch``), for scripts.

Every text of the document (agent names, subjects, DLQ errors) is written to a terminal, so
a table shows its control characters as escapes (``\\x1b``) and its brackets as brackets:
nothing a publisher wrote can move the cursor, retitle the window or reverse the line.
Ctrl-C ends ``--watch`` with exit code 130, as the shell reports an interrupt.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

STATUS_EPILOG = (
    "Examples:\n\n"
    "  broker status\n\n"
    "  broker status --watch --interval 1\n\n"
    "  broker status --json | jq '.streams[] | {name, messages}'"
)


#: What every status document has: anything else is some other page.
_DOCUMENT_KEYS = ("broker", "generated_at", "streams", "consumers", "agents")

#: The exit code of ``--watch`` ended by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130

#: Characters a terminal acts on instead of showing: C0 controls, DEL, C1 controls (``\x9b``
#: is CSI on its own), and the bidi controls that reorder what follows them on the line.
_UNPRINTABLE = {
    *range(0x00, 0x20),
    0x7F,
    *range(0x80, 0xA0),
    0x061C,
    0x200E,
    0x200F,
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
}
_ESCAPED = str.maketrans({c: ascii(chr(c))[1:-1] for c in _UNPRINTABLE})


def printable(text: str) -> str:
    """``text`` for a terminal: each control character as its escape (``\\x1b``,
    ``\\u202e``), the rest as it is."""
    return text.translate(_ESCAPED)


class _NoStatus(Exception):
    """The status could not be read: what to say, and the exit code it is worth."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)  # the answer's text, a proxy's page too: made printable
        self.message, self.code = printable(message), code


def _read(url: str, recent: int) -> dict[str, Any]:
    """The status document; :class:`_NoStatus` when the broker cannot give it."""
    import httpx

    from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE, cli_credentials, cli_tls
    from broker.client import CONNECTION_FAILED, broker_document
    from broker.errors import Unavailable

    base = url.rstrip("/")
    verify = cli_tls()
    try:
        with httpx.Client(
            http2=True,
            http1=base.startswith("https"),
            timeout=10,
            headers=cli_credentials(),
            verify=verify,
        ) as client:
            response = client.get(f"{base}/v1/status", params={"recent": str(recent)})
    except (httpx.HTTPError, *CONNECTION_FAILED) as e:
        raise _NoStatus(f"cannot reach the broker at {base}: {e}", EXIT_UNAVAILABLE) from None
    if response.status_code >= 400:
        code = EXIT_UNAVAILABLE if response.status_code >= 500 else EXIT_REFUSED
        hint = ""
        if response.status_code in (401, 403):
            hint = " (the key sent is BROKER_API_KEY; BROKER_AS_TENANT names another tenant)"
        raise _NoStatus(response.text + hint, code)
    try:
        return broker_document(response, *_DOCUMENT_KEYS)
    except Unavailable as e:  # a proxy's login page, a web server's index: not the broker
        raise _NoStatus(str(e), EXIT_UNAVAILABLE) from None


def _fetch(url: str, recent: int) -> dict[str, Any]:
    """The status document, or the reason on stderr and the command's exit."""
    try:
        return _read(url, recent)
    except _NoStatus as e:
        typer.echo(e.message, err=True)
        raise typer.Exit(e.code) from None


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _number(value: Any, spec: str) -> str:
    """A number of the document as text; ``?`` where there is none (JSON has no infinity:
    a broker writes it as null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    return format(value, spec)


def _candidates(route: dict[str, Any]) -> str:
    parts = []
    for c in route.get("candidates") or []:
        score = c.get("score")
        text = f"{c.get('agent', '?')} {score:.3f}" if isinstance(score, int | float) else "?"
        parts.append(text)
    return ", ".join(parts[:4]) or "-"


def render(status: dict[str, Any]) -> Any:
    """The status document as rich renderables (one screen)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    b = status["broker"]
    header = Text.assemble(
        ("agent-broker ", "bold"),
        printable(
            f"{b['version']} (git {b['git_revision']}), nats-server "
            f"{b.get('nats_server_version') or '?'}, tenant {b['tenant']}, "
            f"at {status['generated_at']}"
        ),
    )

    def table(title: str, columns: list[str], rows: list[list[str]], empty: str) -> Table:
        # Titles and cells hold the document's text: Text, never markup ("[/x]" is text).
        t = Table(title=Text(printable(title)), title_justify="left", expand=False, pad_edge=False)
        for column in columns:
            numeric = column in {"messages", "bytes", "first", "last", "lag", "unacked", "seq"}
            t.add_column(column, justify="right" if numeric else "left")
        for row in rows or [[empty, *[""] * (len(columns) - 1)]]:
            t.add_row(*(Text(printable(cell)) for cell in row))
        return t

    streams = table(
        "streams",
        ["stream", "messages", "bytes", "first", "last", "consumers"],
        [
            [
                s["name"],
                f"{s['messages']:,}",
                _size(s["bytes"]),
                str(s["first_seq"]),
                str(s["last_seq"]),
                str(s["consumers"]),
            ]
            for s in status["streams"]
        ],
        "no streams",
    )
    unlisted = status.get("consumers_unlisted") or {}
    cut = "".join(f", {n:,} more on {s} not listed" for s, n in sorted(unlisted.items()))
    consumers = table(
        f"consumers (lag = pending + unacked{cut})",
        ["stream", "consumer", "kind", "lag", "unacked", "redelivered"],
        [
            [
                c["stream"],
                c["name"],
                c["kind"],
                f"{c['lag']:,}",
                str(c["ack_pending"]),
                str(c["redelivered"]),
            ]
            for c in status["consumers"]
        ],
        "no durable consumers",
    )
    agents = table(
        "agents (live load)",
        ["agent", "version", "instances", "in flight", "qps", "p99 ms", "errors"],
        [
            [
                a["name"] + ("" if a["registered"] else " (unregistered)"),
                a.get("version") or "-",
                str(a["load"]["instances"]),
                _number(a["load"]["in_flight"], "g"),
                _number(a["load"]["qps"], ".1f"),
                _number(a["load"]["p99_ms"], ".1f"),
                _number(a["load"]["error_rate"], ".1%"),
            ]
            for a in status["agents"]
        ],
        "no agents",
    )
    routes = table(
        "recent route decisions",
        ["time", "message", "agent", "reason", "top candidates", "trace"],
        [
            [
                (r.get("time") or "")[11:23],
                f"{r.get('message_subject') or r['subject']} #{r.get('message_seq') or '?'}",
                (r.get("agent") or "-") + (" (shadow copy)" if r.get("mirror") else ""),
                r.get("reason") or "?",
                _candidates(r),
                (r.get("trace_id") or "-")[:16],
            ]
            for r in status["routes"]
        ],
        "no decisions yet",
    )
    dlq = table(
        "DLQ (latest)",
        ["seq", "time", "source", "origin", "error"],
        [
            [
                str(d["seq"]),
                (d.get("time") or "")[11:19],
                d["source"],
                f"{d.get('origin_stream') or '?'} #{d.get('origin_seq') or '?'}",
                (d.get("error") or "")[:80],
            ]
            for d in status["dlq"]
        ],
        "empty",
    )
    return Group(header, streams, consumers, agents, routes, dlq)


def status(
    url: Annotated[str, typer.Option(envvar="BROKER_URL", help="Broker base URL.")] = (
        "http://127.0.0.1:8080"
    ),
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C (exit code 130).")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, help="Seconds between refreshes with --watch.")
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON document.")] = False,
    recent: Annotated[
        int, typer.Option(min=1, max=200, help="How many route decisions and DLQ entries.")
    ] = 10,
    output: Annotated[
        str, typer.Option("--output", "-o", help="table or json (json: the same as --json).")
    ] = "table",
) -> None:
    """Streams, consumers and projection lag, agents with live load, recent routing
    decisions and DLQ entries: the whole broker on one screen."""
    if output not in {"table", "json"}:
        raise typer.BadParameter("table or json", param_hint="--output")
    # With --watch only the first read must succeed (a wrong URL is an error at once); a
    # broker restarting later is shown as such, and watched on until it answers again.
    if as_json or output == "json":
        document = _fetch(url, recent)
        typer.echo(json.dumps(document) if watch else json.dumps(document, indent=2))
        try:
            while watch:
                time.sleep(interval)
                try:
                    typer.echo(json.dumps(_read(url, recent)))
                except _NoStatus as e:
                    typer.echo(f"{e.message} (retrying every {interval:g} s)", err=True)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        return
    from rich.console import Console

    console = Console()
    if not watch:
        console.print(render(_fetch(url, recent)))
        return
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    shown = render(_fetch(url, recent))
    if not console.is_terminal:
        # A full-screen display is drawn only on a terminal: into a pipe or a file it wrote
        # nothing at all, not even at Ctrl-C. There each refresh is written as it comes.
        try:
            console.print(shown)
            while True:
                time.sleep(interval)
                try:
                    console.print(render(_read(url, recent)))
                except _NoStatus as e:
                    typer.echo(f"{e.message} (retrying every {interval:g} s)", err=True)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
    try:
        with Live(shown, console=console, screen=True) as live:
            while True:
                time.sleep(interval)
                try:
                    shown = render(_read(url, recent))
                    live.update(shown)
                except _NoStatus as e:
                    notice = Text(f"{e.message} (retrying every {interval:g} s)", style="bold red")
                    live.update(Group(notice, shown))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
