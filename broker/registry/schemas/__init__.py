"""The schema registry: schema languages and compatibility rules (pure), its events in
``SCHEMAS``, the state folded from them, decisions, and the NATS-facing service."""

from broker.registry.schemas.compatibility import check_compatibility
from broker.registry.schemas.decisions import Decision, SchemaCatalog, SchemaRequest
from broker.registry.schemas.events import (
    CompatibilityChanged,
    SchemaEvent,
    SchemaId,
    SchemaReference,
    SchemaVersionDeleted,
    SchemaVersionRegistered,
)
from broker.registry.schemas.service import SchemaRegistry
from broker.registry.schemas.state import SchemaRegistryState, TenantSchemas
from broker.registry.schemas.types import (
    CompatibilityLevel,
    InvalidSchemaError,
    ParsedSchema,
    SchemaType,
    parse_schema,
)

__all__ = [
    "CompatibilityChanged",
    "CompatibilityLevel",
    "Decision",
    "InvalidSchemaError",
    "ParsedSchema",
    "SchemaCatalog",
    "SchemaEvent",
    "SchemaId",
    "SchemaReference",
    "SchemaRegistry",
    "SchemaRegistryState",
    "SchemaRequest",
    "SchemaType",
    "SchemaVersionDeleted",
    "SchemaVersionRegistered",
    "TenantSchemas",
    "check_compatibility",
    "parse_schema",
]
