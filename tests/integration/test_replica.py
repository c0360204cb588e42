"""SQL replicas against real SQLite and PostgreSQL: rows equal the fold of the events.

Events are built with the broker's own encoders (no NATS needed); every test runs once on
a SQLite file and once on a fresh schema of the PostgreSQL at 127.0.0.1:5432, which must be
there (an unreachable server fails the test, it does not skip it).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
import sqlalchemy as sa

from broker.envelope import Outbound, Tenant
from broker.registry import events as agent_events
from broker.registry.events import RegistryEvent, RegistryEventType
from broker.registry.manifest import AgentManifest, AgentName
from broker.registry.schemas import events as schema_events
from broker.registry.schemas.events import (
    CompatibilityChanged,
    SchemaEvent,
    SchemaId,
    SchemaReference,
    SchemaVersionDeleted,
    SchemaVersionRegistered,
)
from broker.registry.schemas.state import SchemaRegistryState
from broker.registry.schemas.types import CompatibilityLevel, SchemaType
from broker.registry.snapshot import fold
from projections.base import Event, Projection
from projections.checkpoints import create_sql_engine
from projections.replica import (
    REPLICAS,
    AgentsReplica,
    MessagesReplica,
    RoutesReplica,
    SchemasReplica,
    ensure_outbox,
    metadata,
    outbox,
    replica_projections,
)
from tests.integration.conftest import replica_url

pytestmark = pytest.mark.integration

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
T = Tenant("acme")
T2 = Tenant("globex")
EPOCH = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


# --- databases ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        lite = create_sql_engine(f"sqlite:///{tmp_path / 'replica.db'}")
        yield lite
        lite.dispose()
        return
    schema = f"t_{uuid.uuid4().hex}"
    admin = sa.create_engine(PG_URL, connect_args={"connect_timeout": 5})
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {e}")
    pg = create_sql_engine(replica_url(schema))  # as the worker makes it (its JSON encoder)
    try:
        yield pg
    finally:
        pg.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def apply(engine: sa.Engine, projection: Projection, batch: Sequence[Event]) -> None:
    """One batch in one transaction, as the runtime's SQL checkpoint store runs it."""
    with engine.begin() as tx:
        projection.setup(tx)
        projection.apply(batch, tx)


def rows(engine: sa.Engine, table: str, *order: str) -> list[dict[str, Any]]:
    """Rows read through the replica's own table definitions (timestamps come back aware)."""
    with engine.connect() as conn:
        found = metadata.tables[table]
        query = sa.select(found).order_by(*(found.c[name] for name in order))
        return [dict(row) for row in conn.execute(query).mappings()]


