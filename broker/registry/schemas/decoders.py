"""Codecs for stored messages, with the writer's schema from the registry, one per schema id.

The reading half of schema-on-read: a message's ``Content-Type`` picks the codec, its schema
id (``Broker-Schema-Id``, from a header or the Confluent wire prefix at publish) picks the
writer's schema. Building a codec parses a schema, so each process keeps one per
``(tenant, kind, schema id)``; a schema id that is not registered yet is not cached, so a
later read finds it once it is.
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool  # type: ignore[import-untyped]

from broker.codecs import DEFAULT_LIMITS, Codec, CodecKind, DecodeError, DecodeLimits, kind_for
from broker.codecs.lazy import Schema, codec_for
from broker.envelope import Tenant
from broker.errors import SchemaNotFound, SchemaRegistryError
from broker.registry.schemas import avro
from broker.registry.schemas.service import SchemaRegistry
from broker.registry.schemas.types import ParsedSchema, SchemaType

_NEEDS_SCHEMA = {CodecKind.AVRO: SchemaType.AVRO, CodecKind.PROTOBUF: SchemaType.PROTOBUF}
_MAX_CACHED = 4096


def writer_schema(parsed: ParsedSchema) -> Schema:
    """What a codec needs from a parsed schema: a protobuf file; Avro's parsed form, or with
    references, a schema that defines their named types itself (:func:`avro.standalone`)."""
    if parsed.schema_type is SchemaType.PROTOBUF:
        pool = descriptor_pool.DescriptorPool()
        files = descriptor_pb2.FileDescriptorSet.FromString(parsed.file_descriptor_set)
        for proto in files.file:  # protoc lists imports before the files that use them
            pool.Add(proto)
        return pool.FindFileByName(parsed.file_name)
    if parsed.references:  # the named types they define, written into the schema
        self_contained: Schema = avro.standalone(parsed)
        return self_contained
    schema: Schema = parsed.parsed
    return schema


class Decoders:
    """One process's codecs, keyed by tenant, codec kind and writer schema id."""

    def __init__(self, registry: SchemaRegistry, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.registry = registry
        self.limits = limits
        self._codecs: dict[tuple[Tenant, CodecKind, int | None], Codec | DecodeError] = {}

    async def codec(self, tenant: Tenant, content_type: str | None, schema_id: int | None) -> Codec:
        """The codec for a stored message; :class:`DecodeError` when it cannot have one."""
        kind = kind_for(content_type)
        needs = _NEEDS_SCHEMA.get(kind)
        key = (tenant, kind, schema_id if needs else None)
        found = self._codecs.get(key)
        if found is None:
            found = await self._build(tenant, content_type, kind, needs, schema_id)
            if len(self._codecs) >= _MAX_CACHED:
                self._codecs.clear()
            self._codecs[key] = found
        if isinstance(found, DecodeError):
            raise found
        return found

    async def _build(
        self,
        tenant: Tenant,
        content_type: str | None,
        kind: CodecKind,
        needs: SchemaType | None,
        schema_id: int | None,
    ) -> Codec | DecodeError:
        if needs is None:
            return codec_for(content_type, limits=self.limits)
        if schema_id is None:
            raise DecodeError(kind, "no schema id: send Schema-Id or the Confluent wire prefix")
        try:
            _, parsed = await self.registry.schema(tenant, schema_id)
        except SchemaNotFound:
            raise DecodeError(kind, f"schema {schema_id} is not in the registry") from None
        except SchemaRegistryError as e:  # a reference deleted for good; a parser tightened
            return DecodeError(kind, f"schema {schema_id} can no longer be read: {e.message}")
        if parsed.schema_type is not needs:
            return DecodeError(kind, f"schema {schema_id} is {parsed.schema_type}, not {needs}")
        try:
            return codec_for(content_type, schema=writer_schema(parsed), limits=self.limits)
        except DecodeError as e:
            return e
        except RecursionError:  # references inlined deeper than the parsers recurse
            return DecodeError(kind, f"schema {schema_id} nests too deeply to read")


def json_default(value: Any) -> Any:
    """orjson's fallback for decoded values JSON has no type for (Avro bytes, decimals)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return str(value)
