"""``latest`` over real HTTP: the newest live version, whatever ``deleted`` says, as Confluent
resolves it (``get(subject, -1, returnDeleted)`` skips soft-deleted versions)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

pytestmark = pytest.mark.e2e
MEDIA = "application/vnd.schemaregistry.v1+json"
V1 = '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}'
V2 = (
    '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}, '
    '{"name": "b", "type": "int", "default": 0}]}'
)


async def call(client: httpx.AsyncClient, method: str, path: str, body: Any = None) -> Any:
    """The answer's status and JSON body."""
    content = None if body is None else orjson.dumps(body)
    answer = await client.request(
        method, f"/registry{path}", content=content, headers={"content-type": MEDIA}
    )
    return answer.status_code, answer.json()


async def v1_live_v2_soft_deleted(client: httpx.AsyncClient) -> str:
    name = f"latest.{uuid.uuid4().hex[:8]}"
    for schema in (V1, V2):
        status, body = await call(client, "POST", f"/subjects/{name}/versions", {"schema": schema})
        assert status == 200, body
    assert await call(client, "DELETE", f"/subjects/{name}/versions/2") == (200, 2)
    return name


async def test_latest_is_the_newest_live_version_even_with_deleted(
    client: httpx.AsyncClient,
) -> None:
    name = await v1_live_v2_soft_deleted(client)
    for query in ("", "?deleted=true"):
        status, body = await call(client, "GET", f"/subjects/{name}/versions/latest{query}")
        assert (status, body["version"], body["schema"]) == (200, 1, V1), query
        status, body = await call(client, "GET", f"/subjects/{name}/versions/-1{query}")
        assert (status, body["version"]) == (200, 1), query
        status, body = await call(client, "GET", f"/subjects/{name}/versions/latest/schema{query}")
        assert (status, body) == (200, orjson.loads(V1)), query
    # A soft-deleted version is still there by its number, with deleted=true.
    status, body = await call(client, "GET", f"/subjects/{name}/versions/2?deleted=true")
    assert (status, body["version"], body["schema"]) == (200, 2, V2)
    status, body = await call(client, "GET", f"/subjects/{name}/versions/2")
    assert (status, body["error_code"]) == (404, 40402)


async def test_deleting_latest_soft_deletes_the_newest_live_version(
    client: httpx.AsyncClient,
) -> None:
    name = await v1_live_v2_soft_deleted(client)
    assert await call(client, "DELETE", f"/subjects/{name}/versions/latest") == (200, 1)
    assert await call(client, "GET", f"/subjects/{name}/versions?deleted=true") == (200, [1, 2])
    # Every version soft-deleted: no live subject without deleted, no latest version with it.
    status, body = await call(client, "GET", f"/subjects/{name}/versions/latest")
    assert (status, body["error_code"]) == (404, 40401)
    status, body = await call(client, "GET", f"/subjects/{name}/versions/latest?deleted=true")
    assert (status, body["error_code"]) == (404, 40402)
    status, body = await call(client, "DELETE", f"/subjects/{name}/versions/latest")
    assert (status, body["error_code"]) == (404, 40402)
    # The soft-deleted versions themselves still go for good by number.
    assert await call(client, "DELETE", f"/subjects/{name}/versions/2?permanent=true") == (200, 2)


async def test_permanently_deleting_latest_names_the_newest_live_version(
    client: httpx.AsyncClient,
) -> None:
    """As in Confluent, ``latest`` is live, so it must be soft-deleted first (40407)."""
    name = await v1_live_v2_soft_deleted(client)
    status, body = await call(client, "DELETE", f"/subjects/{name}/versions/latest?permanent=true")
    assert status == 404, body
    assert body["error_code"] == 40407
    assert "Version 1 " in body["message"]
