"""Replay's decoders (:class:`broker.registry.schemas.decoders.Decoders`) with Avro schemas
from a real registry: schemas with references decode; a schema whose reference was deleted
for good is a per-record decode error, never an error for the whole page; and the registry
refuses (42201) the schemas no codec could read."""

from __future__ import annotations

import orjson
import pytest

from broker.codecs import DecodeError
from broker.envelope import Tenant
from broker.errors import InvalidSchema
from broker.publisher import Publisher
from broker.registry.schemas import decisions
from broker.registry.schemas.decisions import SchemaRequest
from broker.registry.schemas.decoders import Decoders
from broker.registry.schemas.events import SchemaId, SchemaReference
from broker.registry.schemas.service import SchemaRegistry
from broker.registry.schemas.types import SchemaType

pytestmark = pytest.mark.integration
T = Tenant("acme")
AVRO = "application/avro"
INNER = '{"type": "record", "name": "Inner", "fields": [{"name": "a", "type": "int"}]}'
TO_INNER = SchemaReference("Inner", "inner", 1)


def avro(schema: object, *refs: SchemaReference) -> SchemaRequest:
    text = schema if isinstance(schema, str) else orjson.dumps(schema).decode()
    return SchemaRequest(SchemaType.AVRO, text, tuple(refs))


async def register(registry: SchemaRegistry, subject: str, request: SchemaRequest) -> SchemaId:
    return await registry.execute(
        T, lambda reg: decisions.register(registry.catalog, reg, T, subject, request)
    )


@pytest.mark.parametrize(
    ("schema", "body", "value"),
    [
        (
            {"type": "record", "name": "Outer", "fields": [{"name": "i", "type": "Inner"}]},
            b"\x04",
            {"i": {"a": 2}},
        ),
        (["null", "Inner"], b"\x02\x04", {"a": 2}),
        ({"type": "array", "items": "Inner"}, b"\x04\x04\x06\x00", [{"a": 2}, {"a": 3}]),
    ],
    ids=["record", "union", "array"],
)
async def test_a_schema_with_a_reference_decodes(
    publisher: Publisher, schema: object, body: bytes, value: object
) -> None:
    registry = SchemaRegistry(publisher)
    await register(registry, "inner", avro(INNER))
    schema_id = await register(registry, "outer", avro(schema, TO_INNER))
    codec = await Decoders(registry).codec(T, AVRO, schema_id)
    assert codec.decode(body) == value


async def test_a_schema_whose_reference_is_gone_for_good_is_a_decode_error(
    publisher: Publisher,
) -> None:
    registry = SchemaRegistry(publisher)
    await register(registry, "inner", avro(INNER))
    outer = {"type": "record", "name": "Outer", "fields": [{"name": "i", "type": "Inner"}]}
    outer_id = await register(registry, "outer", avro(outer, TO_INNER))
    plain_id = await register(registry, "plain", avro('"string"'))
    await registry.execute(
        T, lambda reg: decisions.delete_subject(reg, T, "outer", permanent=False)
    )
    await registry.execute(
        T, lambda reg: decisions.delete_version(reg, T, "inner", "1", permanent=False)
    )
    await registry.execute(
        T, lambda reg: decisions.delete_version(reg, T, "inner", "1", permanent=True)
    )

    decoders = Decoders(SchemaRegistry(publisher))  # a process that never parsed it
    for _ in range(2):  # built once, the error kept
        with pytest.raises(DecodeError, match=f"schema {outer_id} can no longer be read: "):
            await decoders.codec(T, AVRO, outer_id)
    assert (await decoders.codec(T, AVRO, plain_id)).decode(b"\x04hi") == "hi"


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (
            {
                "type": "array",
                "items": {"type": "record", "name": "R", "fields": [{"name": "n", "type": "R"}]},
            },
            "record 'R' has no finite value",
        ),
        ({"type": "fixed", "name": "F", "size": 2**31}, "fixed 'size' must be an integer from 0"),
    ],
    ids=["record of itself", "fixed past 32 bits"],
)
async def test_a_schema_no_codec_can_read_is_refused_with_42201(
    publisher: Publisher, schema: object, reason: str
) -> None:
    registry = SchemaRegistry(publisher)
    with pytest.raises(InvalidSchema, match=reason) as refused:
        await register(registry, "bad", avro(schema))
    assert refused.value.to_dict()["error_code"] == 42201
    assert refused.value.status == 422
