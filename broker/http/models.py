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


class RouteCandidateBody(BaseModel):
    """One ranked candidate of a routing decision."""

    agent: str
    capability: str
    semantic: float = Field(description="Similarity of the message to the capability.")
    load: float = Field(description="Load weight in [0, 1] after penalties.")
    score: float = Field(description="The combined score candidates are ranked by.")
    penalties: list[str] = Field(description="e.g. qps_over_80pct, p99_over_200ms, cooldown.")
    load_inputs: dict[str, Any] | None = Field(
        default=None, description="The live load the score was computed from."
    )


class RouteDecisionBody(BaseModel):
    """A routing decision, as stored in the Broker-Route header of RouteDecided."""

    agent: str | None = Field(description="The chosen agent; null: nobody qualified (DLQ).")
    capability: str | None
    reason: str = Field(examples=["scored", "fallback", "no_candidate", "below_threshold"])
    detail: str = Field(description="Why, in words.")
    candidates: list[RouteCandidateBody]
    policy_version: str
    mirror_to: str | None = None
    tenant: str
    message_seq: int
    message_subject: str
    attempt: int
    tried: list[str]
    mirror: bool
    decided_at: str
    route_stream: str = Field(description="ROUTES, or DLQ when nobody qualified.")
    route_seq: int = Field(description="Sequence of the stored decision in route_stream.")


class RouteResponseBody(PublishAckBody):
    """Where a routed message was stored and the router's decision."""

    subject: str
    decision: RouteDecisionBody | None = Field(
        description="null when the idempotency key was already routed (duplicate) or when "
        "no router decided in time (status 202: stored, routed when a router runs)."
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


class ReplayRecord(BaseModel):
    """One line of a replay (``GET /v1/streams/{stream}/messages``): a stored message."""

    stream: str
    seq: int = Field(ge=1)
    subject: str
    time: str | None = Field(description="When the stream stored it (ISO 8601, UTC).")
    headers: dict[str, str]
    payload_base64: str
    value: Any = Field(default=None, description="With decode=json: the decoded payload.")
    decode_error: str | None = Field(
        default=None, description="With decode=json: why the payload could not be decoded."
    )


class BatchResponse(BaseModel):
    results: list[RecordResult]


class Health(BaseModel):
    status: str = "ok"


class ReadinessBody(BaseModel):
    """``ready``: this ingress can append (NATS connected and answering, every stream
    present, the registry caught up). A 503 also carries ``error_code`` and ``message``."""

    ready: bool
    nats_connected: bool
    missing_streams: list[str]
    registry_ready: bool = Field(description="The registry snapshot has caught up with the stream.")
    routers_live: bool | None = Field(
        description="A router process (`broker router`, on any machine) was waiting for work "
        "within the last 3 s; null when NATS did not say. Not part of `ready`: without a "
        "router, `POST /v1/route` stores messages but nobody decides them."
    )
    error_code: str | None = Field(
        default=None, description="Only when not ready: `nats_unavailable` or `not_ready`."
    )
    message: str | None = Field(default=None, description="Only when not ready: why.")


class VersionBody(BaseModel):
    version: str
    git_revision: str
    nats_server_version: str | None
    python: str
