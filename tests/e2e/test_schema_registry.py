"""The Confluent-compatible schema registry over real HTTP: Confluent's own client, and the
answers (codes, media types, shapes) it relies on."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgpack
import orjson
import pytest
from confluent_kafka.schema_registry import Schema, SchemaReference, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from broker.embedded import NatsServer
from broker.registry.schemas.types import SchemaType, parse_schema
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e
MEDIA = "application/vnd.schemaregistry.v1+json"


def subject() -> str:
    return f"orders.{uuid.uuid4().hex[:8]}-value"


def record(name: str, *fields: str, default: bool = False) -> str:
    return orjson.dumps(
        {
            "type": "record",
            "name": name,
            "namespace": "shop",
            "fields": [
                {"name": f, "type": "string", **({"default": ""} if default else {})}
                for f in fields
            ],
        }
    ).decode()


@pytest.fixture
def confluent(broker: BrokerProcess) -> SchemaRegistryClient:
    """Confluent's Python client, unchanged, pointed at the broker's registry path."""
    return SchemaRegistryClient({"url": f"{broker.base_url}/registry"})


def test_confluent_client_registers_evolves_and_reads_back(confluent: SchemaRegistryClient) -> None:
    name = subject()
    v1 = Schema(record("Order", "id"), "AVRO")
    first = confluent.register_schema(name, v1)
    assert confluent.register_schema(name, v1) == first  # identical: same id, no new version
    assert confluent.get_schema(first).schema_str == v1.schema_str
    with pytest.raises(SchemaRegistryError) as refused:
        confluent.register_schema(name, Schema(record("Order", "id", "sku"), "AVRO"))
    assert refused.value.http_status_code == 409
    assert confluent.test_compatibility(
        name, Schema(record("Order", "id", "sku", default=True), "AVRO")
    )
    second = confluent.register_schema(
        name, Schema(record("Order", "id", "sku", default=True), "AVRO")
    )
    assert second != first
    latest = confluent.get_latest_version(name)
    assert (latest.version, latest.schema_id) == (2, second)
    assert confluent.get_versions(name) == [1, 2]
    found = confluent.lookup_schema(name, v1)
    assert (found.version, found.schema_id) == (1, first)
    assert name in confluent.get_subjects()
    assert confluent.delete_version(name, 1) == 1
    assert confluent.get_versions(name) == [2]
    assert confluent.delete_subject(name) == [2]
    assert confluent.delete_subject(name, permanent=True) == [1, 2]
    with pytest.raises(SchemaRegistryError) as gone:
        confluent.get_versions(name)
    assert gone.value.error_code == 40401


def test_confluent_client_sets_levels_and_uses_references(confluent: SchemaRegistryClient) -> None:
    name = subject()
    assert confluent.set_compatibility(name, "FULL") == {"compatibility": "FULL"}
    assert confluent.get_compatibility(name) == "FULL"
    address = subject()
    confluent.register_schema(address, Schema(record("Address", "street"), "AVRO"))
    user = orjson.dumps(
        {
            "type": "record",
            "name": "User",
            "namespace": "shop",
            "fields": [{"name": "home", "type": "shop.Address"}],
        }
    ).decode()
    ref = SchemaReference("shop.Address", address, 1)
    user_id = confluent.register_schema(name, Schema(user, "AVRO", [ref]))
    fetched = confluent.get_schema(user_id)
    assert [(r.name, r.subject, r.version) for r in fetched.references] == [
        ("shop.Address", address, 1)
    ]


def test_protobuf_and_json_schemas_register_with_their_type(
    confluent: SchemaRegistryClient,
) -> None:
    proto = 'syntax = "proto3";\npackage shop;\nmessage Order { string id = 1; int64 qty = 2; }\n'
    pid = confluent.register_schema(subject(), Schema(proto, "PROTOBUF"))
    assert confluent.get_schema(pid).schema_type == "PROTOBUF"
    js = '{"type": "object", "properties": {"id": {"type": "string"}}}'
    jid = confluent.register_schema(subject(), Schema(js, "JSON"))
    assert confluent.get_schema(jid).schema_type == "JSON"


async def _post(client: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    return await client.post(
        f"/registry{path}", content=orjson.dumps(body), headers={"content-type": MEDIA}
    )


async def test_answers_carry_confluent_codes_and_media_type(client: httpx.AsyncClient) -> None:
    name = subject()
    created = await _post(client, f"/subjects/{name}/versions", {"schema": record("A", "x")})
    assert created.status_code == 200, created.text
    assert created.headers["content-type"].startswith(MEDIA)
    sid = created.json()["id"]
    by_id = (await client.get(f"/registry/schemas/ids/{sid}")).json()
    assert "schemaType" not in by_id  # Avro is the default and is left out, as Confluent does
    text = await client.get(f"/registry/schemas/ids/{sid}/schema")
    assert text.json() == orjson.loads(record("A", "x"))
    assert (await client.get(f"/registry/schemas/ids/{sid}/versions")).json() == [
        {"subject": name, "version": 1}
    ]
    expected = {
        f"/subjects/{subject()}/versions": (404, 40401),
        f"/subjects/{name}/versions/9": (404, 40402),
        f"/subjects/{name}/versions/zero": (422, 42202),
        "/schemas/ids/2147483647": (404, 40403),
        f"/config/{name}": (404, 40408),
    }
    for path, (status, code) in expected.items():
        answer = await client.get(f"/registry{path}")
        assert (answer.status_code, answer.json()["error_code"]) == (status, code), path
    bad = await _post(client, f"/subjects/{name}/versions", {"schema": '{"type": "recrod"}'})
    assert (bad.status_code, bad.json()["error_code"]) == (422, 42201)
    level = await client.put(
        f"/registry/config/{name}",
        content=b'{"compatibility": "SIDEWAYS"}',
        headers={"content-type": MEDIA},
    )
    assert (level.status_code, level.json()["error_code"]) == (422, 42203)
    missing = await _post(client, f"/subjects/{name}", {"schema": record("B", "y")})
    assert (missing.status_code, missing.json()["error_code"]) == (404, 40403)
    malformed = await _post(client, f"/subjects/{name}/versions", {"schemaType": "AVRO"})
    assert (malformed.status_code, malformed.json()["error_code"]) == (422, 422)
    verbose = await _post(
        client,
        f"/compatibility/subjects/{name}/versions/latest?verbose=true",
        {"schema": record("A", "x", "y")},
    )
    assert verbose.json()["is_compatible"] is False
    assert verbose.json()["messages"]
    assert (await client.get("/registry/schemas/types")).json() == ["AVRO", "PROTOBUF", "JSON"]
    # What the framework answers itself (no such path or method, a body that is no JSON)
    # carries an integer code too: Confluent's clients read error_code as one.
    unknown = await client.get("/registry/no/such/path")
    not_allowed = await client.delete("/registry/schemas/types")
    garbled = await client.post(
        f"/registry/subjects/{name}/versions", content=b"{", headers={"content-type": MEDIA}
    )
    plain = await client.post(
        f"/registry/subjects/{name}/versions",
        content=b'{"schema": "x"',
        headers={"content-type": "application/json"},
    )
    for answer, status in ((unknown, 404), (not_allowed, 405), (garbled, 422), (plain, 422)):
        assert answer.headers["content-type"].startswith(MEDIA), answer.text
        assert answer.status_code == status, answer.text
        assert answer.json()["error_code"] == status, answer.text


async def _replay(client: httpx.AsyncClient, topic: str) -> list[dict[str, Any]]:
    answer = await client.get(
        "/v1/streams/MESSAGES/messages", params={"subject": topic, "decode": "json"}
    )
    assert answer.status_code == 200, answer.text
    return [orjson.loads(line) for line in answer.content.splitlines()]


async def _publish(client: httpx.AsyncClient, topic: str, body: bytes, content_type: str) -> None:
    answer = await client.post(
        f"/v1/publish/{topic}", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 200, answer.text


async def test_avro_and_json_from_confluent_serializers_replay_decoded(
    client: httpx.AsyncClient, confluent: SchemaRegistryClient
) -> None:
    """Confluent's serializers register and frame; replay decodes with the writer's schema."""
    topic = f"orders{uuid.uuid4().hex[:6]}"
    order = {"id": "o-1", "sku": "kb-42", "qty": 3, "price": 9.5, "blob": b"\x00\xff"}
    avro_schema = orjson.dumps(
        {
            "type": "record",
            "name": "Order",
            "fields": [
                {"name": "id", "type": "string"},
                {"name": "sku", "type": "string"},
                {"name": "qty", "type": "int"},
                {"name": "price", "type": "double"},
                {"name": "blob", "type": "bytes"},
            ],
        }
    ).decode()
    context = SerializationContext(topic, MessageField.VALUE)
    framed = AvroSerializer(confluent, avro_schema)(order, context)
    await _publish(client, topic, framed, "application/avro")
    json_schema = '{"type": "object", "properties": {"id": {"type": "string"}}}'
    # Another registry subject for the JSON schema: one subject holds one schema type.
    json_context = SerializationContext(f"{topic}-json", MessageField.VALUE)
    serialize_json = JSONSerializer(json_schema, confluent)
    await _publish(client, topic, serialize_json({"id": "o-2"}, json_context), "application/json")
    avro_record, json_record = await _replay(client, topic)
    assert avro_record["headers"]["Broker-Schema-Id"] == str(int.from_bytes(framed[1:5], "big"))
    assert avro_record["value"] == {**order, "blob": base64.b64encode(b"\x00\xff").decode()}
    assert json_record["value"] == {"id": "o-2"}
    # What was stored is what was sent: Confluent's deserializer reads it back unchanged.
    stored = base64.b64decode(avro_record["payload_base64"])
    assert AvroDeserializer(confluent)(stored, context) == order


async def test_protobuf_in_the_wire_format_replays_decoded(
    client: httpx.AsyncClient, confluent: SchemaRegistryClient
) -> None:
    topic = f"scans{uuid.uuid4().hex[:6]}"
    proto = (
        'syntax = "proto3";\npackage lab;\n'
        "message Header { string device = 1; }\n"
        "message Scan { Header header = 1; repeated float points = 2; int32 count = 3; }\n"
    )
    schema_id = confluent.register_schema(f"{topic}-value", Schema(proto, "PROTOBUF"))
    parsed = parse_schema(SchemaType.PROTOBUF, proto)
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(parsed.file_descriptor_set).file:
        pool.Add(file)
    scan_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("lab.Scan"))
    scan = scan_class(header={"device": "lidar-7"}, points=[1.5, 2.5], count=2)
    # Confluent framing: magic byte, schema id, message indexes ([1]: the second message).
    framed = b"\x00" + schema_id.to_bytes(4, "big") + b"\x02\x02" + scan.SerializeToString()
    await _publish(client, topic, framed, "application/x-protobuf")
    await _publish(
        client,
        topic,
        b"\x00" + schema_id.to_bytes(4, "big") + b"\x02\x02\xff",
        "application/x-protobuf",
    )
    good, broken = await _replay(client, topic)
    assert good["value"] == {"header": {"device": "lidar-7"}, "points": [1.5, 2.5], "count": 2}
    assert "value" not in broken
    assert broken["decode_error"].startswith("protobuf payload could not be decoded")


async def test_hostile_and_unknown_payloads_replay_with_their_error(
    client: httpx.AsyncClient, confluent: SchemaRegistryClient
) -> None:
    """An Avro array<null> claiming 2**60 items, an unknown schema id, nested JSON: each
    comes back with a decode error, quickly, and the records after them still come back."""
    topic = f"hostile{uuid.uuid4().hex[:6]}"
    nulls = confluent.register_schema(
        f"{topic}-value", Schema('{"type": "array", "items": "null"}', "AVRO")
    )
    zigzag_2_60 = b"\x80\x80\x80\x80\x80\x80\x80\x80\x20"
    await _publish(
        client, topic, b"\x00" + nulls.to_bytes(4, "big") + zigzag_2_60, "application/avro"
    )
    await _publish(client, topic, b"\x00\x7f\xff\xff\xf0" + b"\x02", "application/avro")
    await _publish(client, topic, b"[" * 5000 + b"]" * 5000, "application/json")
    binary_keys = msgpack.packb({b"\xff": 1}, use_bin_type=True)
    await _publish(client, topic, binary_keys, "application/msgpack")
    await _publish(client, topic, b'{"ok": true}', "application/json")
    records = await _replay(client, topic)
    assert [("value" in r, "decode_error" in r) for r in records] == [
        (False, True),
        (False, True),
        (False, True),
        (False, True),
        (True, False),
    ]
    assert "not in the registry" in records[1]["decode_error"]
    assert "no JSON form" in records[3]["decode_error"]
    assert records[4]["value"] == {"ok": True}


def test_ids_are_the_same_after_a_broker_restart(tmp_path: Path, module_nats: NatsServer) -> None:
    """The registry is rebuilt from SCHEMAS by the new process: same ids, versions, levels."""
    first = start_broker(
        tmp_path / "a", nats_url=module_nats.url, args=("--projection-workers", "0")
    )
    name = subject()
    try:
        client = SchemaRegistryClient({"url": f"{first.base_url}/registry"})
        ids = [
            client.register_schema(name, Schema(record("R", *fields, default=True), "AVRO"))
            for fields in (["a"], ["a", "b"])
        ]
        client.set_compatibility(name, "FULL")
    finally:
        first.stop()
    second = start_broker(
        tmp_path / "b", nats_url=module_nats.url, args=("--projection-workers", "0")
    )
    try:
        again = SchemaRegistryClient({"url": f"{second.base_url}/registry"})
        assert [again.get_version(name, v).schema_id for v in (1, 2)] == ids
        assert again.get_schema(ids[1]).schema_str == record("R", "a", "b", default=True)
        assert again.get_compatibility(name) == "FULL"
    finally:
        second.stop()
