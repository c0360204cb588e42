"""``broker auth``: make API keys for the auth file (see ``docs/tenants.md``)."""

from __future__ import annotations

import secrets
from typing import Annotated

import typer

auth_app = typer.Typer(
    name="auth",
    help="API keys for `broker serve --auth-file`.",
    no_args_is_help=True,
)

NEW_KEY_EPILOG = (
    "Examples:\n\n"
    "  broker auth new-key --id shop-publisher --tenant shop --scope publish\n\n"
    "  broker auth new-key --id ops --tenant shop --tenant billing --scope consume "
    ">> auth.yaml   # the key goes to stderr"
)


@auth_app.command("new-key", epilog=NEW_KEY_EPILOG)
def new_key(
    key_id: Annotated[str, typer.Option("--id", help="The key's name in logs.")],
    tenant: Annotated[
        list[str], typer.Option(help="A tenant the key acts for (repeat; the first is default).")
    ],
    scope: Annotated[
        list[str],
        typer.Option(help="publish, consume, registry:admin or schema:admin (repeat)."),
    ],
) -> None:
    """Make a random API key: the key on stderr (give it to the client), and on stdout the
    `api_keys` entry with its SHA-256 (put it in the auth file; the key itself is not kept)."""
    from broker.auth import Scope, key_digest, valid_tenant

    try:
        tenants = [valid_tenant(t) for t in tenant]
        scopes = [Scope(s).value for s in scope]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    key = secrets.token_urlsafe(32)
    typer.echo(f"API key (shown once): {key}", err=True)
    typer.echo(
        f"  - id: {key_id}\n"
        f"    sha256: {key_digest(key)}\n"
        f"    tenants: [{', '.join(tenants)}]\n"
        f"    scopes: [{', '.join(repr(s) for s in scopes)}]"
    )
