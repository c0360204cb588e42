"""Change and audit events: relay the replica outbox to NATS.

A replica with change events on writes one outbox row per changed row in the same
transaction as the change, so no committed change is ever without its event. This relay
publishes the rows in id order and then deletes them: a crash between the two publishes
them again, and JetStream's duplicate window drops the copies, since each event's
``Nats-Msg-Id`` names the change (``cdc:<projection>:<table>:<stream>:<seq>:<op>:<key>``),
never the outbox row's id, which is handed out again. Each event is ``{"op":
"c"|"u"|"d", "table", "key", "before", "after", "source": {"stream", "seq"}}`` on
``cdc.<projection>.<table>`` in ``CHANGES``, the shape CDC consumers expect.

Audit rows (``op`` ``a``, written with card detection on) go to the ``AUDIT`` stream
instead, on ``audit.<tenant>.<kind>``, as the audit record itself (``type``
``CardNumbersRedacted`` for ``card_redacted``) with ``Nats-Msg-Id:
audit:<kind>:<stream>:<seq>``: one event per stored message however often it is relayed.

A relay batch holds at most :data:`RELAY_ROWS` rows and about :data:`RELAY_BYTES` of their
JSON (at least one row), measured in the database before the rows are read, as the
runtime bounds its batches: by count alone, 500 rows of ~0.7 MB held 3.8 GB. An event
over the NATS server's ``max_payload`` would be refused on every try and hold up the
outbox for good; it goes as a stub instead (:func:`stub_event`: what changed, not the row;
``Broker-Cdc-Stub`` says why), logged as ``outbox_event_stubbed``.

``CHANGES`` is created with as many replicas as ``MESSAGES``, as the leases bucket is.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from broker.natsconn import message_size
from broker.reader import READ_BYTES
from broker.streams import NO_TENANT, SUBJECT_PREFIX, Stream
from projections._errors import error_text, error_type
from projections._replica_tables import AUDIT_OP
from projections.leases import messages_replicas

log = structlog.get_logger(__name__)
CHANGES_STREAM = "CHANGES"
CHANGES_PREFIX = "cdc"
#: The ``type`` of each audit kind's event: events are named in the past tense.
AUDIT_EVENT_TYPES = {"card_redacted": "CardNumbersRedacted"}
#: Rows one relay batch takes at most.
RELAY_ROWS = 500
#: About how many bytes of JSON (key, before, after) one relay batch takes: as many as a
#: projection batch's payloads (:data:`projections.runtime.BATCH_BYTES`).
RELAY_BYTES = READ_BYTES
#: Rows measured by the first size query of a batch; each next one measures twice as many.
_FIRST_MEASURE = 32
#: Set on a stub event (its value says why the change event itself was not published).
CDC_STUB = "Broker-Cdc-Stub"


async def ensure_changes_stream(js: JetStreamContext) -> None:
    """Create ``CHANGES`` if it is missing, with as many replicas as ``MESSAGES``: change
    events must survive the loss of a node whenever the data does. One made with fewer
    (by an earlier release) is logged, not changed: ``nats stream edit`` changes it."""
    replicas = await messages_replicas(js)
    try:
        info = await js.stream_info(CHANGES_STREAM)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=CHANGES_STREAM,
                subjects=[f"{CHANGES_PREFIX}.>"],
                description="Replica change events (CDC), relayed from the outbox.",
                duplicate_window=120,
                num_replicas=replicas,
            )
        )
        return
    has = info.config.num_replicas or 1
    if has < replicas:
        log.warning(
            "changes_stream_fewer_replicas",
            stream=CHANGES_STREAM,
            replicas=has,
            messages_replicas=replicas,
            action=f"nats stream edit {CHANGES_STREAM} --replicas {replicas}",
        )


def _json_size(column: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    """Characters of a JSON column's text (0 for NULL), computed by the database."""
    return sa.func.coalesce(sa.func.length(sa.cast(column, sa.Text)), 0)


