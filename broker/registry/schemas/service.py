"""The schema registry against NATS: catch up from ``SCHEMAS``, decide, append, retry.

Every process keeps its own :class:`~.state.SchemaRegistryState`, caught up from the stream
before each request (one ``STREAM.INFO`` round trip when nothing changed). A command decides
on that state and appends its event with ``Nats-Expected-Last-Sequence`` set to the last
sequence the state has seen, so the whole stream is one optimistic-concurrency unit: when two
writers (in any processes) race, exactly one append lands, the other catches up and decides
again. Global ids are therefore assigned from the fold without gaps or collisions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable
from typing import TypeVar

import structlog

from broker.envelope import NATS_EXPECTED_LAST_SEQ, Tenant
from broker.errors import SchemaNotFound, SchemaRegistryBusy, SequenceConflict
from broker.publisher import Publisher
from broker.reader import read_messages
from broker.registry.schemas.decisions import Decision, SchemaCatalog
from broker.registry.schemas.events import SchemaId, decode_message, encode
from broker.registry.schemas.state import SchemaRegistryState, StoredSchema, TenantSchemas
from broker.registry.schemas.types import ParsedSchema
from broker.streams import Stream

T = TypeVar("T")
log = structlog.get_logger(__name__)


class SchemaRegistry:
    """One process's schema registry: reads are local after a catch-up, writes append."""

    def __init__(self, publisher: Publisher, *, max_attempts: int = 16) -> None:
        self.publisher = publisher
        self.state = SchemaRegistryState()
        self.catalog = SchemaCatalog()
        self.max_attempts = max_attempts
        self._sync_lock = asyncio.Lock()

    async def sync(self) -> SchemaRegistryState:
        """Apply every event appended since the last catch-up; return the state."""
        js = self.publisher.js
        async with self._sync_lock:
            info = await js.stream_info(Stream.SCHEMAS)
            if info.state.last_seq > self.state.last_seq:
                async for message in read_messages(
                    js, Stream.SCHEMAS, start_seq=self.state.last_seq + 1
                ):
                    self.state.apply(decode_message(message))
        return self.state

    async def read(self, tenant: Tenant) -> TenantSchemas:
        """The tenant's registry, caught up with the stream."""
        return (await self.sync()).tenant(tenant)

    async def execute(self, tenant: Tenant, decide: Callable[[TenantSchemas], Decision[T]]) -> T:
        """Decide on the current state and append the decided event; on a lost race, catch
        up and decide again. Errors raised by ``decide`` reach the caller unchanged."""
        for attempt in range(self.max_attempts):
            state = await self.sync()
            decision = decide(state.tenant(tenant))
            if decision.event is None:
                return decision.answer
            out = encode(decision.event)
            out.headers[NATS_EXPECTED_LAST_SEQ] = str(state.last_seq)
            try:
                ack = await self.publisher.publish(out)
            except SequenceConflict:
                log.debug("schema_registry_write_raced", attempt=attempt)
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                continue
            async with self._sync_lock:
                # Read-your-writes without a fetch: the append landed right after last_seq
                # (that is what the expected sequence made sure of), unless a catch-up in
                # the meantime applied it already.
                if self.state.last_seq == ack.seq - 1:
                    self.state.apply(dataclasses.replace(decision.event, seq=ack.seq))
            log.info(
                "schema_registry_changed",
                event_type=type(decision.event).__name__,
                seq=ack.seq,
                tenant=tenant,
            )
            return decision.answer
        raise SchemaRegistryBusy(
            f"the schema registry changed under {self.max_attempts} attempts in a row; retry"
        )

    async def stored(self, tenant: Tenant, schema_id: int) -> StoredSchema:
        """A schema by global id as registered (40403 when none); catches up only on a miss.
        Its text needs no parsing: it answers even when a reference can no longer be read."""
        try:
            return self.state.tenant(tenant).schema(schema_id)
        except SchemaNotFound:
            return (await self.read(tenant)).schema(SchemaId(schema_id))

    async def schema(self, tenant: Tenant, schema_id: int) -> tuple[StoredSchema, ParsedSchema]:
        """A schema by global id, parsed (for decoders); catches up only on a miss."""
        stored = await self.stored(tenant, schema_id)
        return stored, self.catalog.parsed(self.state.tenant(tenant), tenant, stored)
