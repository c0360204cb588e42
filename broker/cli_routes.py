"""``broker router`` (run a router) and ``broker routes simulate`` (what-if replay)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli_projections import (
    DEFAULT_NATS,
    METRICS_HOST,
    METRICS_PORT,
    NATS_URL,
    open_nats,
    start_metrics,
)
from broker.natsconn import redact_servers
from broker.settings import EMBEDDER_HELP

POLICY = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        envvar="BROKER_ROUTING_POLICY",
        exists=True,
        dir_okay=False,
        help="Routing policy YAML (default: the built-in policy); applied again when the "
        "file changes (or on SIGHUP), the running one kept when it does not validate.",
    ),
]
EMBEDDER = Annotated[
    str | None,
    typer.Option(
        envvar="BROKER_ROUTING_EMBEDDER",
        help=EMBEDDER_HELP,
    ),
]

ROUTER_EPILOG = (
    "Examples:\n\n"
    "  broker router --nats-url nats://127.0.0.1:4222\n\n"
    "  broker router --policy routing.yaml      # weights, penalties, canary, mirrors\n\n"
    "  broker router --metrics-port 9102 --metrics-host 0.0.0.0   # Prometheus scrapes it\n\n"
    "Run more routers, here or on other machines, to split the work."
)
routes_app = typer.Typer(
    name="routes",
    help="Routing decisions: what-if replay under another policy.",
    no_args_is_help=True,
)


def router(
    nats_url: NATS_URL = DEFAULT_NATS,
    policy: POLICY = None,
    embedder: EMBEDDER = None,
    load_ttl: Annotated[
        float, typer.Option(min=0.1, help="Seconds before a silent agent instance is dropped.")
    ] = 15.0,
    metrics_port: METRICS_PORT = 0,
    metrics_host: METRICS_HOST = "127.0.0.1",
) -> None:
    """Route messages published with POST /v1/route until Ctrl-C / SIGTERM.

    Reads MESSAGES, scores the tenant's agents by capability, modality, meaning and live
    load, and appends RouteDecided to the chosen agent's inbox (ROUTES).
    """
    from broker._process import tune_gc
    from broker.errors import BrokerError
    from broker.logs import configure_logging
    from broker.natsconn import connect_options
    from broker.routing.service import RouterOptions, run_router
    from broker.settings import get_settings

    configure_logging()
    start_metrics(metrics_host, metrics_port)
    try:
        tls_and_auth = connect_options(get_settings(), servers=nats_url, name="broker-router")
        options = RouterOptions(nats_url.split(","), policy, embedder, load_ttl, tls_and_auth)
        tune_gc()  # a long-running process: see broker._process.tune_gc
        asyncio.run(run_router(options))
    except BrokerError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(2) from None


SIMULATE_EPILOG = (
    "Examples:\n\n"
    "  broker routes simulate --policy candidate.yaml --since 2026-11-25T10:00:00Z\n\n"
    "  broker routes simulate --policy candidate.yaml --csv changes.csv -o json"
)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 time", param_hint="--since"
        ) from None
    if parsed.tzinfo is None:
        raise typer.BadParameter(
            "give a time zone, e.g. 2026-11-25T10:00:00Z", param_hint="--since"
        )
    return parsed


@routes_app.command(epilog=SIMULATE_EPILOG)
def simulate(
    policy: Annotated[
        Path,
        typer.Option(
            "--policy", exists=True, dir_okay=False, help="The policy to re-score with (YAML)."
        ),
    ],
    nats_url: NATS_URL = DEFAULT_NATS,
    since: Annotated[
        str | None, typer.Option(help="Only decisions from this time (ISO 8601 with a zone).")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's decisions.")] = None,
    embedder: EMBEDDER = None,
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="Write every decision, old and new, as CSV.")
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json.")] = "table",
) -> None:
    """Re-score recorded decisions under another policy; print how many would change and
    where (from agent -> to agent)."""
    from broker.errors import BrokerError
    from broker.logs import configure_logging

    configure_logging()
    if output not in {"table", "json"}:
        raise typer.BadParameter("table or json", param_hint="--output")
    start = _since(since)
    _check_csv_path(csv_path)  # before the replay, which can take minutes, not after it
    try:
        report = asyncio.run(_simulate(nats_url, policy, embedder, start, tenant))
    except BrokerError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    except OSError as e:
        typer.echo(f"error: cannot reach NATS at {redact_servers(nats_url)}: {e}", err=True)
        raise typer.Exit(3) from None
    written = True
    if csv_path is not None:
        try:
            csv_path.write_text(report.to_csv())
        except OSError as e:  # the report is still printed: the replay is not lost
            typer.echo(f"error: cannot write {csv_path}: {e}", err=True)
            written, csv_path = False, None
    if output == "json":
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_table(report.to_dict(), csv_path)
    if not written:
        raise typer.Exit(1)


def _check_csv_path(path: Path | None) -> None:
    """A ``--csv`` that could not be written is a usage error now, not a traceback later."""
    if path is None:
        return
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory", param_hint="--csv")
    if not path.parent.is_dir():
        raise typer.BadParameter(f"{path.parent} is not a directory", param_hint="--csv")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise typer.BadParameter(f"{path} cannot be written", param_hint="--csv")


async def _simulate(
    nats_url: str,
    policy_path: Path,
    embedder: str | None,
    since: datetime | None,
    tenant: str | None,
) -> Any:

    from broker.registry.snapshot import RegistryView
    from broker.routing.embedder import load_embedder
    from broker.routing.policy import load_policy
    from broker.routing.scoring import Scorer
    from broker.routing.simulate import simulate as run

    policy = load_policy(policy_path)
    nc = await open_nats(nats_url, "broker-routes-simulate")
    try:
        js = nc.jetstream(timeout=10.0)
        view = RegistryView()
        await view.start(js)
        scorer = Scorer(load_embedder(embedder), policy)
        return await run(js, view.snapshot, scorer, since=since, tenant=tenant)
    finally:
        await nc.close()


def _print_table(report: dict[str, Any], csv_path: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Policy versions, agent names and paths are data: printed as text, never as markup.
    console = Console(file=sys.stdout, markup=False, highlight=False)
    total, changed = report["decisions"], report["changed"]
    share = f"{changed / total:.1%}" if total else "-"
    console.print(
        f"policy {report['policy_version']}: {changed} of {total} decisions would change ({share})"
    )
    if report["moves"]:
        table = Table("from agent", "to agent", "decisions")
        for move in report["moves"]:
            table.add_row(Text(move["from"]), Text(move["to"]), str(move["count"]))
        console.print(table)
    if report["unreadable"]:
        console.print(f"{report['unreadable']} stored decisions could not be read")
    if csv_path is not None:
        console.print(f"every decision: {csv_path}")
