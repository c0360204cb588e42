"""Pure decisions of the projection runtime under faults: whose fault a database error is,
which headers a dead letter can carry, and where JSON text really holds U+0000."""

from __future__ import annotations

import sqlite3

import orjson
import psycopg
import psycopg.errors as pg
import pytest
import sqlalchemy as sa

from broker.natsconn import message_size
from projections._replica_tables import holds_nul, json_value
from projections.checkpoints import is_transient, sqlstate
from projections.runtime import dlq_headers

pytestmark = pytest.mark.unit


def wrapped(orig: Exception, driver: type[Exception] = psycopg.Error) -> sa.exc.DBAPIError:
    """``orig`` as SQLAlchemy raises it from a statement (the class it maps the error to)."""
    error = sa.exc.DBAPIError.instance("INSERT ...", {}, orig, driver)
    assert isinstance(error, sa.exc.DBAPIError)
    return error


@pytest.mark.parametrize(
    ("orig", "expected"),
    [
        (pg.ConnectionException("server closed the connection"), "08000"),
        (pg.SerializationFailure("could not serialize access"), "40001"),
        (pg.DeadlockDetected("deadlock detected"), "40P01"),
        (pg.DiskFull("could not extend file"), "53100"),
        (pg.AdminShutdown("terminating connection due to administrator command"), "57P01"),
        (pg.LockNotAvailable("could not obtain lock"), "55P03"),
        (pg.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"), "25006"),
        (pg.UndefinedTable('relation "replica_messages" does not exist'), "42P01"),
    ],
)
def test_postgresql_errors_of_the_database_hold_the_batch(orig: Exception, expected: str) -> None:
    error = wrapped(orig)
    assert sqlstate(error) == expected
    assert is_transient(error)


@pytest.mark.parametrize(
    "orig",
    [
        pg.ProgramLimitExceeded("index row size 3376 exceeds btree version 4 maximum 2704"),
        pg.NumericValueOutOfRange("value out of range"),
        pg.UniqueViolation("duplicate key value violates unique constraint"),
        pg.InternalError_("unexpected internal error"),
    ],
)
def test_postgresql_errors_of_the_values_blame_the_event(orig: Exception) -> None:
    """54000 reaches SQLAlchemy as an OperationalError, yet it is the value's fault."""
    assert not is_transient(wrapped(orig))


def test_a_connection_error_without_a_sqlstate_holds_the_batch() -> None:
    error = wrapped(psycopg.OperationalError("connection to server failed: Connection refused"))
    assert sqlstate(error) is None
    assert is_transient(error)


@pytest.mark.parametrize(
    ("orig", "transient"),
    [
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("attempt to write a readonly database"), True),
        (sqlite3.DataError("string or blob too big"), False),
        (sqlite3.IntegrityError("UNIQUE constraint failed: replica_agents.name"), False),
    ],
)
def test_sqlite_errors_are_judged_by_their_class(orig: Exception, transient: bool) -> None:
    error = wrapped(orig, sqlite3.Error)
    assert sqlstate(error) is None
    assert is_transient(error) is transient


def test_dead_letter_headers_keep_only_names_a_client_can_publish() -> None:
    headers = {
        "Content-Type": "application/json",
        "X/Trace": "1",
        "Nats-Msg-Id": "abc",
        "X Space": "1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    assert dlq_headers(headers) == {
        "Content-Type": "application/json",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }


def test_dead_letter_headers_are_bounded_in_size() -> None:
    headers = {f"X-H{i}": "v" * 1000 for i in range(40)}
    kept = dlq_headers(headers, budget=5000)
    assert list(kept) == ["X-H0", "X-H1", "X-H2", "X-H3"]
    assert message_size(b"", kept) - 12 <= 5000


def test_message_size_counts_the_header_block_and_the_payload() -> None:
    # NATS/1.0\r\n + "A: b\r\n" + \r\n + payload
    assert message_size(b"xyz", {"A": "b"}) == len(b"NATS/1.0\r\nA: b\r\n\r\n") + 3


@pytest.mark.parametrize(
    ("value", "nul"),
    [
        ("\\u0000", False),  # a backslash, then u0000: six characters of text
        ("\\\\u0000", False),  # two backslashes, then u0000
        ("\x00", True),
        ("\\\x00", True),  # a backslash, then U+0000
        ("plain", False),
    ],
)
def test_only_a_real_u0000_counts_as_one(value: str, nul: bool) -> None:
    assert holds_nul(orjson.dumps({"pattern": value})) is nul
    assert holds_nul(orjson.dumps({value: 1})) is nul


def test_json_value_replaces_real_u0000_and_keeps_the_text_backslash_u0000() -> None:
    value = {"text": "escape NUL as \\u0000", "nul": "a\x00b", "k\x00": "\\\x00"}
    assert json_value(value) == {
        "text": "escape NUL as \\u0000",
        "nul": "a\ufffdb",
        "k\ufffd": "\\\ufffd",
    }
