"""The schema registry over real HTTP, where a review found it parted from Confluent: enum
fields turned into plain varints, and an unknown ``schemaType``."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

pytestmark = pytest.mark.e2e
MEDIA = "application/vnd.schemaregistry.v1+json"
LONG_RECORD = orjson.dumps(
    {"type": "record", "name": "Reading", "fields": [{"name": "at", "type": "long"}]}
).decode()


def subject() -> str:
    return f"checks.{uuid.uuid4().hex[:8]}"


def proto(field_type: str) -> str:
    return (
        'syntax = "proto3";\npackage lab;\n'
        f"message Probe {{ {field_type} state = 1; }}\n"
        "enum State { IDLE = 0; BUSY = 1; }\n"
    )


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any = None
) -> httpx.Response:
    content = None if body is None else orjson.dumps(body)
    return await client.request(
        method, f"/registry{path}", content=content, headers={"content-type": MEDIA}
    )


async def register(client: httpx.AsyncClient, name: str, body: dict[str, Any]) -> httpx.Response:
    return await call(client, "POST", f"/subjects/{name}/versions", body)


@pytest.mark.parametrize(("old", "new"), [("State", "int32"), ("int32", "State"),
                                          ("State", "uint64"), ("bool", "State")])  # fmt: skip
async def test_a_field_turned_between_enum_and_a_varint_integer_registers_as_compatible(
    client: httpx.AsyncClient, old: str, new: str
) -> None:
    """Confluent groups enums with int32/int64/uint32/uint64/bool (one varint on the wire)."""
    name = subject()
    first = await register(client, name, {"schema": proto(old), "schemaType": "PROTOBUF"})
    assert first.status_code == 200, first.text
    check = await call(
        client,
        "POST",
        f"/compatibility/subjects/{name}/versions/latest?verbose=true",
        {"schema": proto(new), "schemaType": "PROTOBUF"},
    )
    assert check.json() == {"is_compatible": True, "messages": []}
    second = await register(client, name, {"schema": proto(new), "schemaType": "PROTOBUF"})
    assert second.status_code == 200, second.text
    assert second.json()["id"] != first.json()["id"]


async def test_a_field_turned_from_enum_to_a_zigzag_or_string_type_is_still_refused(
    client: httpx.AsyncClient,
) -> None:
    name = subject()
    first = await register(client, name, {"schema": proto("State"), "schemaType": "PROTOBUF"})
    assert first.status_code == 200, first.text
    for other in ("sint32", "string"):
        refused = await register(client, name, {"schema": proto(other), "schemaType": "PROTOBUF"})
        assert (refused.status_code, refused.json()["error_code"]) == (409, 409), other


async def test_an_unknown_schema_type_is_an_invalid_schema_on_every_schema_endpoint(
    client: httpx.AsyncClient,
) -> None:
    """Confluent answers ``Invalid schema type XML`` as 422 with error code 42201."""
    name = subject()
    assert (await register(client, name, {"schema": LONG_RECORD})).status_code == 200
    body = {"schema": "<order/>", "schemaType": "XML"}
    for method, path in [
        ("POST", f"/subjects/{name}/versions"),
        ("POST", f"/subjects/{name}"),
        ("POST", f"/compatibility/subjects/{name}/versions/latest"),
        ("POST", f"/compatibility/subjects/{name}/versions"),
    ]:
        answer = await call(client, method, path, body)
        assert answer.status_code == 422, path
        assert answer.json() == {"error_code": 42201, "message": "Invalid schema type XML"}, path
    assert (await call(client, "GET", f"/subjects/{name}/versions")).json() == [1]
