"""Pydantic models of the HTTP API: they document the wire format in the OpenAPI document.

The hot publish paths encode their answers with orjson directly; these models describe
exactly those shapes (a test checks real answers against them).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error_code: str = Field(description="Stable machine-readable code, e.g. invalid_subject.")
    message: str = Field(description="What went wrong, for a person.")


class PublishAckBody(BaseModel):
    """Where a message was appended."""

    stream: str = Field(examples=["MESSAGES"])
    seq: int = Field(ge=1, description="Stream sequence of the stored message.")
    duplicate: bool = Field(
        description="True when an earlier publish with the same idempotency key stored it."
    )


class PublishRecord(BaseModel):
    """One record of a JSON-array or NDJSON batch."""

    model_config = ConfigDict(extra="forbid")

    subject: str | None = Field(
        default=None, description="Client subject; defaults to the ?subject= query parameter."
    )
    data: Any = Field(default=None, description="Any JSON value, stored as compact JSON.")
    data_base64: str | None = Field(default=None, description="Bytes, stored as decoded.")
    content_type: str | None = None
    idempotency_key: str | None = None
    schema_id: int | None = Field(default=None, ge=0, le=2147483647)
    expected_last_subject_sequence: int | None = Field(default=None, ge=0, le=2**64 - 1)


class RecordResult(BaseModel):
    """A record's outcome: an ack, or an error (never both)."""

    stream: str | None = None
    seq: int | None = None
    duplicate: bool | None = None
    error_code: str | None = None
    message: str | None = None


class StreamedRecordResult(RecordResult):
    """One line of a streaming publish answer."""

    index: int = Field(ge=0, description="Position of the record in the request stream.")


class BatchResponse(BaseModel):
    results: list[RecordResult]


class Health(BaseModel):
    status: str = "ok"


class ReadinessBody(BaseModel):
    ready: bool
    nats_connected: bool
    missing_streams: list[str]
    registry_ready: bool = Field(description="The registry snapshot has caught up with the stream.")


class VersionBody(BaseModel):
    version: str
    git_revision: str
    nats_server_version: str | None
    python: str
