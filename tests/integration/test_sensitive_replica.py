"""Card numbers in the SQL replicas, against real NATS and real SQLite / PostgreSQL.

Messages with and without card numbers are appended to the broker's streams; the replica
projections run with card detection on. The replica tables, the CDC outbox and the audit
records never hold a full number, each message with a card gets exactly one audit event
(also after redelivery and after a rebuild from the stream's start), messages without one
are stored exactly as before, and the stream itself still returns what was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
import sqlalchemy as sa
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.publisher import Publisher
from broker.reader import read_messages
from broker.settings import get_settings
from broker.streams import Stream
from projections.base import Event, Projection
from projections.checkpoints import SqlCheckpointStore
from projections.outbox import CHANGES_STREAM, ensure_changes_stream, relay_once
from projections.replica import (
    MessagesReplica,
    RoutesReplica,
    audit,
    outbox,
    replica_projections,
)
from projections.runtime import ProjectionRunner
from projections.worker import Worker, WorkerOptions
from tests._wait import await_until
from tests.integration.conftest import ReplicaDb as Db
from tests.integration.conftest import replica_db

pytestmark = pytest.mark.integration

TENANT = "acme"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """A SQLite file, or a fresh schema of the PostgreSQL at 127.0.0.1:5432 (dropped
    afterwards; an unreachable server fails the test)."""
    with replica_db(request.param, "t", tmp_path) as found:
        yield found


@dataclass(frozen=True)
class Sent:
    subject: str
    payload: bytes
    content_type: str


FRAMED = b"\x00" + (7).to_bytes(4, "big")
SENT = [
    # 1: a card in a JSON string, written in groups
    Sent(
        "orders.created",
        b'{"order": 1, "card": "4242 4242 4242 4242", "note": "thanks"}',
        "application/json",
    ),
    # 2: a card as a JSON number
    Sent("orders.created", b'{"pan": 5555555555554444, "amount": 12.50}', "application/json"),
    # 3: text/plain: not stored in the replica, but scanned for the audit
    Sent("notes", b"please charge 378282246310005 today", "text/plain; charset=utf-8"),
    # 4, 5: msgpack and binary: neither stored nor scanned (documented)
    Sent("orders.packed", msgpack.packb({"card": "4242424242424242"}), "application/msgpack"),
    Sent("blobs", b"\x00\x01 4242424242424242 \xff", "application/octet-stream"),
    # 6: JSON without a card (a timestamp, a Luhn-invalid 16-digit id)
    Sent(
        "orders.created",
        b'{"ts": 1717000000123456, "amount": 99.95, "id": "4242424242424241"}',
        "application/json",
    ),
    # 7: a card in the subject
    Sent("cards.4111111111111111", b'{"ok": true}', "application/json"),
    # 8: Confluent-framed JSON (schema id 7) with a card
    Sent("orders.framed", FRAMED + b'{"pan": "6011111111111117"}', "application/json"),
]
CARDS = ["4242424242424242", "5555555555554444", "378282246310005", "4111111111111111"]
CARDS += ["6011111111111117", "4242 4242 4242 4242"]
WITH_CARDS = [1, 2, 3, 7, 8]


async def publish_all(js: JetStreamContext) -> None:
    for i, sent in enumerate(SENT, start=1):
        ack = await js.publish(
            f"msg.{TENANT}.{sent.subject}",
            sent.payload,
            headers={"Content-Type": sent.content_type, "Nats-Msg-Id": f"key-{i}"},
        )
        assert ack.seq == i


async def run_until(
    js: JetStreamContext, projection: Projection, engine: sa.Engine, seq: int
) -> None:
    """Run ``projection`` until it has applied ``seq``."""
    runner = ProjectionRunner(js, projection, SqlCheckpointStore(engine), batch=4)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))

    async def caught_up() -> bool:
        return runner.stats.last_seq >= seq

    try:
        assert await await_until(caught_up, timeout=30)
    finally:
        stop.set()
        await task


def table(engine: sa.Engine, found: sa.Table, *order: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        query = sa.select(found).order_by(*(found.c[name] for name in order))
        return [dict(row) for row in conn.execute(query).mappings()]


def messages_table(engine: sa.Engine) -> dict[int, dict[str, Any]]:
    from projections.replica import metadata

    return {r["seq"]: r for r in table(engine, metadata.tables["replica_messages"], "seq")}


def holds_no_card(*tables: list[dict[str, Any]]) -> bool:
    dumped = orjson.dumps(tables, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    return not any(card in dumped for card in CARDS)


async def stream_bodies(js: JetStreamContext, stream: str) -> list[tuple[str, dict[str, Any]]]:
    return [(m.subject, orjson.loads(m.data)) async for m in read_messages(js, stream)]


async def test_replica_masks_cards_audits_each_message_once_and_keeps_the_rest(
    publisher: Publisher, db: Db
) -> None:
    js = publisher.js
    await publish_all(js)
    projection = MessagesReplica(changes=True, detect_cards=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    await run_until(js, projection, db.engine, len(SENT))

    rows = messages_table(db.engine)
    assert sorted(rows) == list(range(1, len(SENT) + 1))
    assert rows[1]["payload_json"] == {"order": 1, "card": "[card ****4242]", "note": "thanks"}
    assert rows[2]["payload_json"] == {"pan": "[card ****4444]", "amount": 12.5}
    assert rows[7]["subject"] == "cards.[card ****1111]"
    assert rows[8]["payload_json"] == {"pan": "[card ****1117]"}
    assert (rows[8]["schema_id"], rows[2]["msg_id"]) == (None, "key-2")
    # Text, msgpack and binary payloads are not stored in the replica at all.
    for seq in (3, 4, 5):
        assert (rows[seq]["payload_json"], rows[seq]["decode_error"]) == (None, None)
    # Messages without a card are stored exactly as with detection off.
    events = {e.seq: e for e in [Event.from_msg(m) async for m in read_messages(js, "MESSAGES")]}
    for seq in (4, 5, 6):
        assert rows[seq] == MessagesReplica().row(events[seq])
    assert rows[6]["payload_json"] == orjson.loads(SENT[5].payload)
    assert [rows[s]["subject"] for s in (1, 4, 6)] == [
        "orders.created",
        "orders.packed",
        "orders.created",
    ]

    audits = table(db.engine, audit, "seq")
    assert [(a["seq"], a["kind"], a["stream"], a["tenant"], a["count"]) for a in audits] == [
        (seq, "card_redacted", "MESSAGES", TENANT, 1) for seq in WITH_CARDS
    ]
    by_seq = {a["seq"]: a for a in audits}
    assert by_seq[1]["findings"] == [
        {
            "field": "payload_json",
            "path": "/card",
            "brand": "visa",
            "last4": "4242",
            "digits": 16,
            "start": 0,
            "end": 19,
        }
    ]
    found = [
        (f["field"], f.get("path"), f["last4"]) for s in (2, 3, 7, 8) for f in by_seq[s]["findings"]
    ]
    assert found == [
        ("payload_json", "/pan", "4444"),
        ("payload", None, "0005"),
        ("subject", None, "1111"),
        ("payload_json", "/pan", "1117"),
    ]
    assert by_seq[7]["subject"] == f"msg.{TENANT}.cards.[card ****1111]"
    assert by_seq[3]["time"] is not None

    changes = table(db.engine, outbox, "id")
    assert holds_no_card(list(rows.values()), audits, changes)

    # The relay publishes the change events to CHANGES and the audit events to AUDIT.
    await ensure_changes_stream(js)
    assert await relay_once(js, db.engine) == len(SENT) + len(WITH_CARDS)
    events = await stream_bodies(js, Stream.AUDIT)
    assert [(subject, e["type"], e["stream"], e["seq"], e["count"]) for subject, e in events] == [
        (f"audit.{TENANT}.card_redacted", "CardNumbersRedacted", "MESSAGES", seq, 1)
        for seq in WITH_CARDS
    ]
    assert events[0][1]["findings"][0]["last4"] == "4242"
    cdc = await stream_bodies(js, CHANGES_STREAM)
    assert [e["source"]["seq"] for _, e in cdc] == list(range(1, len(SENT) + 1))
    assert holds_no_card([e for _, e in events], [e for _, e in cdc])

    # The stream keeps every payload as it was sent (read access is the consume scope's).
    for seq, sent in enumerate(SENT, start=1):
        assert (await js.get_msg(Stream.MESSAGES, seq)).data == sent.payload


async def test_redelivery_and_rebuilds_audit_nothing_twice(publisher: Publisher, db: Db) -> None:
    """A batch applied again (a redelivery) and a rebuild from the stream's start (reset
    and run again) write no second audit record and publish no second audit event."""
    js = publisher.js
    await publish_all(js)
    projection = MessagesReplica(detect_cards=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    await run_until(js, projection, db.engine, len(SENT))
    await ensure_changes_stream(js)
    assert await relay_once(js, db.engine) == len(WITH_CARDS)
    first = table(db.engine, audit, "seq")

    events = [Event.from_msg(m) async for m in read_messages(js, Stream.MESSAGES)]
    with db.engine.begin() as tx:  # the same events again, as a redelivery would bring them
        projection.apply(events, tx)
    assert table(db.engine, audit, "seq") == first
    assert table(db.engine, outbox, "id") == []

    store = SqlCheckpointStore(db.engine)
    await store.reset(projection.name, projection.reset)
    assert messages_table(db.engine) == {}
    await run_until(js, projection, db.engine, len(SENT))
    assert sorted(messages_table(db.engine)) == list(range(1, len(SENT) + 1))
    assert table(db.engine, audit, "seq") == first
    assert await relay_once(js, db.engine) == 0
    audit_events = await stream_bodies(js, Stream.AUDIT)
    assert [e["seq"] for _, e in audit_events] == WITH_CARDS


async def test_route_bodies_are_masked_and_audited_under_their_route_sequence(
    publisher: Publisher, db: Db
) -> None:
    js = publisher.js
    subject = f"route.{TENANT}.translator"
    headers = {"Content-Type": "application/json", "Broker-Event": "RouteDecided"}
    await js.publish(subject, b'{"text": "card 4242-4242-4242-4242 exp 12/29"}', headers=headers)
    await js.publish(subject, b'{"text": "no card, order 1717000000123"}', headers=headers)
    projection = RoutesReplica(detect_cards=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    await run_until(js, projection, db.engine, 2)

    from projections.replica import metadata

    routes = table(db.engine, metadata.tables["replica_routes"], "seq")
    assert [r["body"] for r in routes] == [
        {"text": "card [card ****4242] exp 12/29"},
        {"text": "no card, order 1717000000123"},
    ]
    [record] = table(db.engine, audit, "seq")
    assert (record["stream"], record["seq"], record["subject"], record["count"]) == (
        "ROUTES",
        1,
        subject,
        1,
    )
    assert record["findings"][0]["field"] == "body"


async def test_a_worker_relays_audit_events_without_change_events(
    publisher: Publisher, nats_url: str, db: Db
) -> None:
    """Change events off, card detection on: the worker still relays the outbox, and only
    audit events come out of it."""
    js = publisher.js
    await publish_all(js)
    options = WorkerOptions(
        nats_urls=[nats_url],
        replica_url=db.url,
        projections=[MessagesReplica(detect_cards=True)],
        worker_id="cards",
        batch=4,
        lease_ttl=2.0,
    )
    worker = Worker(options)
    assert worker.relays_outbox
    task = asyncio.create_task(worker.run())

    async def relayed() -> bool:
        """Every audit event in AUDIT and its outbox row deleted: the relay deletes a row
        after AUDIT acked it, so a stop between the two would leave it for the next run."""
        info = await js.stream_info(Stream.AUDIT)
        return info.state.messages >= len(WITH_CARDS) and not table(db.engine, outbox, "id")

    try:
        assert await await_until(relayed, timeout=60)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    events = await stream_bodies(js, Stream.AUDIT)
    assert [e["seq"] for _, e in events] == WITH_CARDS
    try:  # no change events: the stream is empty, or was never created
        changed = (await js.stream_info(CHANGES_STREAM)).state.messages
    except NotFoundError:
        changed = 0
    assert changed == 0


def test_the_setting_turns_detection_on_for_the_message_and_route_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off by default; BROKER_DETECT_CARD_NUMBERS=true turns it on where payloads are."""

    def detecting() -> dict[str, bool]:
        get_settings.cache_clear()
        try:
            return {p.name: getattr(p, "detect_cards", None) for p in replica_projections()}
        finally:
            get_settings.cache_clear()

    monkeypatch.delenv("BROKER_DETECT_CARD_NUMBERS", raising=False)
    assert set(detecting().values()) == {False}
    monkeypatch.setenv("BROKER_DETECT_CARD_NUMBERS", "true")
    assert detecting() == {
        "replica_messages": True,
        "replica_agents": False,
        "replica_schemas": False,
        "replica_routes": True,
    }


async def test_card_numbers_written_as_floats_are_masked_with_their_digits(
    publisher: Publisher, db: Db
) -> None:
    """A card written as a float with its digits split by the point (``…42.42e2``) passed
    the pre-check unmasked; one over 2**53 (a 19-digit card with ``.0``) had its digits
    read from the rounded float and failed Luhn. The replica reads them as written."""
    js = publisher.js
    bodies = [b'{"pan": 42424242424242.42e2}', b'{"pan": 4111111111111111110.0}']
    for body in bodies:
        ack = await js.publish(
            f"msg.{TENANT}.floats", body, headers={"Content-Type": "application/json"}
        )
    projection = MessagesReplica(detect_cards=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    await run_until(js, projection, db.engine, ack.seq)
    rows = messages_table(db.engine)
    assert [rows[seq]["payload_json"] for seq in (ack.seq - 1, ack.seq)] == [
        {"pan": "[card ****4242]"},
        {"pan": "[card ****1110]"},
    ]