def _take(engine: sa.Engine, outbox: sa.Table, limit: int, max_bytes: int) -> list[Any]:
    """The first outbox rows in id order: at most ``limit``, and no more than ``max_bytes``
    of JSON unless the first row alone is larger. Sizes are measured in the database first,
    in steps of 32, 64, 128… rows (a batch of large rows measures few more than it takes),
    and only the rows taken are read."""
    size = _json_size(outbox.c.key) + _json_size(outbox.c.before) + _json_size(outbox.c.after)
    ids: list[int] = []
    total = 0
    full = False
    with engine.connect() as conn:
        after, step = None, _FIRST_MEASURE
        while not full and len(ids) < limit:
            asked = min(step, limit - len(ids))
            query = sa.select(outbox.c.id, size).order_by(outbox.c.id).limit(asked)
            if after is not None:
                query = query.where(outbox.c.id > after)
            measured = conn.execute(query).all()
            for row_id, row_bytes in measured:
                if ids and total + row_bytes > max_bytes:
                    full = True
                    break
                ids.append(row_id)
                total += row_bytes
            if len(measured) < asked:
                break  # nothing more in the outbox
            after, step = measured[-1][0], step * 2
        if not ids:
            return []
        query = sa.select(outbox).where(outbox.c.id.in_(ids)).order_by(outbox.c.id)
        return list(conn.execute(query))


