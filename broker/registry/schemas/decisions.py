"""Schema registry commands as pure decisions: given the state, which event (if any) to append.

A :class:`Decision` carries the event to append and the answer to give once it is stored.
Nothing here does I/O, so the rules (identical re-registration is a no-op, versions only grow,
an incompatible schema is refused, a referenced version cannot be deleted, a permanent
delete needs a soft delete first) are unit-tested without a server. :class:`SchemaCatalog`
parses stored schemas on demand, with their references, and caches them per global id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from broker.envelope import Tenant
from broker.errors import (
    IncompatibleSchema,
    InvalidSchema,
    ReferenceExists,
    SchemaNotFound,
    SchemaRegistryError,
    SubjectNotFound,
    SubjectNotSoftDeleted,
    SubjectSoftDeleted,
    VersionNotSoftDeleted,
    VersionSoftDeleted,
)
from broker.registry.schemas.compatibility import check_compatibility
from broker.registry.schemas.events import (
    CompatibilityChanged,
    SchemaEvent,
    SchemaId,
    SchemaReference,
    SchemaVersionDeleted,
    SchemaVersionRegistered,
)
from broker.registry.schemas.state import (
    LATEST,
    StoredSchema,
    SubjectVersion,
    TenantSchemas,
    parse_version,
)
from broker.registry.schemas.types import (
    CompatibilityLevel,
    InvalidSchemaError,
    ParsedSchema,
    SchemaTooComplexError,
    SchemaType,
    parse_schema,
)

T = TypeVar("T")
MAX_REFERENCE_DEPTH = 16
"""The most references a chain may go through, from a schema to the deepest one it uses."""


@dataclass(frozen=True, slots=True)
class Decision(Generic[T]):
    """The event a command appends (``None``: nothing changes) and what it answers."""

    event: SchemaEvent | None
    answer: T


@dataclass(frozen=True, slots=True)
class SchemaRequest:
    """A schema as a client sends it to register, look up or check."""

    schema_type: SchemaType
    schema: str
    references: tuple[SchemaReference, ...] = ()


class SchemaCatalog:
    """Parsed schemas per global id, references resolved; shared by every command.

    Each parsed schema is kept with its height: the longest chain of references below it
    (``0`` without references). A schema may sit at most :data:`MAX_REFERENCE_DEPTH`
    references above the deepest schema it uses, whether or not those are parsed already.
    """

    def __init__(self) -> None:
        self._parsed: dict[tuple[Tenant, SchemaId], tuple[ParsedSchema, int]] = {}

    def parsed(self, reg: TenantSchemas, tenant: Tenant, stored: StoredSchema) -> ParsedSchema:
        return self._entry(reg, tenant, stored, 0)[0]

    def _entry(
        self, reg: TenantSchemas, tenant: Tenant, stored: StoredSchema, depth: int
    ) -> tuple[ParsedSchema, int]:
        """``stored`` parsed, and its height; ``depth``: how many references above it the
        walk that needs it started."""
        key = (tenant, stored.id)
        if (hit := self._parsed.get(key)) is not None:
            return hit
        # A version that the schema references may have been soft-deleted since.
        refs, height = self._resolve(reg, tenant, stored.references, depth, deleted=True)
        try:
            parsed = parse_schema(stored.schema_type, stored.schema, refs)
        except InvalidSchemaError as e:  # stored once as valid: only a changed parser gets here
            raise SchemaRegistryError(f"stored schema {stored.id} no longer parses: {e}") from e
        self._parsed[key] = (parsed, height)
        return parsed, height

    def resolve(
        self,
        reg: TenantSchemas,
        tenant: Tenant,
        references: Sequence[SchemaReference],
        depth: int = 0,
    ) -> dict[str, ParsedSchema]:
        """Each reference's name → its parsed schema; 42201 when one does not exist, or when
        references nest deeper than :data:`MAX_REFERENCE_DEPTH` below ``depth``."""
        return self._resolve(reg, tenant, references, depth, deleted=False)[0]

    def _resolve(
        self,
        reg: TenantSchemas,
        tenant: Tenant,
        references: Sequence[SchemaReference],
        depth: int,
        *,
        deleted: bool,
    ) -> tuple[dict[str, ParsedSchema], int]:
        """The references parsed, and the height of a schema with them."""
        if references and depth >= MAX_REFERENCE_DEPTH:
            raise _too_deep()
        resolved: dict[str, ParsedSchema] = {}
        height = 0
        for ref in references:
            target = _target(reg, ref, deleted=deleted)
            parsed, below = self._entry(reg, tenant, target.schema, depth + 1)
            resolved[ref.name] = parsed
            height = max(height, below + 1)
        if depth + height > MAX_REFERENCE_DEPTH:
            raise _too_deep()
        return resolved, height

    def parse(self, reg: TenantSchemas, tenant: Tenant, request: SchemaRequest) -> ParsedSchema:
        """The request parsed, its references resolved (pin them first: :func:`pinned`)."""
        refs = self.resolve(reg, tenant, request.references)
        try:
            return parse_schema(request.schema_type, request.schema, refs)
        except InvalidSchemaError as e:
            raise InvalidSchema(f"Invalid schema: {e}") from e

    def same(
        self,
        reg: TenantSchemas,
        tenant: Tenant,
        stored: StoredSchema,
        new: ParsedSchema,
        references: tuple[SchemaReference, ...],
    ) -> bool:
        """Whether ``stored`` is ``new`` (same type, references and canonical form)."""
        if stored.schema_type is not new.schema_type or stored.references != references:
            return False
        return stored.schema == new.text or self.parsed(reg, tenant, stored).canonical == (
            new.canonical
        )

    def compatibility(
        self,
        reg: TenantSchemas,
        tenant: Tenant,
        level: CompatibilityLevel,
        new: ParsedSchema,
        against: Sequence[SubjectVersion],
    ) -> list[str]:
        """Why ``new`` may not follow ``against``; 42201 when that is too much work to tell."""
        existing = [self.parsed(reg, tenant, v.schema) for v in against]
        try:
            return check_compatibility(level, new, existing)
        except SchemaTooComplexError as e:
            raise InvalidSchema(f"Invalid schema: {e}") from e


def _too_deep() -> InvalidSchema:
    return InvalidSchema(f"Invalid schema: references nest deeper than {MAX_REFERENCE_DEPTH}")


def _target(reg: TenantSchemas, ref: SchemaReference, *, deleted: bool) -> SubjectVersion:
    try:
        return reg.version(ref.subject, ref.version, deleted=deleted)
    except SchemaRegistryError:
        raise InvalidSchema(
            f"Invalid schema: reference {ref.name!r} to subject {ref.subject!r} "
            f"version {ref.version} does not exist"
        ) from None


def pinned(reg: TenantSchemas, request: SchemaRequest) -> SchemaRequest:
    """``request`` with each reference to version ``-1`` ("latest") pinned to the version
    that is latest now, as Confluent stores it: the version a schema was registered against
    is the one it keeps, and the one that :func:`delete_version` protects. 42201 when the
    subject has no live version."""
    if all(ref.version != LATEST for ref in request.references):
        return request
    references = tuple(
        SchemaReference(ref.name, ref.subject, _target(reg, ref, deleted=False).version)
        if ref.version == LATEST
        else ref
        for ref in request.references
    )
    return SchemaRequest(request.schema_type, request.schema, references)


def register(
    catalog: SchemaCatalog,
    reg: TenantSchemas,
    tenant: Tenant,
    subject: str,
    request: SchemaRequest,
) -> Decision[SchemaId]:
    """Register ``request`` under ``subject``: its existing id when the subject already has
    it, else a new version (with the schema's existing global id, or the next one)."""
    request = pinned(reg, request)
    new = catalog.parse(reg, tenant, request)
    live = reg.live_versions(subject)
    for v in reversed(live):
        if catalog.same(reg, tenant, v.schema, new, request.references):
            return Decision(None, v.schema.id)
    level = reg.level(subject)
    problems = catalog.compatibility(reg, tenant, level, new, live)
    if problems:
        raise IncompatibleSchema(
            "Schema being registered is incompatible with an earlier schema for subject "
            f'"{subject}" ({level}), details: {problems}'
        )
    schema_id = reg.find(request.schema_type, request.schema, request.references)
    if schema_id is None:
        schema_id = next(
            (
                stored.id
                for stored in reg.schemas.values()
                if catalog.same(reg, tenant, stored, new, request.references)
            ),
            SchemaId(reg.next_id),
        )
    version = max(reg.subjects.get(subject, {}), default=0) + 1
    event = SchemaVersionRegistered(
        tenant,
        subject,
        version,
        schema_id,
        request.schema_type,
        request.schema,
        request.references,
    )
    return Decision(event, schema_id)


def lookup(
    catalog: SchemaCatalog,
    reg: TenantSchemas,
    tenant: Tenant,
    subject: str,
    request: SchemaRequest,
    *,
    deleted: bool = False,
) -> SubjectVersion:
    """The subject version holding ``request``: 40401 without the subject, 40403 without it."""
    versions = reg.versions(subject, deleted=deleted)
    request = pinned(reg, request)
    new = catalog.parse(reg, tenant, request)
    for v in reversed(versions):
        if catalog.same(reg, tenant, v.schema, new, request.references):
            return v
    raise SchemaNotFound("Schema not found")


def check(
    catalog: SchemaCatalog,
    reg: TenantSchemas,
    tenant: Tenant,
    subject: str,
    request: SchemaRequest,
    *,
    version: str | None,
) -> list[str]:
    """Incompatibilities of ``request`` with one version (or, ``version`` ``None``, with what
    the subject's level checks against); an empty list means compatible."""
    new = catalog.parse(reg, tenant, pinned(reg, request))
    level = reg.level(subject)
    if version is None:
        return catalog.compatibility(reg, tenant, level, new, reg.live_versions(subject))
    against = reg.version(subject, version)
    if parse_version(version) is None and level.value.endswith("_TRANSITIVE"):
        return catalog.compatibility(reg, tenant, level, new, reg.live_versions(subject))
    return catalog.compatibility(reg, tenant, level, new, [against])


def _not_referenced(reg: TenantSchemas, subject: str, versions: Sequence[int]) -> None:
    for number in versions:
        if ids := reg.referenced_by(subject, number):
            raise ReferenceExists(
                f"One or more references exist to the schema {{subject={subject}, "
                f"version={number}}}: schema ids {ids}"
            )


def delete_version(
    reg: TenantSchemas, tenant: Tenant, subject: str, spec: str, *, permanent: bool
) -> Decision[int]:
    """Soft-delete one version, or permanently delete a soft-deleted one. ``latest`` is the
    newest live version, as Confluent has it, with or without ``permanent``."""
    target = reg.version(subject, spec, deleted=True)
    if permanent and not target.deleted:
        raise VersionNotSoftDeleted(
            f"Subject '{subject}' Version {target.version} was not deleted first before being "
            "permanently deleted"
        )
    if not permanent and target.deleted:
        raise VersionSoftDeleted(
            f"Subject '{subject}' Version {target.version} was soft deleted. Set "
            "permanent=true to delete permanently"
        )
    _not_referenced(reg, subject, [target.version])
    event = SchemaVersionDeleted(tenant, subject, target.version, permanent)
    return Decision(event, target.version)


def delete_subject(
    reg: TenantSchemas, tenant: Tenant, subject: str, *, permanent: bool
) -> Decision[list[int]]:
    """Soft-delete every live version, or permanently delete a soft-deleted subject."""
    everything = reg.versions(subject, deleted=True)
    live = [v.version for v in everything if not v.deleted]
    if permanent:
        if live:
            raise SubjectNotSoftDeleted(
                f"Subject '{subject}' was not deleted first before being permanently deleted"
            )
        targets = [v.version for v in everything]
    else:
        if not live:
            raise SubjectSoftDeleted(
                f"Subject '{subject}' was soft deleted. Set permanent=true to delete permanently"
            )
        targets = live
    _not_referenced(reg, subject, targets)
    return Decision(SchemaVersionDeleted(tenant, subject, None, permanent), targets)


def set_level(
    reg: TenantSchemas, tenant: Tenant, subject: str | None, level: CompatibilityLevel
) -> Decision[CompatibilityLevel]:
    current = reg.subject_levels.get(subject) if subject is not None else reg.global_level
    if current is level:
        return Decision(None, level)
    return Decision(CompatibilityChanged(tenant, subject, level), level)


def clear_level(reg: TenantSchemas, tenant: Tenant, subject: str) -> Decision[CompatibilityLevel]:
    """Remove a subject's own level; answers the level it had (40401 if it had none)."""
    current = reg.subject_levels.get(subject)
    if current is None:
        raise SubjectNotFound(f"Subject '{subject}' not found.")
    return Decision(CompatibilityChanged(tenant, subject, None), current)
