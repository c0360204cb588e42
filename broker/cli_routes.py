"""``broker router`` (run a router) and ``broker routes simulate`` (what-if replay)."""

from __future__ import annotations

import asyncio
import csv
import heapq
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from broker.cli_projections import (
    DEFAULT_NATS,
    METRICS_HOST,
    METRICS_PORT,
    NATS_URL,
    open_nats,
    require_streams,
    start_metrics,
)
from broker.natsconn import redact_servers
from broker.settings import EMBEDDER_HELP

if TYPE_CHECKING:
    from broker.routing.embedder import Embedder
    from broker.routing.simulate import Resimulated, SimulationReport

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
        settings = get_settings()
        tls_and_auth = connect_options(settings, servers=nats_url, name="broker-router")
        servers = tls_and_auth["servers"]
        options = RouterOptions(
            servers, policy, embedder, load_ttl, tls_and_auth, settings.stop_deadline_seconds
        )
        tune_gc()  # a long-running process: see broker._process.tune_gc
        asyncio.run(run_router(options))
    except BrokerError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(2) from None


#: ``--csv`` rows held in memory at most: more are written, sorted, to temporary files
#: beside the CSV (:data:`CSV_MAX_RUNS` at most) and merged into it at the end.
CSV_RUN_ROWS = 20_000
CSV_MAX_RUNS = 64

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
        Path | None,
        typer.Option(
            "--csv",
            help="Write every decision, old and new, as CSV, sorted by tenant and message "
            f"sequence (at most {CSV_RUN_ROWS} rows held in memory; the others wait, sorted, "
            "in temporary files beside it).",
        ),
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json.")] = "table",
) -> None:
    """Re-score recorded decisions under another policy; print how many would change and
    where (from agent -> to agent). Memory holds the counts, not the decisions."""
    from broker.errors import BrokerError
    from broker.logs import configure_logging

    configure_logging()
    if output not in {"table", "json"}:
        raise typer.BadParameter("table or json", param_hint="--output")
    start = _since(since)
    _check_tenant(tenant)
    _check_csv_path(csv_path)  # before the replay, which can take minutes, not after it
    scorer_embedder = _embedder(embedder)  # before NATS and the registry replay, too
    rows = None if csv_path is None else _SortedRows(csv_path.parent, CSV_RUN_ROWS, CSV_MAX_RUNS)
    try:
        report = asyncio.run(_simulate(nats_url, policy, scorer_embedder, start, tenant, rows))
    except BrokerError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    except OSError as e:
        typer.echo(f"error: cannot reach NATS at {redact_servers(nats_url)}: {e}", err=True)
        raise typer.Exit(3) from None
    written = True
    if csv_path is not None and rows is not None:
        try:
            rows.write(csv_path)
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


def _check_tenant(tenant: str | None) -> None:
    """A name no tenant can have matches no decision: a usage error, not an empty report."""
    from broker.auth import valid_tenant

    if tenant is not None:
        try:
            valid_tenant(tenant)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--tenant") from None


def _embedder(spec: str | None) -> Embedder:
    from broker.routing.embedder import EmbedderUnavailable, load_embedder

    try:
        return load_embedder(spec)
    except EmbedderUnavailable as e:
        raise typer.BadParameter(e.message, param_hint="--embedder") from None


async def _simulate(
    nats_url: str,
    policy_path: Path,
    embedder: Embedder,
    since: datetime | None,
    tenant: str | None,
    rows: _SortedRows | None,
) -> SimulationReport:
    """The replay's counts; each decision goes to ``rows`` (the ``--csv``), if given, and
    is not kept."""
    from broker.registry.snapshot import RegistryView
    from broker.routing.policy import load_policy
    from broker.routing.scoring import Scorer
    from broker.routing.simulate import simulate as run
    from broker.streams import Stream

    policy = load_policy(policy_path)
    nc = await open_nats(nats_url, "broker-routes-simulate")
    try:
        await require_streams(nc, nats_url, Stream.REGISTRY, Stream.ROUTES, Stream.DLQ)
        js = nc.jetstream(timeout=10.0)
        view = RegistryView()
        await view.start(js)
        scorer = Scorer(embedder, policy)
        # Counted; each decision goes to the CSV's rows, or nowhere.
        keep = rows.add if rows is not None else _drop
        return await run(js, view.snapshot, scorer, since=since, tenant=tenant, rows=keep)
    finally:
        await nc.close()


def _drop(row: Resimulated) -> None:
    """Without ``--csv`` a decision is counted and forgotten."""


def _csv_order(row: list[str]) -> tuple[str, int]:
    """A CSV row's place in the report: tenant, then message sequence (the first columns)."""
    return row[0], int(row[1])


class _SortedRows:
    """The ``--csv`` rows, sorted as :meth:`SimulationReport.to_csv` sorts them, with at most
    ``run_rows`` of them in memory: each run of that many is written, sorted, to a temporary
    file in ``folder`` (deleted when closed), and the runs are merged into the CSV at the
    end; past ``max_runs`` runs, they are merged into one first. A run that cannot be
    written (a full disk) stops the CSV, not the replay: :meth:`write` raises it."""

    def __init__(self, folder: Path, run_rows: int, max_runs: int) -> None:
        self.folder, self.run_rows, self.max_runs = folder, run_rows, max_runs
        self.held: list[Resimulated] = []
        self.runs: list[IO[str]] = []
        self.failed: OSError | None = None

    def add(self, row: Resimulated) -> None:
        if self.failed is not None:
            return
        self.held.append(row)
        if len(self.held) >= self.run_rows:
            try:
                self._spill()
            except OSError as e:
                self.failed = e
                self._close()

    def write(self, path: Path) -> None:
        """Write the CSV to ``path``; the temporary files are gone after, written or not."""
        try:
            if self.failed is not None:
                raise self.failed
            if not self.runs:  # all in memory: sorted as the report sorts them
                with path.open("w", newline="") as out:
                    out.write(self._csv(self.held))
                return
            self._spill()
            with path.open("w", newline="") as out:
                self._merge(out, self.runs)
        finally:
            self._close()

    def _csv(self, rows: list[Resimulated]) -> str:
        from broker.routing.simulate import SimulationReport

        rows.sort(key=lambda r: (r.tenant, r.message_seq))  # stable, as the report's sort
        return SimulationReport(policy_version="", rows=rows).to_csv()

    def _spill(self) -> None:
        if len(self.runs) >= self.max_runs:
            merged = tempfile.TemporaryFile("w+", newline="", dir=self.folder)  # noqa: SIM115
            self.runs.append(merged)  # closed with the others if the merge fails
            self._merge(merged, self.runs[:-1])
            for run in self.runs[:-1]:
                run.close()
            self.runs = [merged]
        run = tempfile.TemporaryFile("w+", newline="", dir=self.folder)  # noqa: SIM115
        self.runs.append(run)
        run.write(self._csv(self.held))
        self.held = []

    @staticmethod
    def _merge(out: IO[str], runs: list[IO[str]]) -> None:
        """``runs``, header first, merged in order (equal keys in the order they were read:
        runs are in reading order, and heapq.merge keeps that order among equals)."""
        writer = csv.writer(out)
        readers = []
        for number, run in enumerate(runs):
            run.seek(0)
            reader = csv.reader(run)
            header = next(reader)
            if number == 0:
                writer.writerow(header)
            readers.append(reader)
        merged: Iterator[list[str]] = heapq.merge(*readers, key=_csv_order)
        writer.writerows(merged)

    def _close(self) -> None:
        for run in self.runs:
            run.close()
        self.runs, self.held = [], []


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
