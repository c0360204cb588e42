"""The OpenAPI paths of the raw-ASGI publish handlers, merged into FastAPI's document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from broker.envelope import (
    ACCEPTED_MEDIA_TYPES,
    CLOUDEVENTS_BATCH,
    CLOUDEVENTS_JSON,
    CONTROL_CHARACTERS,
)
from broker.http.models import (
    BatchResponse,
    ErrorBody,
    PublishAckBody,
    PublishRecord,
    ReplayRecord,
    RouteResponseBody,
    StreamedRecordResult,
)
from broker.http.schema_registry import MEDIA_TYPE as REGISTRY_MEDIA_TYPE
from broker.registry.manifest import MODEL_NAME_PATTERN, AgentManifest

_MODELS: tuple[type[BaseModel], ...] = (
    ErrorBody,
    PublishAckBody,
    PublishRecord,
    BatchResponse,
    StreamedRecordResult,
    RouteResponseBody,
    ReplayRecord,
)
_SUBJECT_PATTERN = r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,15}$"


def _ref(model: type[BaseModel] | str) -> dict[str, str]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": f"#/components/schemas/{name}"}


_CONCRETE_MEDIA_TYPES = sorted(
    {m for m in ACCEPTED_MEDIA_TYPES if "*" not in m}
    | {"text/plain", "image/png", "image/jpeg", "audio/wav", "video/mp4"}
)

#: Text stored as a NATS header value: no control characters but tab.
_CONTROL = CONTROL_CHARACTERS[1:-1]
_HEADER_TEXT: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 1024,
    # no control character, and no space or tab at either end (NATS trims header values)
    "pattern": f"^[^{_CONTROL} \\t]([^{_CONTROL}]*[^{_CONTROL} \\t])?$",
}

#: A structured-mode CloudEvent 1.0 as the ingress accepts it.
_CLOUD_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvents 1.0, structured mode. Extension attributes: lower-case "
    "alphanumeric names, string/integer/boolean values; brokersubject names the subject "
    "of an event in a batch.",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"type": "string", "enum": ["1.0"]},
        "id": _HEADER_TEXT,
        "source": _HEADER_TEXT,
        "type": _HEADER_TEXT,
        "datacontenttype": {"type": "string", "enum": _CONCRETE_MEDIA_TYPES},
        "data": {},
        "data_base64": {"type": "string", "format": "byte"},
        "brokersubject": {"type": "string", "pattern": _SUBJECT_PATTERN, "maxLength": 255},
    },
    "propertyNames": {"anyOf": [{"pattern": "^[a-z0-9]{1,20}$"}, {"const": "data_base64"}]},
    "additionalProperties": {
        "anyOf": [
            _HEADER_TEXT,
            {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
            {"type": "boolean"},
        ],
    },
    "not": {"required": ["data", "data_base64"]},
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(ErrorBody)}},
    }


def _registry_error(description: str) -> dict[str, Any]:
    """Confluent's shape: an integer ``error_code`` (40101, 40301)."""
    return {
        "description": description,
        "content": {REGISTRY_MEDIA_TYPE: {"schema": _ref("RegistryErrorBody")}},
    }


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }


_UNAVAILABLE = {
    "description": "NATS unavailable or no ack in time; retry after Retry-After seconds "
    "with the same Idempotency-Key.",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": _ref(ErrorBody)}},
}

