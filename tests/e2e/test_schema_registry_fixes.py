"""The schema registry over real HTTP, where reviews found it answering unlike Confluent: a
reference to "latest" and what deleting it does, and the fields left out for Avro."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e._broker import BrokerProcess
from tests.e2e._h2duplex import DuplexStream

pytestmark = pytest.mark.e2e
MEDIA = "application/vnd.schemaregistry.v1+json"
INNER = '{"type": "record", "name": "Inner", "fields": [{"name": "a", "type": "int"}]}'
OUTER = '{"type": "record", "name": "Outer", "fields": [{"name": "i", "type": "Inner"}]}'


def subject() -> str:
    return f"fixes.{uuid.uuid4().hex[:8]}"


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any = None
) -> httpx.Response:
    content = None if body is None else orjson.dumps(body)
    return await client.request(
        method, f"/registry{path}", content=content, headers={"content-type": MEDIA}
    )


async def test_a_reference_to_latest_is_pinned_protected_and_its_referrer_stays_readable(
    client: httpx.AsyncClient,
) -> None:
    inner, outer = subject(), subject()
    assert (await call(client, "POST", f"/subjects/{inner}/versions", {"schema": INNER})).is_success
    latest = [{"name": "Inner", "subject": inner, "version": -1}]
    body = {"schema": OUTER, "references": latest}
    registered = await call(client, "POST", f"/subjects/{outer}/versions", body)
    assert registered.status_code == 200, registered.text
    outer_id = registered.json()["id"]
    pinned = [{"name": "Inner", "subject": inner, "version": 1}]
    stored = await call(client, "GET", f"/subjects/{outer}/versions/1")
    assert stored.json()["references"] == pinned
    referrers = await call(client, "GET", f"/subjects/{inner}/versions/1/referencedby")
    assert referrers.json() == [outer_id]
    refused = await call(client, "DELETE", f"/subjects/{inner}/versions/1")
    assert (refused.status_code, refused.json()["error_code"]) == (422, 42206)
    # Once its referrer is soft-deleted the version may go, and the referrer's id still
    # answers with the text it was registered with.
    assert (await call(client, "DELETE", f"/subjects/{outer}")).json() == [1]
    assert (await call(client, "DELETE", f"/subjects/{inner}/versions/1")).is_success
    gone = await call(client, "DELETE", f"/subjects/{inner}/versions/1?permanent=true")
    assert gone.status_code == 200, gone.text
    by_id = await call(client, "GET", f"/schemas/ids/{outer_id}")
    assert by_id.status_code == 200, by_id.text
    assert by_id.json() == {"schema": OUTER, "references": pinned}


async def test_avro_versions_and_lookups_leave_out_schema_type_and_references(
    client: httpx.AsyncClient,
) -> None:
    name = subject()
    created = await call(client, "POST", f"/subjects/{name}/versions", {"schema": INNER})
    expected = {"subject": name, "version": 1, "id": created.json()["id"], "schema": INNER}
    for method, path, body in (
        ("GET", f"/subjects/{name}/versions/1", None),
        ("GET", f"/subjects/{name}/versions/latest", None),
        ("POST", f"/subjects/{name}", {"schema": INNER}),
    ):
        answer = await call(client, method, path, body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == expected, path


def declared_too_large(port: int, method: str, path: str) -> tuple[int | None, Any]:
    """A request declaring a 64 MiB body, none of it sent: the answer's status and JSON."""
    stream = DuplexStream(
        "127.0.0.1",
        port,
        path,
        {"content-type": MEDIA, "content-length": str(64 << 20)},
        method=method,
    )
    try:
        stream.read_until(lambda s: s.ended)
    finally:
        stream.close()
    return stream.status, orjson.loads(stream.body)


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("POST", "/registry/subjects/too.large/versions", 413),
        ("PUT", "/registry/config", 413),
        ("PUT", "/v1/agents/big", "payload_too_large"),
    ],
)
async def test_a_body_over_the_limit_is_413_in_the_shape_of_its_api(
    broker: BrokerProcess, method: str, path: str, code: int | str
) -> None:
    """Refused while FastAPI read the body, it was FastAPI's own 400 with a text code, where
    Confluent's clients expect an integer."""
    status, body = await asyncio.to_thread(declared_too_large, broker.port, method, path)
    assert status == 413
    assert body["error_code"] == code