def changes(engine: sa.Engine, table: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        query = sa.select(outbox).where(outbox.c.table_name == table).order_by(outbox.c.id)
        return [dict(row) for row in conn.execute(query).mappings()]


def at(seq: int) -> datetime:
    return EPOCH + timedelta(seconds=seq)


def stored(stream: str, seq: int, out: Outbound) -> Event:
    return Event(stream, seq, out.subject, at(seq), out.headers, out.payload)


# --- events ------------------------------------------------------------------------------


def message(seq: int, payload: bytes, content_type: str, subject: str = "orders.created") -> Event:
    headers = {"Content-Type": content_type, "Nats-Msg-Id": f"key-{seq}"}
    return Event("MESSAGES", seq, f"msg.{T}.{subject}", at(seq), headers, payload)


def manifest(name: str, version: str = "1.0.0") -> AgentManifest:
    return AgentManifest.model_validate(
        {
            "name": name,
            "version": version,
            "description": f"Translates text ({version}).",
            "capabilities": [{"action": "translate", "content_types": ["text/plain"]}],
        }
    )


def agent(seq: int, kind: RegistryEventType, name: str, version: str = "1.0.0", tenant: str = T):
    body = None if kind is RegistryEventType.DEREGISTERED else manifest(name, version)
    event = RegistryEvent(kind, Tenant(tenant), AgentName(name), body)
    return stored("REGISTRY", seq, agent_events.encode(event))


def schema(seq: int, event: SchemaEvent) -> Event:
    return stored("SCHEMAS", seq, schema_events.encode(event))


def registered(tenant: str, subject: str, version: int, schema_id: int) -> SchemaEvent:
    refs = (SchemaReference("com.acme.Base", "base", 1),) if version > 1 else ()
    text = orjson.dumps({"type": "record", "name": f"R{schema_id}", "fields": []}).decode()
    return SchemaVersionRegistered(
        Tenant(tenant), subject, version, SchemaId(schema_id), SchemaType.AVRO, text, refs
    )


AGENT_BATCH = [
    agent(1, RegistryEventType.REGISTERED, "translator"),
    agent(2, RegistryEventType.REGISTERED, "summarizer"),
    agent(3, RegistryEventType.UPDATED, "translator", "1.1.0"),
    agent(4, RegistryEventType.REGISTERED, "translator", tenant=T2),
    agent(5, RegistryEventType.REGISTERED, "ocr"),
    agent(6, RegistryEventType.DEREGISTERED, "summarizer"),
    agent(7, RegistryEventType.DEREGISTERED, "ocr"),
    agent(8, RegistryEventType.REGISTERED, "ocr", "2.0.0"),
]

SCHEMA_EVENTS: list[SchemaEvent] = [
    registered(T, "orders-value", 1, 1),
    registered(T, "orders-value", 2, 2),
    registered(T, "a.b c/ü", 1, 3),
    registered(T, "a.b c/ü", 2, 4),
    registered(T2, "orders-value", 1, 1),
    SchemaVersionDeleted(T, "orders-value", 1, permanent=False),
    SchemaVersionDeleted(T, "a.b c/ü", None, permanent=False),
    SchemaVersionDeleted(T, "a.b c/ü", 1, permanent=True),
    registered(T, "a.b c/ü", 3, 5),
    CompatibilityChanged(T, None, CompatibilityLevel.FULL),
    CompatibilityChanged(T, "orders-value", CompatibilityLevel.NONE),
    CompatibilityChanged(T2, "orders-value", CompatibilityLevel.FORWARD),
    CompatibilityChanged(T2, "orders-value", None),
    SchemaVersionDeleted(T2, "orders-value", None, permanent=False),
    SchemaVersionDeleted(T2, "orders-value", None, permanent=True),
]
SCHEMA_BATCH = [schema(seq, e) for seq, e in enumerate(SCHEMA_EVENTS, start=1)]


# --- messages ----------------------------------------------------------------------------


def test_messages_replica_decodes_json_payloads_and_records_why_others_are_not(
    engine: sa.Engine,
) -> None:
    """JSON lands in payload_json; binary media types are not decoded (NULL, no error);
    hostile or broken JSON is NULL with the codec's reason in decode_error."""
    avro = io.BytesIO()
    fastavro.schemaless_writer(avro, fastavro.parse_schema({"type": "string"}), "hello")
    hostile = b"[" * 5000 + b"]" * 5000
    framed = b"\x00" + (7).to_bytes(4, "big") + b'{"framed": true}'
    batch = [
        message(
            1, b'{"id": 1, "items": [1, 2.5, "x"], "nested": {"ok": null}}', "application/json"
        ),
        message(2, b'{"specversion": "1.0"}', "application/cloudevents+json; charset=utf-8"),
        message(3, avro.getvalue(), "application/avro", subject="events.avro"),
        message(4, b"plain text", "text/plain"),
        message(5, hostile, "application/json"),
        message(6, b"{not json", "application/json"),
        message(7, b'{"nul": "a\\u0000b"}', "application/json"),
        message(8, framed, "application/json"),
    ]
    apply(engine, MessagesReplica(), batch)

    got = {row["seq"]: row for row in rows(engine, "replica_messages", "seq")}
    assert sorted(got) == list(range(1, 9))
    first = got[1]
    assert first["stream"] == "MESSAGES"
    assert (first["tenant"], first["subject"]) == (T, "orders.created")
    assert first["time"] == at(1)
    assert first["time"].tzinfo is not None
    assert (first["msg_id"], first["content_type"], first["size"]) == (
        "key-1",
        "application/json",
        len(batch[0].data),
    )
    assert first["payload_json"] == {"id": 1, "items": [1, 2.5, "x"], "nested": {"ok": None}}
    assert first["decode_error"] is None
    assert got[2]["payload_json"] == {"specversion": "1.0"}
    assert (got[3]["subject"], got[3]["payload_json"], got[3]["decode_error"]) == (
        "events.avro",
        None,
        None,
    )
    assert (got[4]["payload_json"], got[4]["decode_error"]) == (None, None)
    assert got[5]["payload_json"] is None
    assert got[5]["decode_error"].startswith("json payload could not be decoded")
    assert got[6]["payload_json"] is None
    assert got[6]["decode_error"].startswith("json payload could not be decoded")
    assert got[7]["payload_json"] is None
    assert "U+0000" in got[7]["decode_error"]
    assert got[8]["payload_json"] == {"framed": True}
    assert all(row["schema_id"] is None for row in got.values())


def test_messages_schema_id_header_is_a_column(engine: sa.Engine) -> None:
    event = message(1, b"{}", "application/json")
    event = Event(
        event.stream, 1, event.subject, None, {**event.headers, "Broker-Schema-Id": "42"}, b"{}"
    )
    apply(engine, MessagesReplica(), [event])
    [row] = rows(engine, "replica_messages", "seq")
    assert (row["schema_id"], row["time"]) == (42, None)


def test_messages_batch_applied_twice_changes_nothing_and_logs_each_row_once(
    engine: sa.Engine,
) -> None:
    """Re-applying a batch (or one overlapping it) neither fails nor duplicates rows or
    change events."""
    replica = MessagesReplica(changes=True)
    batch = [message(seq, orjson.dumps({"n": seq}), "application/json") for seq in range(1, 11)]
    apply(engine, replica, batch)
    first = rows(engine, "replica_messages", "seq")
    apply(engine, replica, batch)
    assert rows(engine, "replica_messages", "seq") == first
    apply(engine, replica, [*batch[5:], message(11, b"{}", "application/json")])

    assert [r["seq"] for r in rows(engine, "replica_messages", "seq")] == list(range(1, 12))
    logged = changes(engine, "replica_messages")
    assert [(c["op"], c["key"], c["source_seq"]) for c in logged] == [
        ("c", {"seq": seq}, seq) for seq in range(1, 12)
    ]
    assert logged[0]["before"] is None
    assert logged[0]["after"]["payload_json"] == {"n": 1}
    assert logged[0]["after"]["time"] == at(1).isoformat()
    assert {c["projection"] for c in logged} == {"replica_messages"}
    assert {c["source_stream"] for c in logged} == {"MESSAGES"}


def test_messages_batch_is_written_with_one_insert(engine: sa.Engine) -> None:
    """300 messages cost one INSERT round trip (executemany), not 300."""
    batch = [message(seq, orjson.dumps({"n": seq}), "application/json") for seq in range(1, 301)]
    replica = MessagesReplica(changes=True)
    with engine.begin() as tx:
        replica.setup(tx)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.lstrip().split("(")[0].strip())

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        with engine.begin() as tx:
            replica.apply(batch, tx)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert statements.count("INSERT INTO replica_messages") == 1
    assert statements.count("INSERT INTO broker_outbox") == 1
    assert len(rows(engine, "replica_messages", "seq")) == 300


