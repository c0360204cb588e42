"""Where a projection remembers how far it got: SQL (SQLite, PostgreSQL) or JetStream KV.

A :class:`CheckpointStore` keeps, per projection and partition, the last stream sequence
applied. :meth:`~CheckpointStore.commit` is the transaction boundary of the runtime: it
runs the projection's writes and moves the checkpoints *together*, and only if every
checkpoint is still where the caller read it (compare-and-set), so a worker that lost a
partition to another cannot write over it (:class:`CheckpointConflict`, nothing written).

- :class:`SqlCheckpointStore` writes the projection's tables and ``broker_checkpoints`` in
  one database transaction: exactly-once for SQL replicas.
- :class:`KvCheckpointStore` keeps checkpoints in a JetStream KV bucket with revision
  checks; the work runs first and is not in the same transaction, so it suits projections
  whose writes are idempotent (at-least-once writes, exactly-once checkpoints).

Sequences are only meaningful within one stream: a stream deleted and made again under the
same name starts at 1 again. So each store also keeps, per projection, the
:class:`StreamIdentity` (name and creation time) of the stream its checkpoints count in
(SQL: ``broker_stream_identity``; KV: the key ``<projection>.stream``); the runtime compares
it with the stream's on every subscribe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import nats.js.errors
import orjson
import sqlalchemy as sa
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from broker.errors import BrokerError
from broker.streams import open_bucket

Work = Callable[[Any], None]
#: partition -> (the sequence the caller read, the sequence to record)
Moves = Mapping[int, tuple[int, int]]


class CheckpointConflict(BrokerError):
    """A checkpoint moved since it was read: another worker owns the partition now."""

    error_code = "checkpoint_conflict"


class StoreUnavailable(BrokerError):
    """The checkpoint store's database or bucket failed for a reason that may pass (locked,
    connection lost): retry the same batch later; it is not the event's fault."""

    status = 503
    error_code = "checkpoint_store_unavailable"
    retryable = True


