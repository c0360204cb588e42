"""Who applies which partition: leases in a JetStream KV bucket, no other coordinator.

Every worker of a projection keeps a membership key ``<projection>.member.<worker>`` alive
and holds a lease key ``<projection>.lease.<partition>`` for each partition it applies. The
bucket's TTL makes the keys of a dead worker vanish; leases are taken with ``create``
(fails if someone holds it) and renewed with ``update`` at the revision last seen (fails if
someone took it over), so two workers never believe they hold one lease for long -- and the
checkpoints' compare-and-set makes that window harmless.

Balancing: with ``n`` live members each takes at most ``ceil(partitions / n)``; a worker
over its share gives leases back, one under it takes free ones. A joining or dying worker
is rebalanced within a couple of TTLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from broker.streams import Stream, open_bucket

log = structlog.get_logger(__name__)
BUCKET = "projection_leases"


#: How long a worker keeps trying its first lease round: a bucket just created in a cluster
#: answers "no response from stream" until its replicas have elected a leader.
_FIRST_TICK_SECONDS = 20.0

#: How long nats-server keeps the consumer of a member listing once its watcher stopped.
_LISTING_LINGER_SECONDS = 2.0
#: How long a member listing waits for the next key before the tick gives up on it.
_LISTING_TIMEOUT_SECONDS = 5.0


async def messages_replicas(js: JetStreamContext) -> int:
    """The replica count of the MESSAGES stream (1 without it): what a projection's own
    state in NATS (its leases, its change events) is given."""
    try:
        return int((await js.stream_info(Stream.MESSAGES)).config.num_replicas or 1)
    except NotFoundError:
        return 1


async def lease_bucket(js: JetStreamContext, ttl: float) -> KeyValue:
    """The leases bucket, created with as many replicas as the MESSAGES stream: leases must
    survive the loss of a node whenever the data does."""
    replicas = await messages_replicas(js)
    config = KeyValueConfig(bucket=BUCKET, history=1, ttl=ttl, replicas=replicas)
    return await open_bucket(js, config)


class PartitionLeases:
    """The partitions one worker holds for one projection, kept balanced in the background."""

    def __init__(
        self,
        js: JetStreamContext,
        projection: str,
        partitions: int,
        worker: str,
        *,
        ttl: float = 6.0,
    ) -> None:
        self.js = js
        self.projection = projection.replace(".", "_")
        self.partitions = partitions
        self.worker = worker
        self.ttl = ttl
        self.interval = ttl / 3
        self._held: dict[int, int] = {}  # partition -> revision
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    def owned(self) -> frozenset[int]:
        return frozenset(self._held)

    async def start(self) -> None:
        self._kv = await lease_bucket(self.js, self.ttl)
        deadline = time.monotonic() + _FIRST_TICK_SECONDS
        while True:
            try:
                await self.tick()
                break
            except Exception as e:  # a new bucket without a leader yet: try again
                if time.monotonic() >= deadline:
                    raise
                log.info("lease_bucket_not_ready", projection=self.projection, error=str(e))
                await asyncio.sleep(0.5)
        self._task = asyncio.create_task(self._run(), name=f"leases-{self.projection}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        kv = self._kv
        if kv is None:
            return
        for partition, revision in list(self._held.items()):
            with contextlib.suppress(Exception):
                await kv.delete(self._lease(partition), last=revision)
        self._held.clear()
        with contextlib.suppress(Exception):
            await kv.delete(self._member())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception as e:  # NATS hiccup: keep the leases we can, try again
                log.warning("lease_tick_failed", projection=self.projection, error=str(e))

    def _lease(self, partition: int) -> str:
        return f"{self.projection}.lease.{partition}"

    def _member(self) -> str:
        return f"{self.projection}.member.{self.worker}"

    async def _members(self, kv: KeyValue) -> list[str]:
        """The live members of this projection, this worker included. Read with a watcher of
        the member keys alone whose consumer the server drops soon after it is stopped:
        nats-py's ``kv.keys()`` leaves its consumer for 5 minutes, so every tick of every
        worker's projections added one, and at nats-server's 1,000 consumers a stream (the
        bucket sets no limit) every listing failed and each worker took itself for the only
        member."""
        prefix = f"{self.projection}.member."
        found = {self.worker}
        try:
            watcher = await kv.watch(
                f"{prefix}*",
                ignore_deletes=True,
                meta_only=True,
                inactive_threshold=_LISTING_LINGER_SECONDS,
            )
        except Exception:
            return [self.worker]
        next_key: Callable[[float], Awaitable[KeyValue.Entry | None]] = watcher.updates
        try:
            while (entry := await next_key(_LISTING_TIMEOUT_SECONDS)) is not None:
                found.add(entry.key[len(prefix) :])
        except Exception:  # NATS hiccup: as if alone, as before
            return [self.worker]
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(found)

    async def tick(self) -> None:
        """Renew membership and leases, give back extras, take free partitions."""
        kv = self._kv
        assert kv is not None, "start() first"
        before = self.owned()
        await kv.put(self._member(), b"1")
        for partition, revision in list(self._held.items()):
            try:
                self._held[partition] = await kv.update(
                    self._lease(partition), self.worker.encode(), last=revision
                )
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                del self._held[partition]  # expired and taken, or gone
        members = await self._members(kv)
        share = math.ceil(self.partitions / len(members))
        while len(self._held) > share:
            partition = max(self._held)
            revision = self._held.pop(partition)
            with contextlib.suppress(Exception):
                await kv.delete(self._lease(partition), last=revision)
        # Prefer partitions by a rotation on the member's rank, so workers starting together
        # do not all race for partition 0.
        rank = members.index(self.worker)
        order = [(rank * share + i) % self.partitions for i in range(self.partitions)]
        for partition in order:
            if len(self._held) >= share:
                break
            if partition in self._held:
                continue
            try:
                self._held[partition] = await kv.create(
                    self._lease(partition), self.worker.encode()
                )
            except Exception:  # held by someone else (create fails on a live key)
                continue
        if self.owned() != before:
            log.info(
                "partitions_rebalanced",
                projection=self.projection,
                worker=self.worker,
                owned=sorted(self._held),
                members=len(members),
            )
            self.changed.set()