_PUBLISH_ONE: dict[str, Any] = {
    "post": {
        "operationId": "publish",
        "summary": "Append one message",
        "description": (
            "Stores the body byte-for-byte in MESSAGES under msg.<tenant>.<subject> and answers "
            "after the JetStream ack. CloudEvents binary mode (ce-* headers) and structured "
            f"mode ({CLOUDEVENTS_JSON}) are accepted; ce-id within ce-source acts as the "
            "idempotency key."
        ),
        "tags": ["publish"],
        "parameters": [
            {
                "name": "subject",
                "in": "path",
                "required": True,
                "description": "Dot-separated tokens of A-Z a-z 0-9 _ -; no wildcards.",
                "schema": {"type": "string", "pattern": _SUBJECT_PATTERN, "maxLength": 255},
            },
            _header(
                "Idempotency-Key",
                "Becomes Nats-Msg-Id (as <tenant>:<key>): a retry within the duplicate "
                "window answers the original sequence with duplicate=true.",
                _HEADER_TEXT,
            ),
            _header(
                "Schema-Id",
                "Schema registry id of the payload (also read from the Confluent wire prefix).",
                {"type": "integer", "minimum": 0, "maximum": 2147483647},
            ),
            _header(
                "Expected-Last-Subject-Sequence",
                "Store only if the subject's last sequence is this (0: subject is empty); "
                "otherwise 409 and nothing is stored.",
                {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
            ),
        ],
        "requestBody": {
            "required": False,
            "description": "The payload, stored byte-for-byte. Also accepted: any subtype "
            "ending in +json, +avro, +protobuf or +xml.",
            "content": {
                media: (
                    {"schema": _ref("CloudEvent")}
                    if media == CLOUDEVENTS_JSON
                    else {"schema": {"type": "string", "format": "binary"}}
                )
                for media in sorted(ACCEPTED_MEDIA_TYPES)
            },
        },
        "responses": {
            "200": {
                "description": "Appended (or already appended with this idempotency key).",
                "content": {"application/json": {"schema": _ref(PublishAckBody)}},
            },
            "400": _error(
                "Malformed request (e.g. a structured CloudEvent that is not JSON), a header "
                "the broker reads with a value that is not visible ASCII, or a body cut short "
                "(shorter than its Content-Length, or broken chunked framing); nothing stored."
            ),
            "408": _error("The body did not arrive in time."),
            "409": _error("Expected-Last-Subject-Sequence did not match; nothing stored."),
            "413": _error("Body larger than the configured limit."),
            "415": _error("Content-Type not accepted."),
            "422": _error(
                "Invalid subject, header or CloudEvent attributes; or idempotency_key_reused: "
                "the Idempotency-Key already stored a different request (nothing stored)."
            ),
            "503": _UNAVAILABLE,
        },
    }
}

_PUBLISH_BATCH: dict[str, Any] = {
    "post": {
        "operationId": "publishBatch",
        "summary": "Append many messages, one result per record",
        "description": (
            "A JSON array or NDJSON of records, or a CloudEvents batch. Acks are pipelined. "
            "Answers 200 when every record was appended, 207 when some failed (each result "
            "is an ack or an error). With an NDJSON body and Accept: application/x-ndjson the "
            "exchange streams over one HTTP/2 request: one ack line per record as it is acked."
        ),
        "tags": ["publish"],
        "parameters": [
            {
                "name": "subject",
                "in": "query",
                "required": False,
                "description": "Subject for records that name none.",
                "schema": {"type": "string", "pattern": _SUBJECT_PATTERN, "maxLength": 255},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array", "items": _ref(PublishRecord)}},
                "application/x-ndjson": {"schema": {"type": "string"}},
                CLOUDEVENTS_BATCH: {"schema": {"type": "array", "items": _ref("CloudEvent")}},
            },
        },
        "responses": {
            "200": {
                "description": "Every record appended (buffered), or the streamed ack lines.",
                "content": {
                    "application/json": {"schema": _ref(BatchResponse)},
                    "application/x-ndjson": {"schema": _ref(StreamedRecordResult)},
                },
            },
            "207": {
                "description": "Some records failed; see each result.",
                "content": {"application/json": {"schema": _ref(BatchResponse)}},
            },
            "400": _error(
                "The batch is not valid JSON or not an array, a header the broker reads has "
                "a value that is not visible ASCII, or the body was cut short; nothing stored."
            ),
            "408": _error("The body did not arrive in time."),
            "413": _error(
                "Batch body or record count over the limit. (A stream instead ends with a "
                "stream_full line after 10 x BROKER_MAX_BATCH_RECORDS records.)"
            ),
            "415": _error("Content-Type is not a batch type."),
            "422": _error("Invalid ?subject=."),
            "503": _UNAVAILABLE,
        },
    }
}


_ROUTE_ONE: dict[str, Any] = {
    "post": {
        "operationId": "route",
        "summary": "Append one message and route it to the best agent",
        "description": (
            "Stores the body like POST /v1/publish/{subject}, then a router scores the "
            "tenant's live agents by capability (Broker-Intent), modality (Content-Type and "
            "magic bytes), meaning (the text, Broker-Text or Broker-Embedding) and live load, "
            "and appends RouteDecided to the chosen agent's inbox route.<tenant>.<agent>. "
            "Without wait the answer is the decision; with wait=true it is the agent's reply."
        ),
        "tags": ["routing"],
        "parameters": [
            _PUBLISH_ONE["post"]["parameters"][0],
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "description": "Answer with the chosen agent's reply instead of the decision.",
                "schema": {"type": "boolean", "default": False},
            },
            {
                "name": "timeout",
                "in": "query",
                "required": False,
                "description": (
                    "Seconds to wait for the reply (the agent's deadline too). With an "
                    "Idempotency-Key, at most the duplicate window less a second (119 by "
                    "default), so that a retry before the deadline is known as one."
                ),
                "schema": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": 300,
                    "default": 30,
                },
            },
            *_PUBLISH_ONE["post"]["parameters"][1:],
            _header(
                "Broker-Intent",
                "The capability action wanted; only capabilities with this action qualify.",
                {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,63}$"},
            ),
            _header(
                "Broker-Text",
                "Text to match by meaning (percent-encoded UTF-8), e.g. a caption for an image.",
                {"type": "string", "maxLength": 32768},
            ),
            _header(
                "Broker-Embedding",
                "The query vector: base64 of little-endian float32, the router's dimension.",
                {"type": "string", "format": "byte", "maxLength": 32768},
            ),
            _header(
                "Broker-Embedding-Model",
                "The model that made Broker-Embedding (e.g. all-MiniLM-L6-v2; ignored without "
                "it): when it is not the router's, the message goes to no agent (decision "
                "reason no_candidate; with wait, 503 no_route) rather than being compared in "
                "another model's space.",
                {"type": "string", "pattern": MODEL_NAME_PATTERN},
            ),
            _header(
                "x-env",
                "canary: route only to agents labelled env=canary (others never get canary "
                "traffic).",
                {"type": "string", "maxLength": 64},
            ),
        ],
        "requestBody": _PUBLISH_ONE["post"]["requestBody"],
        "responses": {
            "200": {
                "description": "Without wait: stored and decided (agent null: nobody qualified, "
                "the message is in the DLQ). With wait: the agent's reply, in its content type, "
                "with Broker-Agent and Broker-Message-Seq headers; sent again with the same "
                "Idempotency-Key, the reply stored for the first request, with "
                "Broker-Duplicate: true.",
                "headers": {
                    "Broker-Agent": {"schema": {"type": "string"}},
                    "Broker-Message-Seq": {"schema": {"type": "integer"}},
                    "Broker-Duplicate": {"schema": {"type": "string", "enum": ["true"]}},
                },
                "content": {
                    "application/json": {"schema": _ref(RouteResponseBody)},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "202": {
                "description": "Stored, but no router decided in time: it is routed when one "
                "runs (decision null).",
                "content": {"application/json": {"schema": _ref(RouteResponseBody)}},
            },
            "409": _error(
                "already_routed: wait=true with the Idempotency-Key of a route sent without "
                "wait, or of a message no longer stored, and no reply is stored to answer "
                "with; or Expected-Last-Subject-Sequence did not match (nothing stored)."
            ),
            "400": _error(
                "Malformed request, a header the broker reads with a value that is not "
                "visible ASCII, or a body cut short; nothing stored."
            ),
            "408": _error("The body did not arrive in time."),
            "413": _error("Body larger than the configured limit."),
            "415": _error("Content-Type not accepted."),
            "422": _error(
                "Invalid subject, wait, timeout or routing header; or idempotency_key_reused: "
                "the Idempotency-Key already stored a different request (nothing stored)."
            ),
            "502": _error("agent_error: the agents tried failed to handle it."),
            "503": {
                **_UNAVAILABLE,
                "description": "no_route: no agent qualifies (the message is in the DLQ); "
                "or NATS unavailable (retry after Retry-After with the same Idempotency-Key).",
            },
            "504": _error(
                "deadline_exceeded: no reply before the timeout (for a request sent again, "
                "before the first one's deadline or this one's timeout)."
            ),
        },
    }
}


_SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "API key or JWT",
        "description": "An API key or a JWT; it binds the request to a tenant and scopes. "
        "`Broker-Tenant` picks one of the credential's tenants (403 `tenant_forbidden` for "
        "any other). Only enforced when the broker runs with an auth file.",
    },
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "basic": {
        "type": "http",
        "scheme": "basic",
        "description": "The API key as the password (what schema registry clients send).",
    },
}


def add_security(document: dict[str, Any], public: frozenset[str]) -> dict[str, Any]:
    """Declare the credentials, and 401/403 on every operation outside ``public``."""
    document.setdefault("components", {})["securitySchemes"] = _SECURITY_SCHEMES
    document["security"] = [{name: []} for name in _SECURITY_SCHEMES]
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            if path in public:
                operation["security"] = []
                continue
            error = _registry_error if path.startswith("/registry/") else _error
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", error("No credentials, or credentials not accepted."))
            responses.setdefault(
                "403", error("The credential lacks the scope, or names another tenant.")
            )
    return document


def add_publish_paths(document: dict[str, Any]) -> dict[str, Any]:
    """Merge the publish and route operations and their schemas into an OpenAPI document."""
    paths = document.setdefault("paths", {})
    paths["/v1/publish/{subject}"] = _PUBLISH_ONE
    paths["/v1/route/{subject}"] = _ROUTE_ONE
    paths["/v1/publish"] = _PUBLISH_BATCH
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["CloudEvent"] = _CLOUD_EVENT
    models: tuple[type[BaseModel], ...] = (*_MODELS, AgentManifest)
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[model.__name__] = schema
    return document
