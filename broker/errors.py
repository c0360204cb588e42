"""The broker's error tree. Every error a caller can see is one of these.

::

    BrokerError                      500 internal_error
    ├── BadRequest                   400 bad_request
    │   └── InvalidBatch             400 invalid_batch
    ├── Unauthenticated              401 unauthenticated    (no or bad API key / token)
    ├── Forbidden                    403 forbidden          (the principal lacks the scope)
    │   └── TenantForbidden          403 tenant_forbidden   (Broker-Tenant it does not hold)
    ├── NotFound                     404 not_found
    ├── RequestTimeout               408 request_timeout    (the body did not arrive in time)
    ├── Conflict                     409 conflict
    │   ├── SequenceConflict         409 sequence_conflict
    │   └── AlreadyRouted            409 already_routed     (no reply stored to repeat)
    ├── PayloadTooLarge              413 payload_too_large
    │   └── StreamFull               413 stream_full        (a publish stream's record cap)
    ├── UnsupportedMediaType         415 unsupported_media_type
    ├── Unprocessable                422 unprocessable
    │   ├── InvalidSubject           422 invalid_subject
    │   └── IdempotencyKeyReused     422 idempotency_key_reused  (the key stored another request)
    ├── Unavailable                  503 nats_unavailable   (retryable, carries Retry-After)
    │   ├── PublishTimeout           503 publish_timeout    (ack unknown: retry with the same key)
    │   └── NoRoute                  503 no_route           (no agent qualifies; in the DLQ)
    ├── AgentFailed                  502 agent_error        (the agents tried all failed)
    ├── DeadlineExceeded             504 deadline_exceeded  (no reply before the deadline)
    ├── SchemaRegistryError          Confluent-compatible answers: ``error_code`` is an int
    │   ├── SubjectNotFound              404 40401
    │   ├── VersionNotFound              404 40402
    │   ├── SchemaNotFound               404 40403
    │   ├── SubjectSoftDeleted           404 40404
    │   ├── SubjectNotSoftDeleted        404 40405
    │   ├── VersionSoftDeleted           404 40406
    │   ├── VersionNotSoftDeleted        404 40407
    │   ├── SubjectConfigNotFound        404 40408
    │   ├── IncompatibleSchema           409 409
    │   ├── InvalidSchema                422 42201
    │   ├── InvalidVersion               422 42202
    │   ├── InvalidCompatibilityLevel    422 42203
    │   ├── ReferenceExists              422 42206
    │   └── SchemaRegistryBusy           503 50002   (retryable: writers kept colliding)
    ├── StreamConfigConflict         500 stream_config_conflict  (start-up, not HTTP)
    ├── EmbeddedServerError          500 embedded_server_error   (start-up, not HTTP)
    ├── InvalidNatsSettings          500 invalid_nats_settings   (start-up; broker.natsconn)
    └── NatsConnectFailed            500 nats_connect_failed     (start-up; broker.natsconn)

Third-party errors (nats-py, orjson, granian) are mapped to these once, at the adapter
that calls the library; they never reach callers as themselves.
"""

from __future__ import annotations

from typing import ClassVar


class BrokerError(Exception):
    """Base of every broker error; carries an HTTP status and a stable ``error_code``."""

    status: ClassVar[int] = 500
    error_code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    #: Response headers every answer of this error carries.
    headers: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        """The JSON body of the HTTP answer."""
        return {"error_code": self.error_code, "message": self.message}


class BadRequest(BrokerError):
    status = 400
    error_code = "bad_request"


class InvalidBatch(BadRequest):
    error_code = "invalid_batch"


class Unauthenticated(BrokerError):
    """No credentials, or credentials that do not check out."""

    status = 401
    error_code = "unauthenticated"
    headers = (("www-authenticate", 'Bearer realm="agent-broker"'),)


class Forbidden(BrokerError):
    """Authenticated, but not allowed this."""

    status = 403
    error_code = "forbidden"


class TenantForbidden(Forbidden):
    error_code = "tenant_forbidden"


class NotFound(BrokerError):
    status = 404
    error_code = "not_found"


class RequestTimeout(BrokerError):
    """The request body did not arrive whole within ``BROKER_BODY_READ_TIMEOUT``."""

    status = 408
    error_code = "request_timeout"


class Conflict(BrokerError):
    status = 409
    error_code = "conflict"


class SequenceConflict(Conflict):
    """The subject's last sequence was not the one the writer expected; nothing was stored."""

    error_code = "sequence_conflict"


class AlreadyRouted(Conflict):
    """A ``wait=true`` route whose idempotency key was stored by a route sent without
    ``wait`` (nobody asked for that one's reply), or by a message no longer stored, and no
    reply is stored to answer with. Its decision is in ``ROUTES``
    (``Broker-Route.message_seq``)."""

    error_code = "already_routed"


class PayloadTooLarge(BrokerError):
    status = 413
    error_code = "payload_too_large"