# --- agents ------------------------------------------------------------------------------


def agent_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    return [
        (
            r["tenant"],
            r["name"],
            r["version"],
            r["description"],
            r["manifest"],
            r["seq"],
            r["registered_seq"],
            r["updated_at"],
        )
        for r in rows(engine, "replica_agents", "tenant", "name")
    ]


def test_agents_replica_equals_the_registry_fold_and_keeps_every_event(engine: sa.Engine) -> None:
    replica = AgentsReplica()
    apply(engine, replica, AGENT_BATCH[:3])
    apply(engine, replica, AGENT_BATCH[3:])

    decoded = [
        agent_events.decode(e.data, subject=e.subject, seq=e.seq, at=e.time) for e in AGENT_BATCH
    ]
    snapshot = fold(decoded)
    expected = sorted(
        (
            r.tenant,
            r.name,
            r.manifest.version,
            r.manifest.description,
            r.manifest.model_dump(mode="json"),
            r.seq,
            r.registered_seq,
            r.updated_at,
        )
        for r in snapshot.values()
    )
    assert agent_rows(engine) == expected
    assert [(n, s, rs) for _, n, _, _, _, s, rs, _ in agent_rows(engine)] == [
        ("ocr", 8, 8),
        ("translator", 3, 1),
        ("translator", 4, 4),
    ]
    history = rows(engine, "replica_agent_history", "seq")
    assert [(h["seq"], h["tenant"], h["name"], h["type"]) for h in history] == [
        (e.seq, e.tenant, e.name, str(e.type)) for e in decoded
    ]
    assert history[5]["manifest"] is None
    assert history[2]["manifest"] == manifest("translator", "1.1.0").model_dump(mode="json")
    assert history[0]["time"] == at(1)


