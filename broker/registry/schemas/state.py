"""The schema registry as a projection: the fold of ``SCHEMAS`` events, and its queries.

:class:`SchemaRegistryState` is plain, synchronous Python: :meth:`~SchemaRegistryState.apply`
folds one event in, the query methods answer what the REST API asks or raise the registry's
own errors (``40401`` …). Nothing here touches NATS; :mod:`.service` feeds it events and
:mod:`.decisions` decides which event a command appends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from broker.envelope import Tenant
from broker.errors import (
    InvalidVersion,
    SchemaNotFound,
    SubjectConfigNotFound,
    SubjectNotFound,
    VersionNotFound,
)
from broker.registry.schemas.events import (
    SchemaEvent,
    SchemaId,
    SchemaReference,
    SchemaVersionDeleted,
    SchemaVersionRegistered,
)
from broker.registry.schemas.types import CompatibilityLevel, SchemaType

DEFAULT_LEVEL = CompatibilityLevel.BACKWARD
LATEST = -1
"""A reference's version meaning "the subject's latest", pinned to a number when registered."""
_MAX_VERSION = 2**31 - 1


@dataclass(frozen=True, slots=True)
class StoredSchema:
    """A schema under its global id (the same for every subject that registered it)."""

    id: SchemaId
    schema_type: SchemaType
    schema: str
    references: tuple[SchemaReference, ...]


@dataclass(frozen=True, slots=True)
class SubjectVersion:
    subject: str
    version: int
    schema: StoredSchema
    deleted: bool = False
    seq: int = 0


def parse_version(spec: str | int) -> int | None:
    """A version from a path: a positive int, or ``None`` for ``latest`` / ``-1``."""
    text = str(spec).strip()
    if text in {"latest", "-1"}:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _MAX_VERSION:
        raise InvalidVersion(
            f"The specified version '{str(spec)[:32]}' is not a valid version id. Allowed "
            'values are between [1, 2^31-1] and the string "latest"'
        )
    return int(text)