class StreamFull(PayloadTooLarge):
    """A streaming publish carried as many records as one stream may: the record with this
    index and those after it were not read; send them in a new stream."""

    error_code = "stream_full"


class UnsupportedMediaType(BrokerError):
    status = 415
    error_code = "unsupported_media_type"


class Unprocessable(BrokerError):
    status = 422
    error_code = "unprocessable"


class InvalidSubject(Unprocessable):
    error_code = "invalid_subject"


class IdempotencyKeyReused(Unprocessable):
    """The idempotency key already stored a different request (another subject, media type,
    schema id or body) within the duplicate window; this one was not stored."""

    error_code = "idempotency_key_reused"


class Unavailable(BrokerError):
    """NATS cannot take the write now; the client should retry after ``retry_after`` seconds."""

    status = 503
    error_code = "nats_unavailable"
    retryable = True


class PublishTimeout(Unavailable):
    """No PubAck in time: the write may or may not be stored. Retrying with the same
    idempotency key is safe and answers the original sequence if it was stored."""

    error_code = "publish_timeout"


class NoRoute(Unavailable):
    """No agent qualifies for the message (and there is no fallback); it is in the DLQ."""

    error_code = "no_route"


class AgentFailed(BrokerError):
    """The agent(s) the message was routed to failed to handle it."""

    status = 502
    error_code = "agent_error"


class DeadlineExceeded(BrokerError):
    """No reply came before the request's deadline; the agent was told to stop."""

    status = 504
    error_code = "deadline_exceeded"


class SchemaRegistryError(BrokerError):
    """An answer of the Confluent-compatible schema registry. Its clients read an integer
    ``error_code`` (``registry_code``), so that is what the body carries."""

    registry_code: ClassVar[int] = 50001

    def to_dict(self) -> dict[str, object]:
        return {"error_code": self.registry_code, "message": self.message}


class SubjectNotFound(SchemaRegistryError):
    status, error_code, registry_code = 404, "subject_not_found", 40401


class VersionNotFound(SchemaRegistryError):
    status, error_code, registry_code = 404, "version_not_found", 40402


class SchemaNotFound(SchemaRegistryError):
    status, error_code, registry_code = 404, "schema_not_found", 40403


class SubjectSoftDeleted(SchemaRegistryError):
    status, error_code, registry_code = 404, "subject_soft_deleted", 40404


class SubjectNotSoftDeleted(SchemaRegistryError):
    status, error_code, registry_code = 404, "subject_not_soft_deleted", 40405


class VersionSoftDeleted(SchemaRegistryError):
    status, error_code, registry_code = 404, "version_soft_deleted", 40406


class VersionNotSoftDeleted(SchemaRegistryError):
    status, error_code, registry_code = 404, "version_not_soft_deleted", 40407


class SubjectConfigNotFound(SchemaRegistryError):
    status, error_code, registry_code = 404, "subject_config_not_found", 40408


class IncompatibleSchema(SchemaRegistryError):
    status, error_code, registry_code = 409, "incompatible_schema", 409


class InvalidSchema(SchemaRegistryError):
    status, error_code, registry_code = 422, "invalid_schema", 42201


class InvalidVersion(SchemaRegistryError):
    status, error_code, registry_code = 422, "invalid_version", 42202


class InvalidCompatibilityLevel(SchemaRegistryError):
    status, error_code, registry_code = 422, "invalid_compatibility_level", 42203


class ReferenceExists(SchemaRegistryError):
    status, error_code, registry_code = 422, "reference_exists", 42206


class SchemaRegistryBusy(SchemaRegistryError):
    """Concurrent writers kept taking the registry's next position; retry."""

    status, error_code, registry_code = 503, "schema_registry_busy", 50002
    retryable = True


class StreamConfigConflict(BrokerError):
    """A stream or bucket exists with a configuration the broker would not create."""

    error_code = "stream_config_conflict"


class EmbeddedServerError(BrokerError):
    """The embedded nats-server could not be found, started or made ready."""

    error_code = "embedded_server_error"


def error_class(error_code: str | int, status: int) -> type[BrokerError]:
    """The error class for a server's ``error_code`` (the most specific one known; an int is a
    schema registry code), else the class for its HTTP status: how clients turn an answer
    back into the tree above."""
    by_code: dict[str | int, type[BrokerError]] = {}
    pending: list[type[BrokerError]] = [BrokerError]
    while pending:
        cls = pending.pop()
        by_code.setdefault(cls.error_code, cls)
        if issubclass(cls, SchemaRegistryError):
            by_code.setdefault(cls.registry_code, cls)
        pending.extend(cls.__subclasses__())
    if error_code in by_code:
        return by_code[error_code]
    same_status = [cls for cls in by_code.values() if cls.status == status]
    return min(same_status, key=lambda cls: len(cls.__mro__)) if same_status else BrokerError
