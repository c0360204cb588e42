"""The Confluent-compatible schema registry REST API, mounted under ``/registry``.

Thin: each handler parses the request, asks :mod:`broker.registry.schemas` (which decides
and appends events to ``SCHEMAS``) and shapes the answer the way Confluent's clients and
serializers expect: ``application/vnd.schemaregistry.v1+json`` bodies, ``schemaType``
omitted for Avro, integer ``error_code`` values (``40401`` …) on errors.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.errors import InvalidCompatibilityLevel, InvalidSchema
from broker.http.state import IngressState
from broker.registry.schemas import decisions
from broker.registry.schemas.decisions import SchemaRequest
from broker.registry.schemas.events import SchemaReference
from broker.registry.schemas.state import StoredSchema, SubjectVersion
from broker.registry.schemas.types import CompatibilityLevel, SchemaType

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
PREFIX = "/registry"
MAX_SCHEMA_CHARS = 1024 * 1024
_SCHEMA_TYPES = frozenset(t.value for t in SchemaType)


class RegistryJSON(JSONResponse):
    media_type = MEDIA_TYPE


class RegistryErrorBody(BaseModel):
    """A schema registry error, as Confluent's clients read it."""

    error_code: int = Field(examples=[40401], description="Confluent error code.")
    message: str


class Reference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=1024)
    subject: str = Field(min_length=1, max_length=255)
    version: int = Field(
        ge=-1, le=2**31 - 1, description="-1: the subject's latest version, pinned when stored."
    )


class SchemaBody(BaseModel):
    """A schema to register, look up or check. Extra fields of newer clients (``metadata``,
    ``ruleSet``) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    schema_: str = Field(alias="schema", min_length=1, max_length=MAX_SCHEMA_CHARS)
    schemaType: SchemaType = SchemaType.AVRO
    references: list[Reference] = Field(default_factory=list, max_length=256)

    @field_validator("schemaType", mode="before")
    @classmethod
    def _known_type(cls, value: object) -> object:
        """A type no provider has is an invalid schema (422, 42201 ``Invalid schema type X``)
        as Confluent answers it, not a malformed body (422, 422). Not being a ``ValueError``,
        the error leaves pydantic as it is and reaches the registry's error handler."""
        if isinstance(value, str) and value not in _SCHEMA_TYPES:
            raise InvalidSchema(f"Invalid schema type {value}")
        return value

    def request(self) -> SchemaRequest:
        refs = tuple(SchemaReference(r.name, r.subject, r.version) for r in self.references)
        return SchemaRequest(self.schemaType, self.schema_, refs)


class SchemaIdBody(BaseModel):
    id: int


class SchemaByIdBody(BaseModel):
    schema_: str = Field(alias="schema")
    schemaType: SchemaType | None = Field(default=None, description="Absent for AVRO.")
    references: list[Reference] | None = None


class SubjectVersionBody(SchemaByIdBody):
    subject: str
    id: int
    version: int


class SubjectVersionRef(BaseModel):
    subject: str
    version: int


class ConfigBody(BaseModel):
    compatibilityLevel: CompatibilityLevel


class ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    compatibility: str = Field(max_length=64)


class ConfigUpdated(BaseModel):
    compatibility: CompatibilityLevel


class CompatibilityBody(BaseModel):
    is_compatible: bool
    messages: list[str] | None = None


class ModeBody(BaseModel):
    mode: str