@dataclass
class TenantSchemas:
    """One tenant's registry: global ids, subjects with their versions, compatibility."""

    schemas: dict[SchemaId, StoredSchema] = field(default_factory=dict)
    subjects: dict[str, dict[int, SubjectVersion]] = field(default_factory=dict)
    subject_levels: dict[str, CompatibilityLevel] = field(default_factory=dict)
    global_level: CompatibilityLevel | None = None
    next_id: int = 1

    # --- folding ------------------------------------------------------------------------
    def apply(self, event: SchemaEvent) -> None:
        if isinstance(event, SchemaVersionRegistered):
            references = self._pinned(event.references)
            stored = self.schemas.setdefault(
                event.schema_id,
                StoredSchema(event.schema_id, event.schema_type, event.schema, references),
            )
            versions = self.subjects.setdefault(event.subject, {})
            versions[event.version] = SubjectVersion(
                event.subject, event.version, stored, seq=event.seq
            )
            self.next_id = max(self.next_id, event.schema_id + 1)
        elif isinstance(event, SchemaVersionDeleted):
            self._delete(event)
        elif event.subject is None:
            self.global_level = event.level
        elif event.level is None:
            self.subject_levels.pop(event.subject, None)
        else:
            self.subject_levels[event.subject] = event.level

    def _pinned(self, references: tuple[SchemaReference, ...]) -> tuple[SchemaReference, ...]:
        """Upcasts references stored before versions were pinned at registration: ``-1``
        meant the subject's latest live version, which is the latest one at this point of
        the fold, since every write is decided on the state right before it."""
        if all(ref.version != LATEST for ref in references):
            return references
        return tuple(
            SchemaReference(ref.name, ref.subject, live[-1].version)
            if ref.version == LATEST and (live := self.live_versions(ref.subject))
            else ref
            for ref in references
        )

    def _delete(self, event: SchemaVersionDeleted) -> None:
        versions = self.subjects.get(event.subject, {})
        targets = [event.version] if event.version is not None else list(versions)
        for number in targets:
            current = versions.get(number)
            if current is None:
                continue
            if event.permanent:
                if current.deleted or event.version is not None:
                    del versions[number]
            elif not current.deleted:
                versions[number] = SubjectVersion(
                    current.subject, number, current.schema, deleted=True, seq=event.seq
                )
        if not versions:
            self.subjects.pop(event.subject, None)

    # --- queries ------------------------------------------------------------------------
    def level(self, subject: str | None = None) -> CompatibilityLevel:
        """The level that governs ``subject`` (its own, else the global one)."""
        if subject is not None and subject in self.subject_levels:
            return self.subject_levels[subject]
        return self.global_level or DEFAULT_LEVEL

    def subject_level(self, subject: str, *, default_to_global: bool) -> CompatibilityLevel:
        if subject in self.subject_levels:
            return self.subject_levels[subject]
        if default_to_global:
            return self.level()
        raise SubjectConfigNotFound(
            f"Subject '{subject}' does not have subject-level compatibility configured"
        )

    def subject_names(self, *, deleted: bool = False, prefix: str = "") -> list[str]:
        return sorted(
            name
            for name, versions in self.subjects.items()
            if name.startswith(prefix) and any(deleted or not v.deleted for v in versions.values())
        )

    def versions(self, subject: str, *, deleted: bool = False) -> list[SubjectVersion]:
        """The subject's versions, oldest first; 40401 when it has none (live ones, unless
        ``deleted``)."""
        found = [
            v for _, v in sorted(self.subjects.get(subject, {}).items()) if deleted or not v.deleted
        ]
        if not found:
            raise SubjectNotFound(f"Subject '{subject}' not found.")
        return found

    def live_versions(self, subject: str) -> list[SubjectVersion]:
        return [v for _, v in sorted(self.subjects.get(subject, {}).items()) if not v.deleted]

    def version(self, subject: str, spec: str | int, *, deleted: bool = False) -> SubjectVersion:
        """One version by number (a soft-deleted one too, with ``deleted``), or ``latest`` /
        ``-1``: the newest live version whatever ``deleted`` says, as Confluent resolves it.

        40401 when the subject has no version (no live one, unless ``deleted``); 40402 when
        the number is not among them, or for ``latest`` when every version is soft-deleted.
        """
        number = parse_version(spec)
        versions = self.versions(subject, deleted=deleted)
        if number is None:
            live = [v for v in versions if not v.deleted]
            if not live:
                raise VersionNotFound(f"Version {LATEST} not found.")
            return live[-1]
        for v in versions:
            if v.version == number:
                return v
        raise VersionNotFound(f"Version {number} not found.")

    def schema(self, schema_id: int) -> StoredSchema:
        """The schema under a global id while any subject version (even a soft-deleted one)
        still refers to it, else 40403."""
        stored = self.schemas.get(SchemaId(schema_id))
        if stored is None or not any(True for _ in self.uses(schema_id, deleted=True)):
            raise SchemaNotFound(f"Schema {schema_id} not found")
        return stored

    def uses(self, schema_id: int, *, deleted: bool = False) -> Iterator[SubjectVersion]:
        """Every subject version registered with ``schema_id``."""
        for _, versions in sorted(self.subjects.items()):
            for _, v in sorted(versions.items()):
                if v.schema.id == schema_id and (deleted or not v.deleted):
                    yield v

    def referenced_by(self, subject: str, version: int) -> list[SchemaId]:
        """Ids of live schemas that reference ``subject`` version ``version``."""
        ids = {
            v.schema.id
            for versions in self.subjects.values()
            for v in versions.values()
            if not v.deleted
            and any(r.subject == subject and r.version == version for r in v.schema.references)
        }
        return sorted(ids)

    def find(
        self, schema_type: SchemaType, schema: str, references: tuple[SchemaReference, ...]
    ) -> SchemaId | None:
        """The id of a schema with exactly this text and these references, if any."""
        for stored in self.schemas.values():
            if (
                stored.schema == schema
                and stored.schema_type is schema_type
                and stored.references == references
            ):
                return stored.id
        return None


@dataclass
class SchemaRegistryState:
    """Every tenant's registry after the events up to ``last_seq``."""

    last_seq: int = 0
    tenants: dict[Tenant, TenantSchemas] = field(default_factory=dict)

    def apply(self, event: SchemaEvent) -> None:
        self.tenants.setdefault(event.tenant, TenantSchemas()).apply(event)
        self.last_seq = max(self.last_seq, event.seq)

    def tenant(self, tenant: Tenant) -> TenantSchemas:
        return self.tenants.get(tenant) or TenantSchemas()
