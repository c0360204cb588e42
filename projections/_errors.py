"""What a projection's error may say in a log line or a dead letter, without the data.

SQLAlchemy's message for a failed statement ends in the statement and its bound
parameters (``[SQL: …] [parameters: …]``): the rows of the batch, payloads of other
tenants among them. Payloads are never logged (docs/sensitive-data.md), so an error is
described by its type and, for a database error, the database's own primary message and
its code (PostgreSQL's SQLSTATE, SQLite's error name), without the statement, the
parameters or PostgreSQL's ``DETAIL`` (``Key (seq)=(…)``).
"""

from __future__ import annotations

import sqlalchemy as sa

#: At most this many characters of an error's own message are kept.
MAX_MESSAGE = 300


def error_type(error: BaseException) -> str:
    """The error's class, with the database driver's class under a SQLAlchemy wrapper
    (``OperationalError (psycopg.errors.ProgramLimitExceeded)``)."""
    name = type(error).__name__
    orig = error.orig if isinstance(error, sa.exc.StatementError) else None
    if orig is None:
        return name
    cls = type(orig)
    return f"{name} ({cls.__module__}.{cls.__qualname__})"


def error_text(error: BaseException) -> str:
    """``error``'s message without bound parameters or statement: for a SQLAlchemy error
    the driver's own primary message, ``[SQLSTATE 54000]`` (``[SQLITE_CONSTRAINT_UNIQUE]``)
    after it; any other error's message as it is. Never empty, at most
    :data:`MAX_MESSAGE` characters and one line."""
    if isinstance(error, sa.exc.StatementError):
        text = _driver_message(error.orig) if error.orig is not None else ""
        text = text or type(error).__name__
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())[:MAX_MESSAGE]


def _driver_message(orig: BaseException) -> str:
    diag = getattr(orig, "diag", None)  # psycopg: the fields of the server's error report
    primary = getattr(diag, "message_primary", None)
    # Otherwise the first line: psycopg puts DETAIL and HINT on lines of their own.
    message = primary if isinstance(primary, str) else (str(orig).splitlines() or [""])[0]
    code = next(
        (
            value
            for name in ("sqlstate", "pgcode", "sqlite_errorname")
            if isinstance(value := getattr(orig, name, None), str) and value
        ),
        None,
    )
    if code:
        label = f"SQLSTATE {code}" if not code.startswith("SQLITE") else code
        return f"{message} [{label}]"
    return message