Subject = Annotated[
    str, Path(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$", description="Subject.")
]
Version = Annotated[str, Path(max_length=32, description="A version number, `latest` or -1.")]
SchemaIdPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
Deleted = Annotated[bool, Query(description="Include soft-deleted entries.")]
Permanent = Annotated[bool, Query(description="Hard delete (needs a soft delete first).")]


def _schema_fields(stored: StoredSchema) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": stored.schema}
    if stored.schema_type is not SchemaType.AVRO:
        body["schemaType"] = str(stored.schema_type)
    if stored.references:
        body["references"] = [r.to_dict() for r in stored.references]
    return body


def _schema_text(stored: StoredSchema) -> Response:
    """The schema text as stored: JSON for Avro and JSON Schema, ``.proto`` text otherwise."""
    media = "text/plain" if stored.schema_type is SchemaType.PROTOBUF else MEDIA_TYPE
    return Response(stored.schema, media_type=media)


def _version_body(v: SubjectVersion) -> dict[str, Any]:
    return {"subject": v.subject, "version": v.version, "id": v.schema.id} | _schema_fields(
        v.schema
    )


def _level(text: str) -> CompatibilityLevel:
    try:
        return CompatibilityLevel(text.upper())
    except ValueError:
        raise InvalidCompatibilityLevel(
            f"Invalid compatibility level. Valid values are {[str(x) for x in CompatibilityLevel]}"
        ) from None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": RegistryErrorBody} for code in (*codes, 422, 503)}


def schema_registry_router(state: IngressState) -> APIRouter:  # noqa: PLR0915 - one route each
    router = APIRouter(prefix=PREFIX, tags=["schema registry"], default_response_class=RegistryJSON)
    registry = state.schemas

    @router.get("/schemas/types", response_model=list[SchemaType], responses=_errors())
    async def schema_types() -> list[str]:
        """The schema types this registry accepts."""
        return [str(t) for t in SchemaType]

    @router.get("/schemas/ids/{schema_id}", response_model=SchemaByIdBody, responses=_errors(404))
    async def schema_by_id(schema_id: SchemaIdPath) -> RegistryJSON:
        """The schema with a global id (Confluent serializers resolve payload ids here)."""
        stored = await registry.stored(state.tenant, schema_id)
        return RegistryJSON(_schema_fields(stored))

    @router.get(
        "/schemas/ids/{schema_id}/schema",
        response_class=RegistryJSON,
        responses={
            200: {"content": {MEDIA_TYPE: {"schema": {}}, "text/plain": {"schema": {}}}},
            **_errors(404),
        },
    )
    async def schema_text_by_id(schema_id: SchemaIdPath) -> Response:
        """Only the schema text under a global id (JSON for Avro and JSON Schema)."""
        stored = await registry.stored(state.tenant, schema_id)
        return _schema_text(stored)

    @router.get(
        "/schemas/ids/{schema_id}/subjects", response_model=list[str], responses=_errors(404)
    )
    async def subjects_of_id(schema_id: SchemaIdPath, deleted: Deleted = False) -> list[str]:
        """Subjects with a version registered under the id."""
        reg = await registry.read(state.tenant)
        reg.schema(schema_id)
        return sorted({v.subject for v in reg.uses(schema_id, deleted=deleted)})

    @router.get(
        "/schemas/ids/{schema_id}/versions",
        response_model=list[SubjectVersionRef],
        responses=_errors(404),
    )
    async def versions_of_id(
        schema_id: SchemaIdPath, deleted: Deleted = False
    ) -> list[dict[str, Any]]:
        """Subject versions registered under the id."""
        reg = await registry.read(state.tenant)
        reg.schema(schema_id)
        return [
            {"subject": v.subject, "version": v.version}
            for v in reg.uses(schema_id, deleted=deleted)
        ]

    @router.get("/subjects", response_model=list[str], responses=_errors())
    async def subjects(
        deleted: Deleted = False,
        subjectPrefix: Annotated[str, Query(max_length=255)] = "",
    ) -> list[str]:
        """Every subject with a live version (or any version, with ``deleted``)."""
        reg = await registry.read(state.tenant)
        return reg.subject_names(deleted=deleted, prefix=subjectPrefix)

    @router.get("/subjects/{subject}/versions", response_model=list[int], responses=_errors(404))
    async def subject_versions(subject: Subject, deleted: Deleted = False) -> list[int]:
        """The subject's version numbers, oldest first."""
        reg = await registry.read(state.tenant)
        return [v.version for v in reg.versions(subject, deleted=deleted)]

    @router.post(
        "/subjects/{subject}/versions",
        response_model=SchemaIdBody,
        responses=_errors(409),
    )
    async def register(
        subject: Subject,
        body: Annotated[SchemaBody, Body()],
        normalize: bool = False,
    ) -> dict[str, int]:
        """Register a schema under a subject; answers the existing id for an identical one."""
        request = body.request()
        tenant = state.tenant
        schema_id = await registry.execute(
            tenant,
            lambda reg: decisions.register(registry.catalog, reg, tenant, subject, request),
        )
        return {"id": schema_id}

    @router.post(
        "/subjects/{subject}",
        response_model=SubjectVersionBody,
        response_model_exclude_none=True,
        responses=_errors(404),
    )
    async def lookup(
        subject: Subject,
        body: Annotated[SchemaBody, Body()],
        deleted: Deleted = False,
        normalize: bool = False,
    ) -> dict[str, Any]:
        """The version of the subject that holds this schema (40403 when none does)."""
        reg = await registry.read(state.tenant)
        found = decisions.lookup(
            registry.catalog, reg, state.tenant, subject, body.request(), deleted=deleted
        )
        return _version_body(found)

    @router.delete("/subjects/{subject}", response_model=list[int], responses=_errors(404))
    async def delete_subject(subject: Subject, permanent: Permanent = False) -> list[int]:
        """Soft-delete every version of a subject; with ``permanent``, remove a soft-deleted
        subject for good. Answers the versions deleted."""
        tenant = state.tenant
        return await registry.execute(
            tenant, lambda reg: decisions.delete_subject(reg, tenant, subject, permanent=permanent)
        )

    @router.get(
        "/subjects/{subject}/versions/{version}",
        response_model=SubjectVersionBody,
        response_model_exclude_none=True,
        responses=_errors(404),
    )
    async def get_version(subject: Subject, version: Version, deleted: Deleted = False) -> Any:
        """One version of a subject (``latest`` for the newest)."""
        reg = await registry.read(state.tenant)
        return _version_body(reg.version(subject, version, deleted=deleted))

    @router.get(
        "/subjects/{subject}/versions/{version}/schema",
        response_class=RegistryJSON,
        responses={
            200: {"content": {MEDIA_TYPE: {"schema": {}}, "text/plain": {"schema": {}}}},
            **_errors(404),
        },
    )
    async def get_version_schema(
        subject: Subject, version: Version, deleted: Deleted = False
    ) -> Response:
        """Only the schema text of a version (JSON for Avro and JSON Schema)."""
        reg = await registry.read(state.tenant)
        return _schema_text(reg.version(subject, version, deleted=deleted).schema)

    @router.get(
        "/subjects/{subject}/versions/{version}/referencedby",
        response_model=list[int],
        responses=_errors(404),
    )
    async def referenced_by(subject: Subject, version: Version) -> list[int]:
        """Ids of schemas that reference this version."""
        reg = await registry.read(state.tenant)
        found = reg.version(subject, version)
        return list(reg.referenced_by(subject, found.version))

    @router.delete(
        "/subjects/{subject}/versions/{version}", response_model=int, responses=_errors(404)
    )
    async def delete_version(
        subject: Subject, version: Version, permanent: Permanent = False
    ) -> int:
        """Soft-delete one version; with ``permanent``, remove a soft-deleted one for good."""
        tenant = state.tenant
        return await registry.execute(
            tenant,
            lambda reg: decisions.delete_version(
                reg, tenant, subject, version, permanent=permanent
            ),
        )

    async def _check(
        subject: str, version: str | None, body: SchemaBody, verbose: bool
    ) -> dict[str, Any]:
        reg = await registry.read(state.tenant)
        problems = decisions.check(
            registry.catalog, reg, state.tenant, subject, body.request(), version=version
        )
        answer: dict[str, Any] = {"is_compatible": not problems}
        if verbose:
            answer["messages"] = problems
        return answer

    @router.post(
        "/compatibility/subjects/{subject}/versions/{version}",
        response_model=CompatibilityBody,
        response_model_exclude_none=True,
        responses=_errors(404),
    )
    async def compatibility_with_version(
        subject: Subject,
        version: Version,
        body: Annotated[SchemaBody, Body()],
        verbose: bool = False,
    ) -> dict[str, Any]:
        """Whether the schema is compatible with one version under the subject's level."""
        return await _check(subject, version, body, verbose)

    @router.post(
        "/compatibility/subjects/{subject}/versions",
        response_model=CompatibilityBody,
        response_model_exclude_none=True,
        responses=_errors(),
    )
    async def compatibility(
        subject: Subject, body: Annotated[SchemaBody, Body()], verbose: bool = False
    ) -> dict[str, Any]:
        """Whether the schema could be registered under the subject now."""
        return await _check(subject, None, body, verbose)

    @router.get("/config", response_model=ConfigBody, responses=_errors())
    async def get_global_config() -> dict[str, str]:
        """The global compatibility level (BACKWARD unless set)."""
        reg = await registry.read(state.tenant)
        return {"compatibilityLevel": str(reg.level())}

    @router.put("/config", response_model=ConfigUpdated, responses=_errors())
    async def put_global_config(body: Annotated[ConfigUpdate, Body()]) -> dict[str, str]:
        """Set the global compatibility level."""
        level, tenant = _level(body.compatibility), state.tenant
        done = await registry.execute(
            tenant, lambda reg: decisions.set_level(reg, tenant, None, level)
        )
        return {"compatibility": str(done)}

    @router.get("/config/{subject}", response_model=ConfigBody, responses=_errors(404))
    async def get_subject_config(
        subject: Subject,
        defaultToGlobal: bool = False,
    ) -> dict[str, str]:
        """The subject's own level (40408 when it has none, unless ``defaultToGlobal``)."""
        reg = await registry.read(state.tenant)
        level = reg.subject_level(subject, default_to_global=defaultToGlobal)
        return {"compatibilityLevel": str(level)}

    @router.put("/config/{subject}", response_model=ConfigUpdated, responses=_errors())
    async def put_subject_config(
        subject: Subject, body: Annotated[ConfigUpdate, Body()]
    ) -> dict[str, str]:
        """Set the subject's own compatibility level."""
        level, tenant = _level(body.compatibility), state.tenant
        done = await registry.execute(
            tenant, lambda reg: decisions.set_level(reg, tenant, subject, level)
        )
        return {"compatibility": str(done)}

    @router.delete("/config/{subject}", response_model=ConfigBody, responses=_errors(404))
    async def delete_subject_config(subject: Subject) -> dict[str, str]:
        """Remove the subject's own level (it follows the global one again)."""
        tenant = state.tenant
        previous = await registry.execute(
            tenant, lambda reg: decisions.clear_level(reg, tenant, subject)
        )
        return {"compatibilityLevel": str(previous)}

    @router.get("/mode", response_model=ModeBody, responses=_errors())
    async def mode() -> dict[str, str]:
        """The registry's mode: always READWRITE."""
        return {"mode": "READWRITE"}

    return router
