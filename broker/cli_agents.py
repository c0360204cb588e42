"""``broker agents``: apply manifests, list, get and show history over the HTTP API."""

from __future__ import annotations

import contextlib
import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.errors import BrokerError

agents_app = typer.Typer(
    name="agents",
    help="Agent registry: apply manifests, list, get, history.",
    no_args_is_help=True,
)

URL = Annotated[str, typer.Option(envvar="BROKER_URL", help="Broker base URL.")]
OUTPUT = Annotated[str, typer.Option("--output", "-o", help="json or table.")]
GET_OUTPUT = Annotated[
    str, typer.Option("--output", "-o", help="json (the registry record) or yaml (the manifest).")
]
DEFAULT_URL = "http://127.0.0.1:8080"
_MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
#: What the commands read of an agent's record, of its list and of its history.
_RECORD_KEYS = ("name", "version", "seq", "updated_at", "manifest")
_LIST_KEYS = ("agents",)
_HISTORY_KEYS = ("name", "events")


@contextlib.contextmanager
def _client(url: str) -> Iterator[Any]:
    """An HTTP/2 client for ``url``; the broker unreachable (or the connection lost) inside
    the block exits with code 3 and a message, not a traceback."""
    import httpx

    from broker.cli import EXIT_UNAVAILABLE, cli_credentials, cli_tls
    from broker.client import CONNECTION_FAILED

    client = httpx.Client(
        base_url=url.rstrip("/"),
        http2=True,
        http1=url.startswith("https"),
        timeout=30,
        headers=cli_credentials(),
        verify=cli_tls(),
    )
    try:
        with client:
            yield client
    except CONNECTION_FAILED as e:  # h2's ProtocolError too: a broker stopping mid-answer
        typer.echo(f"cannot reach the broker at {url}: {e!r}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None


def _fail(response: Any) -> None:
    from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE

    typer.echo(response.text, err=True)
    raise typer.Exit(EXIT_UNAVAILABLE if response.status_code >= 500 else EXIT_REFUSED)


def _document(response: Any, *keys: str) -> dict[str, Any]:
    """The JSON object of a 2xx answer, with ``keys`` in it. Anything else (a redirect, a
    proxy's login page, a URL that points at another server) is not the broker's answer:
    exit code 3, as for a broker that cannot be reached, and a message, not a traceback."""
    from broker.cli import EXIT_UNAVAILABLE
    from broker.client import broker_document
    from broker.errors import Unavailable

    try:
        return broker_document(response, *keys)
    except Unavailable as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None


def _get_json(
    url: str, path: str, keys: tuple[str, ...], params: dict[str, str] | None = None
) -> dict[str, Any]:
    """GET ``path`` and return its JSON object, which has ``keys``; exits with the documented
    code on an error or an answer that is not the broker's."""
    with _client(url) as client:
        response = client.get(path, params=params)
    if response.status_code >= 400:
        _fail(response)
    return _document(response, *keys)


def _registered(response: Any) -> dict[str, Any] | None:
    """The record a ``GET /v1/agents/{name}`` answered, or ``None`` when the agent is not
    registered (404). Any other answer exits as :func:`_fail` does: an agent that could not be
    read is not an absent one, and putting it without ``If-Match`` could overwrite a change."""
    if response.status_code == 404:
        return None
    if response.status_code >= 400:
        _fail(response)
    return _document(response, *_RECORD_KEYS)


def _manifest_files(path: Path) -> list[Path]:
    if path.is_dir():  # a folder named like a manifest (`sub.yaml/`) is walked, not read
        return sorted(p for p in path.rglob("*") if p.suffix in _MANIFEST_SUFFIXES and p.is_file())
    return [path]


def _agent_name(name: str) -> str:
    """``name`` when it is an agent name; a usage error otherwise. It goes into a URL path,
    where ``../status`` or ``x/history`` would reach another endpoint."""
    from broker.registry.manifest import AGENT_NAME_PATTERN

    if not re.fullmatch(AGENT_NAME_PATTERN.strip("^$"), name):
        raise typer.BadParameter(
            f"{name!r} is not an agent name (1-64 characters of A-Z a-z 0-9 _ -)",
            param_hint="NAME",
        )
    return name


def _pretty(document: Any) -> list[str]:
    return json.dumps(document, indent=2, sort_keys=True).splitlines()


@agents_app.command(
    epilog=(
        "Examples:\n\n  broker agents apply -f agents/\n\n"
        "  broker agents apply -f translator.yaml --dry-run"
    )
)
def apply(
    file: Annotated[
        Path, typer.Option("--file", "-f", exists=True, help="Manifest file or directory.")
    ],
    dry_run: Annotated[bool, typer.Option(help="Show the diff, change nothing.")] = False,
    url: URL = DEFAULT_URL,
) -> None:
    """Register or update agents from manifests, showing a diff of each change first."""
    from broker.registry.manifest import parse_manifest

    manifests = []
    for path in _manifest_files(file):
        content_type = (
            "application/yaml" if path.suffix in (".yaml", ".yml") else "application/json"
        )
        try:
            manifests.append((path, parse_manifest(path.read_bytes(), content_type), content_type))
        except BrokerError as e:
            typer.echo(f"{path}: {e.message}", err=True)
            raise typer.Exit(1) from None
    changed = 0
    with _client(url) as client:
        for path, manifest, _ in manifests:
            current = _registered(client.get(f"/v1/agents/{manifest.name}"))
            old = _pretty(current["manifest"]) if current is not None else []
            new = _pretty(manifest.model_dump(mode="json"))
            diff = list(
                difflib.unified_diff(
                    old, new, f"{manifest.name} (registered)", str(path), lineterm=""
                )
            )
            if not diff:
                typer.echo(f"{manifest.name}: unchanged")
                continue
            changed += 1
            typer.echo("\n".join(diff))
            if dry_run:
                continue
            headers = {"content-type": "application/json"}
            if current is not None:
                headers["if-match"] = f'"{current["seq"]}"'
            response = client.put(
                f"/v1/agents/{manifest.name}",
                content=json.dumps(manifest.model_dump(mode="json")),
                headers=headers,
            )
            if response.status_code >= 400:
                _fail(response)
            change = _document(response, "event", "seq")
            typer.echo(f"{manifest.name}: {change['event']} (seq {change['seq']})")
    typer.echo(
        f"{len(manifests)} manifest(s), {changed} change(s){' (dry run)' if dry_run else ''}"
    )


@agents_app.command(
    "list",
    epilog=(
        "Examples:\n\n"
        "  broker agents list\n\n"
        "  broker agents list --as-of 2026-11-24T10:00:00Z -o json"
    ),
)
def list_agents(
    as_of: Annotated[str | None, typer.Option(help="Stream sequence or RFC 3339 time.")] = None,
    url: URL = DEFAULT_URL,
    output: OUTPUT = "table",
) -> None:
    """List registered agents by name (now, or as they were at --as-of), read a page at a
    time. With --as-of, every page is of the registry the first page was read from; without,
    each page is the live registry when it is read, so an agent changed meanwhile may show
    as it was or as it is. -o json prints {seq, as_of, agents}: seq is the lowest registry
    seq a page was read at."""
    from broker.client import next_after

    _check_output(output, "json", "table")
    params = {"as_of": as_of} if as_of else {}
    agents: list[dict[str, Any]] = []  # json: every record; table: only its row is kept
    rows: list[tuple[str, ...]] = []
    seqs: list[int] = []
    after: str | None = None
    with _client(url) as client:
        while True:
            response = client.get("/v1/agents", params=params)
            if response.status_code >= 400:
                _fail(response)
            body = _document(response, *_LIST_KEYS)
            if isinstance(body.get("seq"), int):
                seqs.append(body["seq"])
                if as_of:  # the pages after the first at the seq the first was read at
                    params["as_of"] = str(body["seq"])
            if output == "json":
                agents.extend(body["agents"])
            else:
                rows.extend(_row(agent) for agent in body["agents"])
            after = next_after(body, after)
            if after is None:
                break
            params["after"] = after
    if output == "json":
        document = {"seq": min(seqs, default=None), "as_of": as_of, "agents": agents}
        typer.echo(json.dumps(document, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "version", "seq", "capabilities", "updated")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _check_output(output: str, *allowed: str) -> None:
    """A usage error (exit 2) for an ``-o`` the command does not print, before any request:
    an unknown one used to print the command's default silently."""
    if output not in allowed:
        raise typer.BadParameter(" or ".join(allowed), param_hint="--output")


def _row(agent: dict[str, Any]) -> tuple[str, ...]:
    """An agent's line in the ``list`` table."""
    actions = ", ".join(c["action"] for c in agent["manifest"]["capabilities"])
    return agent["name"], agent["version"], str(agent["seq"]), actions, str(agent["updated_at"])


@agents_app.command(
    epilog=(
        "Examples:\n\n  broker agents get translator\n\n  broker agents get translator -o yaml"
    ),
)
def get(name: str, url: URL = DEFAULT_URL, output: GET_OUTPUT = "json") -> None:
    """Print one agent: its registry record (json) or only its manifest (yaml)."""
    _check_output(output, "json", "yaml")
    body = _get_json(url, f"/v1/agents/{_agent_name(name)}", _RECORD_KEYS)
    if output == "yaml":
        import yaml

        typer.echo(yaml.safe_dump(body["manifest"], sort_keys=False).rstrip())
        return
    typer.echo(json.dumps(body, indent=2))


@agents_app.command(
    epilog=(
        "Examples:\n\n"
        "  broker agents history translator\n\n"
        "  broker agents history translator -o json"
    ),
)
def history(name: str, url: URL = DEFAULT_URL, output: OUTPUT = "table") -> None:
    """Every registry event of one agent, oldest first (read a page at a time; the table
    shows each page as it comes)."""
    from broker.client import next_page

    _check_output(output, "json", "table")
    path = f"/v1/agents/{_agent_name(name)}/history"
    events: list[dict[str, Any]] = []
    start: int | None = 1
    while start is not None:
        body = _get_json(url, path, _HISTORY_KEYS, {"from_seq": str(start)})
        start = next_page(body, start)
        if output == "json":
            events.extend(body["events"])
            continue
        for event in body["events"]:
            version = event["manifest"]["version"] if event["manifest"] else "-"
            typer.echo(f"{event['seq']:>8}  {event['at']}  {event['type']:<18} {version}")
    if output == "json":
        typer.echo(json.dumps({"name": body["name"], "events": events}, indent=2))


@agents_app.command(
    "import-a2a",
    epilog=("Examples:\n\n  broker agents import-a2a agent-card.json -o translator.yaml"),
)
def import_a2a(
    card: Annotated[Path, typer.Argument(exists=True, help="A2A agent card (agent.json).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the manifest here.")
    ] = None,
) -> None:
    """Convert an A2A agent card into a manifest (YAML), ready for `broker agents apply`.

    A version that is not Semantic Versioning becomes the nearest one (1.0-beta:
    1.0.0-beta; a date: its numbers); input modes are read as media types (the older
    text, data and file modes too); skill ids that clean up alike get -2, -3 suffixes."""
    import yaml

    from broker.registry.a2a import manifest_from_agent_card

    if output is not None and not output.parent.is_dir():
        raise typer.BadParameter(f"no directory {output.parent}", param_hint="--output")
    try:
        manifest = manifest_from_agent_card(json.loads(card.read_bytes()))
    except (BrokerError, json.JSONDecodeError, UnicodeDecodeError) as e:
        typer.echo(f"{card}: {getattr(e, 'message', e)}", err=True)
        raise typer.Exit(1) from None
    text = yaml.safe_dump(manifest.model_dump(mode="json", exclude_none=True), sort_keys=False)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {output}")