def test_agents_batch_applied_twice_changes_nothing(engine: sa.Engine) -> None:
    replica = AgentsReplica(changes=True)
    apply(engine, replica, AGENT_BATCH)
    state, history = agent_rows(engine), rows(engine, "replica_agent_history", "seq")
    logged = len(changes(engine, "replica_agents"))
    apply(engine, replica, AGENT_BATCH)
    apply(engine, replica, AGENT_BATCH[2:6])
    assert agent_rows(engine) == state
    assert rows(engine, "replica_agent_history", "seq") == history
    assert len(changes(engine, "replica_agents")) == logged


def test_agent_change_events_carry_before_and_after(engine: sa.Engine) -> None:
    """Register, update, deregister: c, u, d on replica_agents; c on the history."""
    replica = AgentsReplica(changes=True)
    apply(engine, replica, [agent(1, RegistryEventType.REGISTERED, "tr")])
    apply(engine, replica, [agent(2, RegistryEventType.UPDATED, "tr", "1.1.0")])
    apply(engine, replica, [agent(3, RegistryEventType.DEREGISTERED, "tr")])
    # Registered and deregistered within one batch: no net change, no event.
    apply(
        engine,
        replica,
        [
            agent(4, RegistryEventType.REGISTERED, "tmp"),
            agent(5, RegistryEventType.DEREGISTERED, "tmp"),
        ],
    )

    logged = changes(engine, "replica_agents")
    assert [(c["op"], c["key"], c["source_seq"]) for c in logged] == [
        ("c", {"tenant": T, "name": "tr"}, 1),
        ("u", {"tenant": T, "name": "tr"}, 2),
        ("d", {"tenant": T, "name": "tr"}, 3),
    ]
    create, update, delete = logged
    assert create["before"] is None
    assert (create["after"]["version"], create["after"]["registered_seq"]) == ("1.0.0", 1)
    assert create["after"]["updated_at"] == at(1).isoformat()
    assert (update["before"]["version"], update["after"]["version"]) == ("1.0.0", "1.1.0")
    assert update["after"]["registered_seq"] == 1
    assert (delete["before"]["version"], delete["after"]) == ("1.1.0", None)
    history = changes(engine, "replica_agent_history")
    assert [(c["op"], c["key"]) for c in history] == [("c", {"seq": s}) for s in range(1, 6)]
    assert agent_rows(engine) == []


# --- schemas -----------------------------------------------------------------------------


