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

from broker.streams import NO_TENANT, SUBJECT_PREFIX, Stream
from projections._replica_tables import AUDIT_OP

log = structlog.get_logger(__name__)
CHANGES_STREAM = "CHANGES"
CHANGES_PREFIX = "cdc"
#: The ``type`` of each audit kind's event: events are named in the past tense.
AUDIT_EVENT_TYPES = {"card_redacted": "CardNumbersRedacted"}


async def ensure_changes_stream(js: JetStreamContext) -> None:
    try:
        await js.stream_info(CHANGES_STREAM)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=CHANGES_STREAM,
                subjects=[f"{CHANGES_PREFIX}.>"],
                description="Replica change events (CDC), relayed from the outbox.",
                duplicate_window=120,
            )
        )


def _take(engine: sa.Engine, outbox: sa.Table, limit: int) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(outbox).order_by(outbox.c.id).limit(limit)))


def _forget(engine: sa.Engine, outbox: sa.Table, ids: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(outbox.delete().where(outbox.c.id.in_(ids)))


def audit_event(row: Any) -> tuple[str, bytes]:
    """The subject and body of one outbox row's audit event."""
    record = dict(row.after)
    kind = str(record["kind"])
    subject = f"{SUBJECT_PREFIX[Stream.AUDIT]}.{record['tenant'] or NO_TENANT}.{kind}"
    body = {"type": AUDIT_EVENT_TYPES.get(kind, kind), **record}
    return subject, orjson.dumps(body, default=str)


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
    return subject, orjson.dumps(body, default=str)


async def relay_once(js: JetStreamContext, engine: sa.Engine, limit: int = 500) -> int:
    """Publish up to ``limit`` outbox rows and delete them; returns how many."""
    from projections.replica import outbox

    rows = await asyncio.to_thread(_take, engine, outbox, limit)
    if not rows:
        return 0
    acks = []
    for row in rows:
        subject, body = change_event(row)
        acks.append(
            await js.publish_async(
                subject,
                body,
                headers={"Nats-Msg-Id": message_id(row), "Content-Type": "application/json"},
            )
        )
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
            log.warning("outbox_relay_failed", error=str(e))
            sent = 0
        if not sent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
