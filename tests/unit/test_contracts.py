"""Exported contracts stay in step with the code."""

from __future__ import annotations

import pytest

from broker.openapi_export import SCHEMA_PATH, render

pytestmark = pytest.mark.unit


def test_exported_openapi_document_is_current() -> None:
    """Run ``python -m broker.openapi_export`` after changing the API."""
    assert SCHEMA_PATH.read_bytes() == render(), "schemas/openapi.json is stale"


def test_openapi_documents_every_publish_error_as_error_body() -> None:
    import orjson

    document = orjson.loads(render())
    publish = document["paths"]["/v1/publish/{subject}"]["post"]
    for status in ("400", "409", "413", "415", "422", "503"):
        schema = publish["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(document["components"]["schemas"]["ErrorBody"]["required"]) == {
        "error_code",
        "message",
    }