def expected_schema_rows(
    events: Sequence[Event],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    state = SchemaRegistryState()
    for e in events:
        state.apply(schema_events.decode(e.data, subject=e.subject, seq=e.seq, at=e.time))
    versions = sorted(
        (
            tenant,
            v.subject,
            v.version,
            v.schema.id,
            str(v.schema.schema_type),
            v.schema.schema,
            [r.to_dict() for r in v.schema.references],
            v.deleted,
            v.seq,
        )
        for tenant, registry in state.tenants.items()
        for subject_versions in registry.subjects.values()
        for v in subject_versions.values()
    )
    levels = sorted(
        [
            *(
                (tenant, subject, str(level))
                for tenant, registry in state.tenants.items()
                for subject, level in registry.subject_levels.items()
            ),
            *(
                (tenant, "", str(registry.global_level))
                for tenant, registry in state.tenants.items()
                if registry.global_level is not None
            ),
        ]
    )
    return versions, levels


def schema_rows(engine: sa.Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    versions = [
        (
            r["tenant"],
            r["subject"],
            r["version"],
            r["schema_id"],
            r["schema_type"],
            r["schema"],
            r["references"],
            r["deleted"],
            r["seq"],
        )
        for r in rows(engine, "replica_schema_versions", "tenant", "subject", "version")
    ]
    levels = [
        (r["tenant"], r["subject"], r["level"])
        for r in rows(engine, "replica_compatibility", "tenant", "subject")
    ]
    return sorted(versions), sorted(levels)


@pytest.mark.parametrize("size", [1, 4, len(SCHEMA_BATCH)])
def test_schemas_replica_equals_the_registry_state(engine: sa.Engine, size: int) -> None:
    """Whatever the batch size, the tables hold what SchemaRegistryState folds to."""
    replica = SchemasReplica()
    for start in range(0, len(SCHEMA_BATCH), size):
        apply(engine, replica, SCHEMA_BATCH[start : start + size])
    expected = expected_schema_rows(SCHEMA_BATCH)
    assert schema_rows(engine) == expected
    versions, levels = expected
    assert [(v[0], v[1], v[2], v[7]) for v in versions] == [
        (T, "a.b c/ü", 2, True),
        (T, "a.b c/ü", 3, False),
        (T, "orders-value", 1, True),
        (T, "orders-value", 2, False),
    ]
    assert levels == [(T, "", "FULL"), (T, "orders-value", "NONE")]

    apply(engine, replica, SCHEMA_BATCH[start : start + size])  # the last batch, again
    apply(engine, replica, SCHEMA_BATCH)
    assert schema_rows(engine) == expected


def test_schema_change_events(engine: sa.Engine) -> None:
    replica = SchemasReplica(changes=True)
    events: list[SchemaEvent] = [
        registered(T, "s", 1, 1),
        SchemaVersionDeleted(T, "s", None, permanent=False),
        SchemaVersionDeleted(T, "s", None, permanent=True),
        CompatibilityChanged(T, None, CompatibilityLevel.FULL),
        CompatibilityChanged(T, None, CompatibilityLevel.NONE),
        CompatibilityChanged(T, None, None),
    ]
    for seq, event in enumerate(events, start=1):
        apply(engine, replica, [schema(seq, event)])

    logged = changes(engine, "replica_schema_versions")
    assert [(c["op"], c["key"], c["source_seq"]) for c in logged] == [
        ("c", {"tenant": T, "subject": "s", "version": 1}, 1),
        ("u", {"tenant": T, "subject": "s", "version": 1}, 2),
        ("d", {"tenant": T, "subject": "s", "version": 1}, 3),
    ]
    assert (logged[1]["before"]["deleted"], logged[1]["after"]["deleted"]) == (False, True)
    assert (logged[2]["before"]["seq"], logged[2]["after"]) == (2, None)
    levels = changes(engine, "replica_compatibility")
    assert [(c["op"], c["key"], c["after"] and c["after"]["level"]) for c in levels] == [
        ("c", {"tenant": T, "subject": ""}, "FULL"),
        ("u", {"tenant": T, "subject": ""}, "NONE"),
        ("d", {"tenant": T, "subject": ""}, None),
    ]


# --- routes ------------------------------------------------------------------------------


def route(seq: int, body: bytes, headers: dict[str, str] | None = None) -> Event:
    return Event("ROUTES", seq, f"route.{T}.translator.decided", at(seq), headers or {}, body)


def test_routes_replica_stores_json_bodies_as_is(engine: sa.Engine) -> None:
    batch = [
        route(1, b'{"score": 0.9, "agent": "translator"}'),
        route(2, b"\x00\x01binary", {"Content-Type": "application/octet-stream"}),
        route(3, b"[" * 5000 + b"]" * 5000),
        route(4, b'{"x": 1}', {"Content-Type": "text/plain"}),
    ]
    replica = RoutesReplica(changes=True)
    apply(engine, replica, batch)
    apply(engine, replica, batch)
    got = rows(engine, "replica_routes", "seq")
    assert [(r["seq"], r["tenant"], r["agent"], r["body"]) for r in got] == [
        (1, T, "translator", {"score": 0.9, "agent": "translator"}),
        (2, T, "translator", None),
        (3, T, "translator", None),
        (4, T, "translator", None),
    ]
    assert got[0]["subject"] == f"route.{T}.translator.decided"
    assert got[0]["time"] == at(1)
    assert [c["op"] for c in changes(engine, "replica_routes")] == ["c"] * 4


# --- lifecycle ---------------------------------------------------------------------------


def test_reset_empties_only_the_projections_own_tables(engine: sa.Engine) -> None:
    messages, agents, schemas, routes = (
        MessagesReplica(),
        AgentsReplica(),
        SchemasReplica(),
        RoutesReplica(),
    )
    apply(engine, messages, [message(1, b"{}", "application/json")])
    apply(engine, agents, AGENT_BATCH)
    apply(engine, schemas, SCHEMA_BATCH)
    apply(engine, routes, [route(1, b"{}")])

    with engine.begin() as tx:
        agents.reset(tx)
    assert rows(engine, "replica_agents", "name") == []
    assert rows(engine, "replica_agent_history", "seq") == []
    assert len(rows(engine, "replica_messages", "seq")) == 1
    assert schema_rows(engine) == expected_schema_rows(SCHEMA_BATCH)

    with engine.begin() as tx:
        for projection in (messages, schemas, routes):
            projection.reset(tx)
    for table in ("replica_messages", "replica_schema_versions", "replica_routes"):
        assert rows(engine, table, "seq") == []
    assert rows(engine, "replica_compatibility", "subject") == []

    apply(engine, agents, AGENT_BATCH)  # a rebuild from the stream's start
    assert len(rows(engine, "replica_agents", "name")) == 3


def test_every_replica_is_a_projection(engine: sa.Engine) -> None:
    projections = replica_projections(changes=True)
    assert [p.name for p in projections] == list(REPLICAS)
    assert [(p.stream, list(p.subjects), p.partitions) for p in projections] == [
        ("MESSAGES", ["msg.>"], 16),
        ("REGISTRY", ["reg.>"], 1),
        ("SCHEMAS", ["schema.>"], 1),
        ("ROUTES", ["route.>"], 16),
    ]
    with engine.begin() as tx:
        ensure_outbox(tx)
        for projection in projections:
            assert isinstance(projection, Projection)
            projection.setup(tx)
            projection.setup(tx)  # idempotent
    assert rows(engine, "broker_outbox", "id") == []


def test_an_integer_past_64_bits_reaches_payload_json_with_every_digit(
    engine: sa.Engine,
) -> None:
    """orjson reads such an integer as a float: the replica stored 1.2345678901234568e+22
    for 12345678901234567890123. It keeps the digits (JSON text on SQLite, jsonb numeric
    on PostgreSQL)."""
    big = 12345678901234567890123
    body = b'{"id": %d, "small": [-%d, 1.5, "0000000000000000000000"]}' % (big, big)
    apply(engine, MessagesReplica(), [message(1, body, "application/json")])
    got = rows(engine, "replica_messages", "seq")[0]
    assert got["decode_error"] is None
    assert got["payload_json"] == {"id": big, "small": [-big, 1.5, "0000000000000000000000"]}
