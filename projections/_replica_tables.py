"""The SQL side of the replicas: tables, portable column types, and the batched writers.

Everything here is SQLAlchemy Core and reads the same on SQLite and PostgreSQL:

- :class:`UtcDateTime` stores UTC and always reads back timezone-aware (SQLite keeps no
  offset of its own); :data:`JSON_VALUE` is ``JSONB`` on PostgreSQL, ``JSON`` elsewhere,
  with Python ``None`` stored as SQL ``NULL``.
- :func:`append_rows` inserts an append-only batch with one ``INSERT … ON CONFLICT DO
  NOTHING`` (idempotent on the primary key); :func:`write_state` writes a folded batch of
  keyed state with one upsert and one delete per table.
- :class:`ChangeLog` collects the change events (CDC) of one ``apply`` and writes them to
  :data:`outbox` in the same transaction, in one insert.
- :func:`record_audits` writes audit records (card numbers redacted) to :data:`audit`, once
  per stored message, and each new one to :data:`outbox` (op ``a``), in the same
  transaction.

PostgreSQL text cannot hold U+0000, so free text from clients goes through :func:`text` and
JSON through :func:`json_value` first, on every dialect alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

metadata = sa.MetaData()

Row = dict[str, Any]
K = TypeVar("K", bound=tuple[Any, ...])

#: Rows per ``IN (…)`` list when reading back what a batch touches (below SQLite's limits).
CHUNK = 400


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored as UTC; naive values are taken to be UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite's DATETIME is text without an offset: store the UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: A JSON document column: JSONB on PostgreSQL (queryable, indexable), JSON elsewhere.
JSON_VALUE = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)
#: Stream sequences are unsigned 64-bit in JetStream; they fit a signed BIGINT in practice.
SEQ = sa.BigInteger

outbox = sa.Table(
    "broker_outbox",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),  # SQLite: INTEGER PK autoincrements
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("projection", sa.String(128), nullable=False),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("op", sa.String(1), nullable=False),
    sa.Column("key", JSON_VALUE, nullable=False),
    sa.Column("before", JSON_VALUE, nullable=True),
    sa.Column("after", JSON_VALUE, nullable=True),
    sa.Column("source_stream", sa.String(64), nullable=False),
    sa.Column("source_seq", SEQ, nullable=False),
)


#: The outbox ``op`` of an audit event (the others are the change events ``c``/``u``/``d``).
AUDIT_OP = "a"

#: Audit records: one per (kind, stream, seq), written in the transaction of the replica
#: row they are about. A replica's reset leaves them alone, so a rebuild from the stream's
#: start records (and publishes) nothing twice.
audit = sa.Table(
    "broker_audit",
    metadata,
    sa.Column("kind", sa.String(64), primary_key=True),
    sa.Column("stream", sa.String(64), primary_key=True),
    sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("projection", sa.String(128), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("findings", JSON_VALUE, nullable=False),
    sa.Column("truncated", sa.Boolean, nullable=False),
    sa.Column("time", UtcDateTime, nullable=True),
)


def ensure_outbox(tx: sa.Connection) -> None:
    """Create ``broker_outbox`` if it is missing."""
    metadata.create_all(tx, tables=[outbox], checkfirst=True)


def text(value: str) -> str:
    """``value`` with U+0000 (which PostgreSQL text cannot hold) as U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


#: ``\u0000`` in JSON text that stands for U+0000: after an even number of backslashes (none,
#: or escaped backslashes), so not the text ``\\u0000`` (a backslash, then ``u0000``).
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def holds_nul(encoded: bytes) -> bool:
    """Whether JSON text ``encoded`` holds U+0000 in a string or key (as ``\\u0000``)."""
    return b"\\u0000" in encoded and _NUL_ESCAPE.search(encoded) is not None


def json_value(value: Any) -> Any:
    """``value`` ready for a JSON column: U+0000 in any string or key becomes U+FFFD."""
    encoded = orjson.dumps(value)
    if not holds_nul(encoded):
        return value
    return orjson.loads(_NUL_ESCAPE.sub(rb"\1\\ufffd", encoded))