def _forget(engine: sa.Engine, outbox: sa.Table, ids: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(outbox.delete().where(outbox.c.id.in_(ids)))


def _dumps(body: Any) -> bytes:
    """``body`` as JSON. A row read back from the replica holds an integer past 64 bits as a
    Python ``int`` (the payload kept every digit, or a float PostgreSQL's ``jsonb`` wrote
    without a fraction), which orjson refuses (``TypeError: Integer exceeds 64-bit range``):
    such integers are written with every digit, everything else as orjson writes it. Raised,
    the error failed every relay of that row, and the relay never got past it."""
    try:
        return orjson.dumps(body, default=str)
    except TypeError:
        return orjson.dumps(_wide_ints_written(body), default=str)


def _wide_ints_written(value: Any) -> Any:
    """``value`` with every integer orjson cannot write (past 64 bits) as its digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        if -(2**63) <= value < 2**64:
            return value
        return orjson.Fragment(str(value).encode())
    if isinstance(value, dict):
        return {key: _wide_ints_written(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_wide_ints_written(item) for item in value]
    return value


def audit_event(row: Any) -> tuple[str, bytes]:
    """The subject and body of one outbox row's audit event."""
    record = dict(row.after)
    kind = str(record["kind"])
    subject = f"{SUBJECT_PREFIX[Stream.AUDIT]}.{record['tenant'] or NO_TENANT}.{kind}"
    body = {"type": AUDIT_EVENT_TYPES.get(kind, kind), **record}
    return subject, _dumps(body)


def message_id(row: Any) -> str:
    """The ``Nats-Msg-Id`` of one outbox row's event: what the change is, not the row's id.
    Row ids come round again (SQLite hands out ``max(id) + 1``, 1 once the relay has emptied
    the table; a new PostgreSQL database starts at 1 too), and JetStream would drop the
    later change as a duplicate of the earlier one."""
    if row.op == AUDIT_OP:
        key = row.key
        return f"audit:{key['kind']}:{key['stream']}:{key['seq']}"
    key = orjson.dumps(row.key, option=orjson.OPT_SORT_KEYS).decode()
    source = f"{row.source_stream}:{row.source_seq}"
    return f"cdc:{row.projection}:{row.table_name}:{source}:{row.op}:{key}"


def change_event(row: Any) -> tuple[str, bytes]:
    """The subject and body of one outbox row's event (a change or, op ``a``, an audit)."""
    if row.op == AUDIT_OP:
        return audit_event(row)
    subject = f"{CHANGES_PREFIX}.{row.projection.replace('.', '_')}.{row.table_name}"
    body = {
        "op": row.op,
        "table": row.table_name,
        "key": row.key,
        "before": row.before,
        "after": row.after,
        "source": {"stream": row.source_stream, "seq": row.source_seq},
    }
    return subject, _dumps(body)


def stub_event(row: Any, why: str) -> bytes:
    """The body of the stub published for an outbox row whose event is over the server's
    ``max_payload``: which change it was (a change event's ``op``, ``table``, ``key`` and
    ``source``; an audit record's ``type``, ``kind``, ``tenant``, ``stream``, ``seq``),
    ``stub`` saying why, and none of the row's data (no ``before``/``after``, no
    findings). A consumer reads the row from the replica, or from the source stream."""
    if row.op == AUDIT_OP:
        kind = str(row.key["kind"])
        body: dict[str, Any] = {
            "type": AUDIT_EVENT_TYPES.get(kind, kind),
            "kind": kind,
            "tenant": dict(row.after).get("tenant"),
            "stream": row.source_stream,
            "seq": row.source_seq,
        }
    else:
        body = {"op": row.op, "table": row.table_name, "key": row.key}
        body["source"] = {"stream": row.source_stream, "seq": row.source_seq}
    body["stub"] = why
    return _dumps(body)


def _fitting(row: Any, max_payload: int) -> tuple[str, bytes, dict[str, str]] | None:
    """The subject, body and headers of ``row``'s event, or of its stub when the event is
    over ``max_payload``; ``None`` (logged) when even the stub is."""
    subject, body = change_event(row)
    headers = {"Nats-Msg-Id": message_id(row), "Content-Type": "application/json"}
    size = message_size(body, headers)
    if size <= max_payload:
        return subject, body, headers
    why = f"the event is {size} bytes, over the NATS server's max_payload of {max_payload}"
    headers[CDC_STUB] = why
    body = stub_event(row, why)
    context = {
        "projection": row.projection,
        "table": row.table_name,
        "op": row.op,
        "source_stream": row.source_stream,
        "source_seq": row.source_seq,
        "size": size,
        "max_payload": max_payload,
    }
    if message_size(body, headers) <= max_payload:
        log.error("outbox_event_stubbed", **context)
        return subject, body, headers
    log.error("outbox_event_dropped", reason="even its stub is over max_payload", **context)
    return None


async def relay_once(
    js: JetStreamContext,
    engine: sa.Engine,
    limit: int = RELAY_ROWS,
    *,
    max_bytes: int = RELAY_BYTES,
) -> int:
    """Publish up to ``limit`` outbox rows (about ``max_bytes`` of JSON at most, at least
    one row) and delete them; returns how many."""
    from projections.replica import outbox

    rows = await asyncio.to_thread(_take, engine, outbox, limit, max_bytes)
    if not rows:
        return 0
    max_payload = js._nc.max_payload
    acks = []
    for row in rows:
        event = _fitting(row, max_payload)
        if event is None:
            continue
        subject, body, headers = event
        acks.append(await js.publish_async(subject, body, headers=headers))
    await asyncio.gather(*acks)
    await asyncio.to_thread(_forget, engine, outbox, [row.id for row in rows])
    return len(rows)


async def relay_outbox(js: JetStreamContext, engine: sa.Engine, stop: asyncio.Event) -> None:
    """Relay until ``stop``; idle polls every 200 ms."""
    await ensure_changes_stream(js)
    while not stop.is_set():
        try:
            sent = await relay_once(js, engine)
        except Exception as e:  # NATS or database hiccup: the rows stay, try again
            # Never str(e): SQLAlchemy's names the statement and its bound parameters.
            log.warning("outbox_relay_failed", error_type=error_type(e), error=error_text(e))
            sent = 0
        if not sent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