#: Database errors that say nothing about the data when the driver gives no SQLSTATE (SQLite,
#: a connection that never opened): lock timeouts, lost connections, and a missing table or
#: privilege (``ProgrammingError``: the statements are the projection's own, with the events'
#: values bound as parameters). The batch waits for the database to be put right;
#: dead-lettering it would move the checkpoint past events that were never applied.
TRANSIENT_SQL_ERRORS = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    sa.exc.ProgrammingError,
)
#: SQLSTATE classes and codes of a database that may come back: connection (08), rollback,
#: serialization failure or deadlock (40), insufficient resources (53), operator
#: intervention such as an admin shutdown (57), lock not available (55P03) and a read-only
#: transaction (25006: a standby after a failover).
_STORE_SQLSTATES = frozenset({"08", "40", "53", "57", "55P03", "25006"})
#: SQLSTATE classes that blame the values written: data exception (22), integrity (23),
#: program limit exceeded (54: e.g. an index row too large for a long subject).
_EVENT_SQLSTATES = frozenset({"22", "23", "54"})


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE the driver reported for ``error`` (PostgreSQL), or ``None`` (SQLite,
    or an error raised before the server answered)."""
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) and len(code) == 5 else None


def is_transient(error: BaseException) -> bool:
    """Whether a database error is the store's (retry the same batch later) rather than the
    events' (retry them one by one, then dead-letter the one that still fails).

    By SQLSTATE where the driver gives one, so that a value PostgreSQL refuses (54000,
    reported as an ``OperationalError``) goes to the DLQ and a standby refusing writes
    (25006, an ``InternalError``) holds the batch; by exception class otherwise."""
    code = sqlstate(error)
    if code is not None:
        if code in _STORE_SQLSTATES or code[:2] in _STORE_SQLSTATES:
            return True
        if code[:2] in _EVENT_SQLSTATES:
            return False
    return isinstance(error, TRANSIENT_SQL_ERRORS)


@dataclass(frozen=True, slots=True)
class StreamIdentity:
    """Which stream a projection's checkpoints count in: its name and its creation time as
    the server reports it (``StreamInfo.created``, ISO 8601 in UTC). The time survives
    server restarts and leader changes; a stream deleted and made again, or restored from a
    backup, gets a new one."""

    stream: str
    created: str


#: Recorded in place of a creation time when checkpoints are found past the end of the
#: stream and no other identity says so yet (a database from before identities were kept):
#: they belong to a stream that is gone, whose creation time is not known here. It matches
#: no stream, so the projection stays held, across restarts, until it is reset.
UNKNOWN_CREATED = "unknown"


class CheckpointSource(Protocol):
    """Where positions are read from: a :class:`CheckpointStore`, or a reader that never
    writes (:class:`SqlCheckpointReader`)."""

    async def load(self, projection: str) -> dict[int, int]:
        """Partition -> last applied sequence (absent partitions have applied nothing)."""
        ...

    async def stream_identity(self, projection: str) -> StreamIdentity | None:
        """The stream the checkpoints of ``projection`` count in; ``None``: not recorded."""
        ...


class CheckpointStore(CheckpointSource, Protocol):
    """Per-projection, per-partition positions, moved atomically with the writes."""

    async def commit(self, projection: str, moves: Moves, work: Work) -> None:
        """Run ``work(tx)`` and move the checkpoints, all or nothing; raise
        :class:`CheckpointConflict` when one was not at its expected sequence."""
        ...

    async def record_stream_identity(self, projection: str, identity: StreamIdentity) -> None:
        """Record (or replace) the stream the checkpoints of ``projection`` count in."""
        ...

    async def reset(self, projection: str, work: Work) -> None:
        """Run ``work(tx)`` (drop the projection's state) and forget its checkpoints and
        their stream identity."""
        ...

    async def close(self) -> None: ...


metadata = sa.MetaData()
checkpoints = sa.Table(
    "broker_checkpoints",
    metadata,
    sa.Column("projection", sa.String(128), primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)
#: One row per projection: the :class:`StreamIdentity` its checkpoints count in. A table of
#: its own, so that databases made before it only gain a table (``CREATE TABLE IF NOT
#: EXISTS``, no ``ALTER``), and the per-batch checkpoint writes stay as they were.
stream_identities = sa.Table(
    "broker_stream_identity",
    metadata,
    sa.Column("projection", sa.String(128), primary_key=True),
    sa.Column("stream", sa.String(255), nullable=False),
    sa.Column("created", sa.String(64), nullable=False),
)


def _json_text(value: Any) -> str:
    """JSON columns are written with orjson (the replica stores many decoded payloads)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def create_sql_engine(
    url: str, *, read_only: bool = False, lock_timeout: float | None = None
) -> sa.Engine:
    """An engine for a replica URL: ``sqlite:///path`` or ``postgresql://…`` (psycopg 3).

    ``read_only``: for readers such as ``broker projections status``: plain (deferred)
    SQLite transactions that never take the write lock nor switch the journal mode, and
    PostgreSQL transactions begun ``READ ONLY``, so a read-only role or file is enough.

    ``lock_timeout`` (seconds; PostgreSQL): the longest a statement waits for a lock
    (``SET lock_timeout``). A worker commits on its event loop's thread, so a statement
    queued behind someone's lock (an analyst's ``LOCK TABLE``, an ``ALTER TABLE``, a
    long transaction) stalled the whole worker: its lease renewals too, so every
    partition of every projection it held expired while it waited. With it, the wait
    ends in SQLSTATE 55P03 (:func:`is_transient`): the batch is fetched again later and
    the loop renews the leases meanwhile."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if read_only:
        engine = sa.create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        if engine.dialect.name == "postgresql":
            return engine.execution_options(postgresql_readonly=True)
        return engine
    if url.startswith("sqlite"):
        # The driver's own transaction handling off (isolation_level None), so that every
        # transaction is BEGIN IMMEDIATE: writers in several processes queue on the lock
        # (busy timeout) instead of failing when a read transaction tries to upgrade.
        engine = sa.create_engine(
            url,
            connect_args={"timeout": 30, "isolation_level": None},
            json_serializer=_json_text,
        )

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, _: Any) -> None:
            # WAL: readers (status, queries) never block the writer.
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = sa.create_engine(url, pool_pre_ping=True, json_serializer=_json_text)
    if lock_timeout is not None and engine.dialect.name == "postgresql":
        millis = max(1, round(lock_timeout * 1000))

        @sa.event.listens_for(engine, "connect")
        def _lock_timeout(dbapi_connection: Any, _: Any) -> None:
            # A session setting, outside any transaction: it outlives every commit and
            # rollback, and keeps the URL's own ``options`` (a search_path, say).
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            try:
                dbapi_connection.execute(f"SET lock_timeout = {millis}")
            finally:
                dbapi_connection.autocommit = autocommit

    return engine


#: Any constant: the advisory lock that serialises table creation by workers starting together.
_DDL_LOCK = 0x6272_6F6B


def ddl_lock(conn: sa.Connection) -> None:
    """Hold, for the rest of the transaction, the lock under which tables are created: two
    workers running ``CREATE TABLE IF NOT EXISTS`` at once collide in PostgreSQL's catalog.
    (SQLite serialises writers by itself.) Waits as long as it takes, whatever the engine's
    ``lock_timeout``: a worker starting next to one creating the tables waits its turn."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK})


class SqlCheckpointStore:
    """Checkpoints in ``broker_checkpoints``, in the same transaction as the writes.

    ``inline`` (the default) runs each commit on the event loop's own thread: measured
    ~25 % more events/s than handing it to a thread, whose GIL hand-offs with the fetching
    loop cost more than the overlap gains. The loop is blocked for one transaction at a
    time (tens of milliseconds for a batch of 1 024), which a dedicated worker can afford;
    pass ``inline=False`` where the loop must stay responsive while the database is slow.
    """

    def __init__(self, engine: sa.Engine, *, inline: bool = True) -> None:
        self.engine = engine
        self.inline = inline
        with engine.begin() as conn:
            ddl_lock(conn)
            metadata.create_all(conn, tables=[checkpoints, stream_identities])

    async def load(self, projection: str) -> dict[int, int]:
        def read() -> dict[int, int]:
            with self.engine.connect() as conn:
                return _positions(conn, projection)

        return await asyncio.to_thread(read)

    def _move(self, conn: sa.Connection, projection: str, moves: Moves) -> None:
        # Partitions that move together (the usual case: every owned partition goes from the
        # same sequence to the batch's end) move in one statement per group.
        groups: dict[tuple[int, int], list[int]] = {}
        for partition, step in moves.items():
            groups.setdefault(step, []).append(partition)
        for (expected, new), partitions in groups.items():
            mine = (checkpoints.c.projection == projection) & checkpoints.c.partition.in_(
                partitions
            )
            if expected == 0:
                exists = conn.execute(sa.select(checkpoints.c.partition).where(mine)).first()
                if exists is not None:
                    raise CheckpointConflict(f"{projection}[{exists[0]}] is past the start")
                conn.execute(
                    checkpoints.insert(),
                    [{"projection": projection, "partition": p, "seq": new} for p in partitions],
                )
                continue
            moved = conn.execute(
                checkpoints.update().where(mine & (checkpoints.c.seq == expected)).values(seq=new)
            )
            if moved.rowcount != len(partitions):
                raise CheckpointConflict(
                    f"{projection}{sorted(partitions)} are no longer all at {expected}"
                )

    async def commit(self, projection: str, moves: Moves, work: Work) -> None:
        def run() -> None:
            try:
                with self.engine.begin() as conn:
                    work(conn)
                    self._move(conn, projection, moves)
            except sa.exc.IntegrityError as e:
                # Two workers inserting the same first checkpoint: the loser rolls back.
                if "broker_checkpoints" in str(e):
                    raise CheckpointConflict(f"{projection}: checkpoint taken concurrently") from e
                raise
            except sa.exc.SQLAlchemyError as e:
                if not is_transient(e):
                    raise
                reason = getattr(e, "orig", None) or e
                raise StoreUnavailable(f"{projection}: {reason}"[:300]) from e

        if self.inline:
            run()
        else:
            await asyncio.to_thread(run)

    async def stream_identity(self, projection: str) -> StreamIdentity | None:
        def read() -> StreamIdentity | None:
            with self.engine.connect() as conn:
                return _identity(conn, projection)

        return await asyncio.to_thread(read)

    async def record_stream_identity(self, projection: str, identity: StreamIdentity) -> None:
        row = {"stream": identity.stream, "created": identity.created}
        mine = stream_identities.c.projection == projection

        def write() -> None:
            # Update, else insert; workers starting together may both insert: the loser's
            # second round finds the row (both read the same stream, so either value does).
            for last_round in (False, True):
                try:
                    with self.engine.begin() as conn:
                        if conn.execute(
                            stream_identities.update().where(mine).values(row)
                        ).rowcount:
                            return
                        conn.execute(
                            stream_identities.insert().values(projection=projection, **row)
                        )
                        return
                except sa.exc.IntegrityError:
                    if last_round:
                        raise

        await asyncio.to_thread(write)

    async def reset(self, projection: str, work: Work) -> None:
        def run() -> None:
            with self.engine.begin() as conn:
                # The checkpoints first: a worker's commit in flight holds their rows, so
                # this waits for it, and the drop after it (a statement of its own, which
                # sees what committed meanwhile) takes that commit's rows too. The other way
                # round the drop missed them, and the rebuild applied their events twice.
                conn.execute(checkpoints.delete().where(checkpoints.c.projection == projection))
                conn.execute(
                    stream_identities.delete().where(stream_identities.c.projection == projection)
                )
                work(conn)

        await asyncio.to_thread(run)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.dispose)