def jsonable(row: Mapping[str, Any]) -> Row:
    """A row as a JSON object for a change event (timestamps as ISO 8601 text)."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def dialect_insert(tx: sa.Connection, table: sa.Table) -> Any:
    """The dialect's ``INSERT`` (with ``on_conflict_do_*``) for ``tx``'s database."""
    if tx.dialect.name == "postgresql":
        return postgresql.insert(table)
    if tx.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"replicas support SQLite and PostgreSQL, not {tx.dialect.name}")


@dataclass
class ChangeLog:
    """The change events of one ``apply``, written to :data:`outbox` in one insert."""

    projection: str
    stream: str
    rows: list[Row] = field(default_factory=list)

    def add(
        self,
        table: sa.Table,
        op: str,
        *,
        key: Mapping[str, Any],
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        seq: int,
    ) -> None:
        self.rows.append(
            {
                "projection": self.projection,
                "table_name": table.name,
                "op": op,
                "key": dict(key),
                "before": jsonable(before) if before is not None else None,
                "after": jsonable(after) if after is not None else None,
                "source_stream": self.stream,
                "source_seq": seq,
            }
        )

    def flush(self, tx: sa.Connection) -> None:
        if self.rows:
            tx.execute(outbox.insert(), self.rows)
            self.rows = []


def append_rows(
    tx: sa.Connection, table: sa.Table, rows: Sequence[Row], changes: ChangeLog | None
) -> None:
    """Insert ``rows`` (keyed by ``seq``) in one statement; rows already there are left
    alone, and only rows actually inserted become ``c`` change events."""
    if not rows:
        return
    stmt = dialect_insert(tx, table).on_conflict_do_nothing(index_elements=["seq"])
    if changes is None:
        tx.execute(stmt, list(rows))
        return
    inserted = set(tx.execute(stmt.returning(table.c.seq), list(rows)).scalars())
    for row in rows:
        if row["seq"] in inserted:
            changes.add(table, "c", key={"seq": row["seq"]}, before=None, after=row, seq=row["seq"])


def record_audits(tx: sa.Connection, records: Sequence[Row]) -> int:
    """Insert audit ``records`` (rows of :data:`audit`) in one statement; records already
    there are left alone, and each one actually inserted also becomes an outbox row
    (``op`` :data:`AUDIT_OP`, the record as ``after``) for the relay to publish. Returns
    how many were new."""
    if not records:
        return 0
    key = ["kind", "stream", "seq"]
    stmt = dialect_insert(tx, audit).on_conflict_do_nothing(index_elements=key)
    returned = tx.execute(stmt.returning(*(audit.c[k] for k in key)), list(records))
    inserted = {tuple(row) for row in returned}
    events = [
        {
            "projection": record["projection"],
            "table_name": audit.name,
            "op": AUDIT_OP,
            "key": {k: record[k] for k in key},
            "before": None,
            "after": jsonable(record),
            "source_stream": record["stream"],
            "source_seq": record["seq"],
        }
        for record in records
        if (record["kind"], record["stream"], record["seq"]) in inserted
    ]
    if events:
        tx.execute(outbox.insert(), events)
    return len(events)


def existing(
    tx: sa.Connection,
    table: sa.Table,
    key: Sequence[str],
    values: Iterable[tuple[Any, ...]],
    *,
    by: Sequence[str] | None = None,
) -> dict[tuple[Any, ...], Row]:
    """The stored rows of ``table`` whose ``by`` columns (default: ``key``) hold one of
    ``values``, by their ``key`` columns."""
    columns = [table.c[name] for name in by or key]
    match = columns[0] if len(columns) == 1 else sa.tuple_(*columns)
    found: dict[tuple[Any, ...], Row] = {}
    for part in chunks(sorted(set(values))):
        wanted = [v[0] for v in part] if len(columns) == 1 else list(part)
        for row in tx.execute(sa.select(table).where(match.in_(wanted))).mappings():
            found[tuple(row[name] for name in key)] = dict(row)
    return found


def stored_seqs(tx: sa.Connection, table: sa.Table, seqs: Iterable[int]) -> set[int]:
    """Which of ``seqs`` ``table`` already holds (its primary key is ``seq``)."""
    found: set[int] = set()
    for part in chunks(sorted(set(seqs))):
        found.update(tx.execute(sa.select(table.c.seq).where(table.c.seq.in_(part))).scalars())
    return found


def write_state(
    tx: sa.Connection,
    table: sa.Table,
    key: Sequence[str],
    *,
    before: Mapping[K, Row | None],
    after: Mapping[K, Row | None],
    sources: Mapping[K, int],
    changes: ChangeLog | None,
) -> None:
    """Write a folded batch: upsert every key whose row changed, delete every key whose
    row is gone (one statement each), and log each as a ``c``/``u``/``d`` change event."""
    upserts: list[Row] = []
    deletes: list[Row] = []
    for k, row in after.items():
        old = before.get(k)
        if row == old:
            continue
        named = dict(zip(key, k, strict=True))
        if row is None:
            deletes.append({f"k_{name}": value for name, value in named.items()})
        else:
            upserts.append(row)
        if changes is not None:
            op = "d" if row is None else "c" if old is None else "u"
            changes.add(table, op, key=named, before=old, after=row, seq=sources[k])
    if upserts:
        stmt = dialect_insert(tx, table)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key),
            set_={c.name: stmt.excluded[c.name] for c in table.c if c.name not in key},
        )
        tx.execute(stmt, upserts)
    if deletes:
        match = sa.and_(*(table.c[name] == sa.bindparam(f"k_{name}") for name in key))
        tx.execute(table.delete().where(match), deletes)


def create(
    tx: sa.Connection, tables: Sequence[sa.Table], changes: bool, audits: bool = False
) -> None:
    """Create ``tables`` (the outbox too with change events or audits on, and the audit
    table with audits on) where missing."""
    extra = [*([outbox] if changes or audits else []), *([audit] if audits else [])]
    metadata.create_all(tx, tables=[*tables, *extra], checkfirst=True)


def empty(tx: sa.Connection, tables: Sequence[sa.Table]) -> None:
    """Delete every row of ``tables`` (created first if missing): views, grants and indexes
    that users built on a replica survive a rebuild."""
    metadata.create_all(tx, tables=list(tables), checkfirst=True)
    for table in tables:
        tx.execute(table.delete())


# --- the replica tables ---------------------------------------------------------------------

replica_messages = sa.Table(
    "replica_messages",
    metadata,
    sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
    sa.Column("stream", sa.String(64), nullable=False),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("time", UtcDateTime, nullable=True),
    sa.Column("msg_id", sa.Text, nullable=True),
    sa.Column("content_type", sa.Text, nullable=True),
    sa.Column("schema_id", sa.Integer, nullable=True),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("payload_json", JSON_VALUE, nullable=True),
    sa.Column("decode_error", sa.Text, nullable=True),
    sa.Index("ix_replica_messages_subject", "tenant", "subject", "seq"),
)

replica_agents = sa.Table(
    "replica_agents",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("manifest", JSON_VALUE, nullable=False),
    sa.Column("seq", SEQ, nullable=False),
    sa.Column("registered_seq", SEQ, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=True),
)

replica_agent_history = sa.Table(
    "replica_agent_history",
    metadata,
    sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("manifest", JSON_VALUE, nullable=True),
    sa.Column("time", UtcDateTime, nullable=True),
    sa.Index("ix_replica_agent_history_agent", "tenant", "name", "seq"),
)

replica_schema_versions = sa.Table(
    "replica_schema_versions",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("subject", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("schema_id", sa.Integer, nullable=False),
    sa.Column("schema_type", sa.String(16), nullable=False),
    sa.Column("schema", sa.Text, nullable=False),
    sa.Column("references", JSON_VALUE, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("seq", SEQ, nullable=False),
    sa.Index("ix_replica_schema_versions_id", "tenant", "schema_id"),
)

replica_compatibility = sa.Table(
    "replica_compatibility",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("subject", sa.Text, primary_key=True),  # '' is the tenant's global level
    sa.Column("level", sa.String(32), nullable=False),
    sa.Column("seq", SEQ, nullable=False),
)

replica_routes = sa.Table(
    "replica_routes",
    metadata,
    sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("agent", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("time", UtcDateTime, nullable=True),
    sa.Column("body", JSON_VALUE, nullable=True),
    sa.Index("ix_replica_routes_agent", "tenant", "agent", "seq"),
)
