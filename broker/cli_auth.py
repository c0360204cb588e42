"""``broker auth``: make API keys for the auth file (see ``docs/tenants.md``)."""

from __future__ import annotations

import secrets
from typing import Annotated

import typer
import yaml

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

    if not 1 <= len(key_id) <= 128:
        raise typer.BadParameter("give 1 to 128 characters", param_hint="--id")
    if not _is_text(key_id):  # bytes of the command line that are not UTF-8
        raise typer.BadParameter("give text in UTF-8 (this is not)", param_hint="--id")
    try:
        tenants = [valid_tenant(t) for t in tenant]
        scopes = [Scope(s).value for s in scope]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    key = secrets.token_urlsafe(32)
    typer.echo(f"API key (shown once): {key}", err=True)
    typer.echo(
        f"  - id: {_quoted(key_id)}\n"
        f"    sha256: {key_digest(key)}\n"
        f"    tenants: [{', '.join(_quoted(t) for t in tenants)}]\n"
        f"    scopes: [{', '.join(_quoted(s) for s in scopes)}]"
    )


def _quoted(text: str) -> str:
    """``text`` as one YAML double-quoted scalar on one line: an id such as `yes`, `123`,
    `a: b` or `#ops` stays the string it was, and the entry cannot break the file it is
    appended to. YAML's own escapes, not JSON's: JSON writes a character beyond U+FFFF
    (an emoji) as two ``\\u`` surrogates, which YAML reads as two lone surrogates that the
    auth file's loader then refuses."""
    dumped = yaml.safe_dump(text, default_style='"', allow_unicode=True, width=_NO_FOLDING)
    return dumped.removesuffix("\n")


_NO_FOLDING = 1 << 30  # a line width no scalar reaches: the scalar stays on its line


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
