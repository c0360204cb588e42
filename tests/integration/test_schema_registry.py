"""The schema registry against a real server: events in SCHEMAS, ids, races, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from broker.envelope import Tenant
from broker.errors import (
    IncompatibleSchema,
    InvalidSchema,
    ReferenceExists,
    SubjectNotFound,
    SubjectNotSoftDeleted,
    VersionNotSoftDeleted,
)
from broker.publisher import Publisher
from broker.reader import read_messages
from broker.registry.schemas import decisions
from broker.registry.schemas.decisions import SchemaRequest
from broker.registry.schemas.events import SchemaId, SchemaReference
from broker.registry.schemas.service import SchemaRegistry
from broker.registry.schemas.state import TenantSchemas
from broker.registry.schemas.types import CompatibilityLevel, SchemaType
from broker.streams import Stream

pytestmark = pytest.mark.integration
T = Tenant("acme")


def record(name: str, *fields: tuple[str, str], defaults: bool = False) -> str:
    body = [
        {
            "name": f,
            "type": t,
            **({"default": 0 if t in {"int", "long"} else ""} if defaults else {}),
        }
        for f, t in fields
    ]
    return orjson.dumps({"type": "record", "name": name, "fields": body}).decode()


def avro(text: str, *refs: SchemaReference) -> SchemaRequest:
    return SchemaRequest(SchemaType.AVRO, text, tuple(refs))


async def register(registry: SchemaRegistry, subject: str, request: SchemaRequest) -> SchemaId:
    return await registry.execute(
        T, lambda reg: decisions.register(registry.catalog, reg, T, subject, request)
    )


async def set_level(registry: SchemaRegistry, subject: str | None, level: str) -> None:
    await registry.execute(
        T, lambda reg: decisions.set_level(reg, T, subject, CompatibilityLevel(level))
    )


async def stored_events(publisher: Publisher) -> list[str]:
    return [
        (m.headers or {})["Broker-Event-Type"]
        async for m in read_messages(publisher.js, Stream.SCHEMAS)
    ]


async def test_register_evolve_and_reject_appends_only_real_changes(publisher: Publisher) -> None:
    registry = SchemaRegistry(publisher)
    v1 = record("User", ("id", "long"))
    first = await register(registry, "users-value", avro(v1))
    assert first == 1
    # Identical (even re-formatted) schema: the same id, nothing appended.
    pretty = orjson.dumps(orjson.loads(v1), option=orjson.OPT_INDENT_2).decode()
    assert await register(registry, "users-value", avro(pretty)) == first
    # BACKWARD (the default): a new field needs a default.
    with pytest.raises(IncompatibleSchema, match="users-value"):
        await register(
            registry, "users-value", avro(record("User", ("id", "long"), ("n", "string")))
        )
    v2 = record("User", ("id", "long"), ("n", "string"), defaults=True)
    assert await register(registry, "users-value", avro(v2)) == 2
    # The same schema under another subject keeps its global id.
    assert await register(registry, "other-value", avro(v2)) == 2
    reg = await registry.read(T)
    assert [v.version for v in reg.versions("users-value")] == [1, 2]
    assert await stored_events(publisher) == ["SchemaVersionRegistered"] * 3


async def test_each_level_checks_the_direction_and_history_it_names(publisher: Publisher) -> None:
    registry = SchemaRegistry(publisher)
    await set_level(registry, "s", "FORWARD")
    await register(registry, "s", avro(record("R", ("a", "int"), ("b", "int"))))
    # FORWARD: the old reader must read new data; dropping b (no default in the old) breaks it.
    with pytest.raises(IncompatibleSchema):
        await register(registry, "s", avro(record("R", ("a", "int"))))
    # Adding a field is fine for FORWARD (old readers ignore it).
    await register(registry, "s", avro(record("R", ("a", "int"), ("b", "int"), ("c", "int"))))
    await set_level(registry, "s", "NONE")
    await register(registry, "s", avro(record("R", ("z", "string"))))
    await set_level(registry, "s", "FULL_TRANSITIVE")
    with pytest.raises(IncompatibleSchema):  # v1..v3 have no z and v3 no default for a
        await register(registry, "s", avro(record("R", ("z", "string"), ("a", "int"))))
    reg = await registry.read(T)
    assert reg.level("s") is CompatibilityLevel.FULL_TRANSITIVE
    assert reg.level("unset") is CompatibilityLevel.BACKWARD


async def test_ids_have_no_gaps_or_collisions_with_concurrent_writers(
    publisher: Publisher, nats_url: str
) -> None:
    other = Publisher([nats_url])
    other.start()
    assert await other.wait_connected(5)
    try:
        writers = [SchemaRegistry(publisher), SchemaRegistry(other)]
        await set_level(writers[0], None, "NONE")
        jobs = [
            register(writers[i % 2], f"subject-{i % 5}", avro(record(f"R{i}", ("f", "int"))))
            for i in range(40)
        ]
        ids = await asyncio.gather(*jobs)
    finally:
        await other.close()
    assert sorted(ids) == list(range(1, 41))
    reg = await SchemaRegistry(publisher).read(T)
    assert sorted(reg.schemas) == list(range(1, 41))
    for subject in (f"subject-{n}" for n in range(5)):
        assert [v.version for v in reg.versions(subject)] == list(range(1, 9))


async def test_a_new_process_rebuilds_the_same_ids_from_the_stream(publisher: Publisher) -> None:
    first = SchemaRegistry(publisher)
    await set_level(first, None, "NONE")
    ids = [
        await register(first, f"s{i}", avro(record("R", ("f", "int")) if i else '"string"'))
        for i in range(3)
    ]
    await first.execute(T, lambda reg: decisions.delete_version(reg, T, "s2", "1", permanent=False))
    rebuilt = await SchemaRegistry(publisher).read(T)
    before = first.state.tenant(T)
    assert rebuilt.schemas == before.schemas
    assert rebuilt.subjects == before.subjects
    assert ids == [1, 2, 2]
    assert rebuilt.subject_names() == ["s0", "s1"]
    assert rebuilt.subject_names(deleted=True) == ["s0", "s1", "s2"]


async def test_deletes_go_soft_then_permanent_and_references_hold(publisher: Publisher) -> None:
    registry = SchemaRegistry(publisher)
    address = record("Address", ("street", "string"))
    await register(registry, "address", avro(address))
    user = orjson.dumps(
        {"type": "record", "name": "User", "fields": [{"name": "home", "type": "Address"}]}
    ).decode()
    user_id = await register(registry, "user", avro(user, SchemaReference("Address", "address", 1)))

    async def run(decide: Callable[[TenantSchemas], decisions.Decision[object]]) -> object:
        return await registry.execute(T, decide)

    with pytest.raises(ReferenceExists):
        await run(lambda reg: decisions.delete_subject(reg, T, "address", permanent=False))
    with pytest.raises(InvalidSchema, match="does not exist"):
        await register(registry, "bad", avro(user, SchemaReference("Address", "address", 7)))
    with pytest.raises(VersionNotSoftDeleted):
        await run(lambda reg: decisions.delete_version(reg, T, "user", "1", permanent=True))
    assert await run(lambda reg: decisions.delete_subject(reg, T, "user", permanent=False)) == [1]
    reg = await registry.read(T)
    assert reg.schema(user_id).references == (SchemaReference("Address", "address", 1),)
    with pytest.raises(SubjectNotSoftDeleted):
        await run(lambda reg: decisions.delete_subject(reg, T, "address", permanent=True))
    assert await run(lambda reg: decisions.delete_subject(reg, T, "user", permanent=True)) == [1]
    with pytest.raises(SubjectNotFound):
        (await registry.read(T)).versions("user", deleted=True)
    # Nothing references Address any more: it can go.
    assert await run(lambda reg: decisions.delete_subject(reg, T, "address", permanent=False)) == [
        1
    ]
    assert await stored_events(publisher) == [
        "SchemaVersionRegistered",
        "SchemaVersionRegistered",
        "SchemaVersionDeleted",
        "SchemaVersionDeleted",
        "SchemaVersionDeleted",
    ]