def _positions(conn: sa.Connection, projection: str) -> dict[int, int]:
    """Partition -> last applied sequence of ``projection``, as ``broker_checkpoints`` has it."""
    rows = conn.execute(
        sa.select(checkpoints.c.partition, checkpoints.c.seq).where(
            checkpoints.c.projection == projection
        )
    )
    return {int(p): int(s) for p, s in rows}


def _identity(conn: sa.Connection, projection: str) -> StreamIdentity | None:
    """The :class:`StreamIdentity` recorded for ``projection``, if any."""
    row = conn.execute(
        sa.select(stream_identities.c.stream, stream_identities.c.created).where(
            stream_identities.c.projection == projection
        )
    ).first()
    return None if row is None else StreamIdentity(row.stream, row.created)


class SqlCheckpointReader:
    """Reads ``broker_checkpoints`` and ``broker_stream_identity`` and nothing else: no DDL,
    no write lock. A database without a table has applied nothing yet (every position 0),
    or recorded no identity."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    async def load(self, projection: str) -> dict[int, int]:
        def read() -> dict[int, int]:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table(checkpoints.name):
                    return {}
                return _positions(conn, projection)

        return await asyncio.to_thread(read)

    async def stream_identity(self, projection: str) -> StreamIdentity | None:
        def read() -> StreamIdentity | None:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table(stream_identities.name):
                    return None
                return _identity(conn, projection)

        return await asyncio.to_thread(read)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.dispose)


#: The last token of the key of a projection's stream identity in the KV bucket.
_KV_IDENTITY = "stream"


def _kv_key_of(key: str, projection: str) -> bool:
    """Whether ``key`` is one of ``projection``'s: a partition's or its stream identity's."""
    owner, _, last = key.rpartition(".")
    return owner == projection and (last.isdigit() or last == _KV_IDENTITY)


class KvCheckpointStore:
    """Checkpoints in a JetStream KV bucket (key ``<projection>.<partition>``), moved with
    revision checks. ``work`` gets ``None`` as its transaction and runs before the move.
    The :class:`StreamIdentity` is the JSON value of ``<projection>.stream``."""

    def __init__(self, js: JetStreamContext, bucket: str = "projection_checkpoints") -> None:
        self.js = js
        self.bucket = bucket
        self._kv: KeyValue | None = None
        #: (projection, partition) -> (sequence, revision) last read or written here
        self._known: dict[tuple[str, int], tuple[int, int]] = {}

    async def _store(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self.js, KeyValueConfig(bucket=self.bucket, history=1))
        return self._kv

    async def _keys(self, projection: str) -> list[str]:
        kv = await self._store()
        try:
            keys = await kv.keys()
        except Exception:  # nats-py raises NoKeysError (no common base) for an empty bucket
            return []
        # nats-py's own key filter is a substring match; select the projection's keys here
        # (its partitions' and its stream identity's).
        return [k for k in keys if _kv_key_of(k, projection)]

    async def _partitions(self, projection: str) -> list[str]:
        return [k for k in await self._keys(projection) if k.rsplit(".", 1)[1].isdigit()]

    async def load(self, projection: str) -> dict[int, int]:
        kv = await self._store()
        found: dict[int, int] = {}
        for key in await self._partitions(projection):
            entry = await kv.get(key)
            partition = int(key.rsplit(".", 1)[1])
            found[partition] = int(entry.value or b"0")
            self._known[(projection, partition)] = (found[partition], entry.revision or 0)
        return found

    async def commit(self, projection: str, moves: Moves, work: Work) -> None:
        kv = await self._store()
        for partition, (expected, _) in moves.items():
            known = self._known.get((projection, partition))
            if known is not None and known[0] != expected:
                raise CheckpointConflict(
                    f"{projection}[{partition}] is at {known[0]}, not at {expected}"
                )
        work(None)
        for partition, (expected, new) in moves.items():
            key = f"{projection}.{partition}"
            known = self._known.get((projection, partition))
            try:
                if known is None:
                    if expected != 0:
                        raise CheckpointConflict(
                            f"{projection}[{partition}] was never at {expected}"
                        )
                    revision = await kv.create(key, str(new).encode())
                else:
                    revision = await kv.update(key, str(new).encode(), last=known[1])
            except CheckpointConflict:
                raise
            except Exception as e:  # wrong last sequence: another store moved it
                raise CheckpointConflict(f"{projection}[{partition}] moved: {e}") from e
            self._known[(projection, partition)] = (new, revision)

    async def stream_identity(self, projection: str) -> StreamIdentity | None:
        kv = await self._store()
        try:
            entry = await kv.get(f"{projection}.{_KV_IDENTITY}")
        except nats.js.errors.KeyNotFoundError:  # never recorded, or forgotten by a reset
            return None
        recorded = orjson.loads(entry.value or b"{}")
        return StreamIdentity(str(recorded["stream"]), str(recorded["created"]))

    async def record_stream_identity(self, projection: str, identity: StreamIdentity) -> None:
        kv = await self._store()
        value = {"stream": identity.stream, "created": identity.created}
        await kv.put(f"{projection}.{_KV_IDENTITY}", orjson.dumps(value))

    async def reset(self, projection: str, work: Work) -> None:
        kv = await self._store()
        work(None)
        for known in list(self._known):
            if known[0] == projection:
                del self._known[known]
        for key in await self._keys(projection):
            await kv.purge(key)

    async def close(self) -> None:
        return None
