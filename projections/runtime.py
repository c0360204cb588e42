"""The projection runtime: fetch a batch, apply it and move the checkpoint in one
transaction, commit, then ack.

Position lives in the :class:`~projections.checkpoints.CheckpointStore`, not in the
consumer: on start (and whenever the partitions it owns change) a runner reads its
checkpoints and (re)creates its durable pull consumer from the lowest of them. Events at or
below a partition's checkpoint are skipped, so a crash anywhere -- before the commit (the
batch is fetched again and applied once) or between commit and ack (it is fetched again
and skipped) -- applies nothing twice and skips nothing.

Each commit moves *every* owned partition to the batch's last sequence (they have all
seen it), with compare-and-set, so a worker that lost a partition to another cannot
overwrite it. A batch that fails is retried event by event; an event that fails
``max_attempts`` times goes to ``DLQ`` with its error and original headers (those a
client can publish, within :data:`DLQ_HEADER_BYTES`), and the projection moves past it; an
event that cannot be published even so goes as a stub: the error and its essential headers,
without the payload (``Broker-Dlq-Stub`` says why).

The lag gauge follows the consumer on a timer (:attr:`ProjectionRunner.lag_every`), not only
after the batches that succeed: a runner stuck on a failing store still reports its backlog.

Moving to the batch's last sequence is only right if the runner saw every message the
consumer delivered before it. A delivery can go missing: a fetch's reply lost while a
paused stream leader resumes, a fetch cancelled with messages in flight. With
``AckPolicy.ALL`` acking the batch would then ack the missing message too, and it would be
skipped for good. So every batch's consumer sequences (one per delivery, redeliveries
included) must follow the last one seen without a gap; on a gap the runner commits nothing
and starts again from its checkpoints with a fresh consumer.

A stream deleted and made again starts at sequence 1 again: its messages at or below the
old checkpoints would be skipped. The runner notices it on every subscribe in two ways: a
checkpoint past the stream's last sequence (also another NATS, or an old backup restored),
and a stream whose creation time is not the one recorded with the checkpoints
(:class:`~projections.checkpoints.StreamIdentity`; recorded while no checkpoint exists, or,
for a database from before it was kept, by the first subscribe). The second survives a
worker restart after the new stream has grown past the old checkpoints. Either way the
runner applies nothing, logs ``projection_checkpoint_ahead_of_stream`` and checks again
every :attr:`lag_every` until ``broker projections reset`` forgets the checkpoints and the
identity. It never resets anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import NotFoundError

from broker.envelope import PAYLOAD_HEADERS
from broker.natsconn import header_line_size, message_size
from broker.reader import READ_BYTES, FetchSize
from broker.streams import SUBJECT_PREFIX, Stream
from broker.telemetry import metrics, setup, tracing
from projections._errors import error_text, error_type
from projections.base import Event, Projection, partition_of
from projections.checkpoints import (
    UNKNOWN_CREATED,
    CheckpointConflict,
    CheckpointSource,
    CheckpointStore,
    StoreUnavailable,
    StreamIdentity,
)

log = structlog.get_logger(__name__)

#: ``BROKER_CRASH_AT=before_commit:N`` or ``after_commit:N`` kills the worker with SIGKILL at
#: that point of its N-th batch: how the crash tests reach the gaps between the steps.
CRASH_ENV = "BROKER_CRASH_AT"

#: Payload bytes one fetch asks for, by the size of recent messages (:class:`FetchSize`). By
#: count alone, 1,024 messages near the 1 MiB publish limit overflowed nats-py's 256 MiB
#: subscription buffer (dropped deliveries, a restart, ~10x slower) and held GBs of decoded
#: JSON in the worker.
BATCH_BYTES = READ_BYTES
_FIRST_ESTIMATE = 1024 * 1024  # before any message is seen: a first fetch of 8
#: How long a runner gives the deletion of its consumer once it reads no partition.
_DELETE_CONSUMER_SECONDS = 2.0

#: A header name nats-py will publish (an HTTP token); nats-server stores more than that
#: (``X/Trace``), and copying such a name into a dead letter would fail its publish for ever.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: At most this many bytes of an event's own headers go with it to the DLQ.
DLQ_HEADER_BYTES = 16 * 1024
#: Set on a dead letter that could not carry the event (its value says why).
DLQ_STUB = "Broker-Dlq-Stub"
#: NATS itself failing: a dead letter waits for it (the batch is fetched again), as any step.
_NATS_DOWN = (
    OSError,
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
)


def _crash_point() -> tuple[str, int] | None:
    spec = os.environ.get(CRASH_ENV, "")
    where, _, nth = spec.partition(":")
    if where in {"before_commit", "after_commit"} and nth.isdigit():
        return where, int(nth)
    return None


@dataclass
class RunnerStats:
    """What a runner has done, for status and metrics."""

    applied: int = 0
    batches: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    conflicts: int = 0
    gaps: int = 0  # deliveries missed, each answered by starting again from the checkpoints
    errors: int = 0
    last_seq: int = 0
    started: float = field(default_factory=time.monotonic)


class DeliveryGap(Exception):
    """The consumer delivered a message this runner never received."""


class CheckpointAheadOfStream(Exception):
    """A checkpoint is past the stream's last sequence, or was recorded in another stream
    of the same name: the stream was made again."""


def stream_identity(stream: str, info: StreamInfo) -> StreamIdentity | None:
    """The identity of ``stream`` (``info`` is its ``stream_info``); ``None`` if the server
    gives no creation time."""
    if info.created is None:
        return None
    return StreamIdentity(stream, info.created.isoformat())


def stream_replaced(
    recorded: StreamIdentity | None, current: StreamIdentity | None, positions: Mapping[int, int]
) -> bool:
    """Whether checkpoints exist and were recorded in another stream than ``current``; an
    identity not recorded (or not known) is no evidence."""
    return any(positions.values()) and None not in (recorded, current) and recorded != current


#: The worker id of ``broker projections reset``'s runner; no ``broker worker`` may take it,
#: or the reset would delete that worker's consumer and both would read from one.
RESET_WORKER = "reset"


def consumer_name(projection: str, worker: str) -> str:
    """The durable consumer of ``worker`` for ``projection``: distinct for distinct worker
    ids (``w-1`` and ``w_1`` too), as their leases are; a shared name would make each
    worker delete the other's consumer on every subscribe."""
    return f"proj_{projection.replace('.', '_')}_{worker}"


class ProjectionRunner:
    """Runs one projection for one worker over the partitions it owns."""

    def __init__(
        self,
        js: JetStreamContext,
        projection: Projection,
        store: CheckpointStore,
        *,
        worker: str = "0",
        batch: int = 1024,
        fetch_timeout: float = 1.0,
        max_attempts: int = 3,
        owned: Callable[[], frozenset[int]] | None = None,
        lag_every: float = 5.0,
    ) -> None:
        self.js = js
        self.projection = projection
        self.store = store
        self.worker = worker
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.max_attempts = max_attempts
        #: Seconds between two refreshes of the lag gauge (one ``consumer_info`` each).
        self.lag_every = lag_every
        self._owned = owned or (lambda: frozenset(range(projection.partitions)))
        self.stats = RunnerStats()
        self.positions: dict[int, int] = {}
        self._delivered = 0  # the consumer sequence of the last delivery received
        self._size = FetchSize(_FIRST_ESTIMATE, BATCH_BYTES)
        self._failures: dict[int, int] = {}
        self._consumer_made = False  # this runner's consumer may exist on the server
        self._crash = _crash_point()
        #: partition -> the checkpoint found past the stream: held until it changes
        self._ahead: dict[int, int] = {}
        #: the highest checkpoint, while held for a stream made again since it (else 0)
        self._replaced_at = 0
        setup("worker")  # metrics and tracing of this process, once

    @property
    def consumer_name(self) -> str:
        return consumer_name(self.projection.name, self.worker)

    def owned(self) -> frozenset[int]:
        return self._owned()

    async def _subscribe(self, owned: frozenset[int]) -> Any:
        """A fresh durable pull consumer starting after the lowest owned checkpoint."""
        self.positions = await self.store.load(self.projection.name)
        stream = self.projection.stream
        await self._check_same_stream(owned)
        start = min((self.positions.get(p, 0) for p in owned), default=0) + 1
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(stream, self.consumer_name)
        config = ConsumerConfig(
            durable_name=self.consumer_name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.ALL,
            max_ack_pending=-1,
            ack_wait=60,
            filter_subjects=list(self.projection.subjects),
            inactive_threshold=300,
        )
        await self.js.add_consumer(stream, config)
        self._consumer_made = True
        self._delivered = 0
        return await self.js.pull_subscribe_bind(self.consumer_name, stream=stream)

    async def _delete_consumer(self) -> None:
        """Delete this runner's consumer once it reads no partition (stopped, or its
        partitions taken by other workers): left to its inactivity threshold, it lingered
        five minutes (longer across a NATS restart), and ``broker status`` showed its
        unread backlog as a lag growing with the stream. A failure leaves it to that."""
        if not self._consumer_made:
            return
        self._consumer_made = False
        if not self.js._nc.is_connected:  # NATS away: a stop is not held for it; it expires
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.js.delete_consumer(self.projection.stream, self.consumer_name),
                _DELETE_CONSUMER_SECONDS,
            )

    async def _check_same_stream(self, owned: frozenset[int]) -> None:
        """Raise :class:`CheckpointAheadOfStream` (and log it) while the checkpoints belong
        to another stream than the one there now: an owned checkpoint is past the stream's
        last sequence (or still where it was when it was found so), or the stream's identity
        is not the one recorded with the checkpoints. Records the identity where none is
        (or no checkpoint is) yet."""
        name = self.projection.name
        info = await self.js.stream_info(self.projection.stream)
        last = info.state.last_seq
        ahead = {
            p: seq
            for p in owned
            if (seq := self.positions.get(p, 0)) > last or self._ahead.get(p, -1) == seq > 0
        }
        self._ahead = ahead
        current = stream_identity(self.projection.stream, info)
        recorded = await self.store.stream_identity(name)
        replaced = stream_replaced(recorded, current, self.positions)
        if current is not None and not replaced:
            # A checkpoint past the end cannot be this stream's (any partition's, whoever
            # owns it): record an identity that matches no stream, so that the hold
            # outlives this process and the stream growing past the checkpoint.
            past_end = any(seq > last for seq in self.positions.values())
            wanted = StreamIdentity(current.stream, UNKNOWN_CREATED) if past_end else current
            if recorded != wanted:
                await self.store.record_stream_identity(name, wanted)
        highest = max(self.positions.values(), default=0)
        self._replaced_at = highest if replaced else 0
        if ahead or replaced:
            checkpoint = max([*ahead.values(), self._replaced_at])
            log.error(
                "projection_checkpoint_ahead_of_stream",
                projection=name,
                stream=self.projection.stream,
                stream_last_seq=last,
                checkpoint=checkpoint,
                partitions=sorted(ahead or self.positions),
                stream_created=current.created if current else None,
                checkpoints_stream_created=recorded.created if recorded else None,
                action=f"broker projections reset {name}",
            )
            why = (
                f"{self.projection.stream} was made again since the checkpoints were recorded"
                if replaced
                else f"it is past {self.projection.stream}'s last sequence {last}"
            )
            raise CheckpointAheadOfStream(f"{name}: checkpoint {checkpoint}: {why}")

    async def run(self, stop: asyncio.Event) -> None:
        """Apply batches until ``stop`` is set; re-subscribe when ownership changes."""
        watcher = asyncio.create_task(self._watch_lag(stop))
        try:
            await self._run(stop)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            metrics.projection_lag(self.projection.name, 0)  # this runner reports no more
            await self._delete_consumer()

    async def lag(self) -> int:
        """Messages of the owned partitions not applied yet, as the consumer counts them
        (pending, and delivered but not acked); 0 when no partition is owned. Without a
        consumer (being made again): the stream's last sequence past the lowest checkpoint.
        Negative while the runner holds on checkpoints of another stream (ahead of this one,
        or recorded before it was made again)."""
        owned = self.owned()
        if not owned:
            return 0
        stream = self.projection.stream
        try:
            info = await self.js.consumer_info(stream, self.consumer_name)
        except NotFoundError:
            state = (await self.js.stream_info(stream)).state
            if self._ahead or self._replaced_at:
                return min(-1, state.last_seq - max([*self._ahead.values(), self._replaced_at]))
            lowest = min(self.positions.get(p, 0) for p in owned)
            return max(0, state.last_seq - max(lowest, state.first_seq - 1))
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        """Refresh the lag gauge every :attr:`lag_every` seconds, whether batches succeed or
        not: a projection stuck behind a failing store shows its backlog growing."""
        while not stop.is_set():
            try:
                metrics.projection_lag(self.projection.name, await self.lag())
            except Exception as e:  # NATS down: the gauge keeps its value until it is back
                log.debug("projection_lag_unknown", projection=self.projection.name, error=repr(e))
            await _wait(stop, self.lag_every)

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            owned = self.owned()
            if not owned:
                await self._delete_consumer()
                await _wait(stop, self.fetch_timeout)
                continue
            sub = None
            try:
                sub = await self._subscribe(owned)
                await self._loop(sub, owned, stop)
            except CheckpointConflict as e:
                self.stats.conflicts += 1
                log.info(
                    "projection_partition_moved", projection=self.projection.name, error=str(e)
                )
            except DeliveryGap as e:
                self.stats.gaps += 1
                log.warning("projection_delivery_gap", projection=self.projection.name, gap=str(e))
            except CheckpointAheadOfStream:
                await _wait(stop, self.lag_every)  # logged; an operator resets the projection
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                log.warning("projection_runner_stray_cancel", projection=self.projection.name)
            except Exception as e:  # NATS or the store failing: never die, start over
                self.stats.errors += 1
                log.warning(
                    "projection_runner_restarting",
                    projection=self.projection.name,
                    error_type=error_type(e),
                    error=error_text(e),
                )
                await _wait(stop, min(5.0, 0.2 * 2 ** min(self.stats.errors, 5)))
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    def fetch_size(self) -> int:
        """How many messages the next fetch asks for: :attr:`batch`, fewer when recent
        messages were large, so a fetch holds about :data:`BATCH_BYTES` of payload."""
        return self._size.count(self.batch)

    async def _fetch(self, sub: Any) -> list[Msg]:
        try:
            messages: list[Msg] = await sub.fetch(self.fetch_size(), timeout=self.fetch_timeout)
            self._size.saw(messages)
        except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either, by path
            return []
        except asyncio.CancelledError:
            # nats-py can cancel a fetch's inner wait on its own (seen when a pull request
            # expires as a consumer is replaced); only our own cancellation ends the fetch.
            if _cancelling():
                raise
            return []
        return messages

    async def _loop(self, sub: Any, owned: frozenset[int], stop: asyncio.Event) -> None:
        # The next batch is fetched while this one commits: the database and NATS round
        # trips overlap instead of adding up.
        pending = asyncio.create_task(self._fetch(sub))
        try:
            while not stop.is_set() and self.owned() == owned:
                try:
                    messages = await pending
                except asyncio.CancelledError:
                    if _cancelling():
                        raise
                    messages = []
                pending = asyncio.create_task(self._fetch(sub))
                if messages:
                    await self.process(messages, owned)
                # Nothing within the fetch timeout is not "caught up" (the consumer may be
                # stuck with messages pending): the lag watcher reports what is left.
        finally:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending

    def _check_deliveries(self, messages: Sequence[Msg]) -> None:
        """Raise :class:`DeliveryGap` unless ``messages`` follow the last delivery seen."""
        expected = self._delivered + 1
        for message in messages:
            got = message.metadata.sequence.consumer
            if got != expected:
                raise DeliveryGap(f"consumer sequence {got} where {expected} was next")
            expected += 1
        self._delivered = expected - 1

    async def process(self, messages: Sequence[Msg], owned: frozenset[int]) -> None:
        """Apply one fetched batch (the owned, not yet applied events), commit, then ack."""
        self._check_deliveries(messages)
        count = self.projection.partitions
        events = [Event.from_msg(m) for m in messages]
        todo = [
            e
            for e in events
            if (p := partition_of(e.partition_key, count)) in owned
            and e.seq > self.positions.get(p, 0)
        ]
        last = events[-1].seq
        self.stats.batches += 1
        self.stats.skipped += len(events) - len(todo)
        started = time.monotonic()
        # Each traced event's trace continues here: one span per event, open until commit.
        with tracing.batch_spans(
            f"project {self.projection.name}",
            (e.headers for e in todo),
            attributes=({"messaging.nats.stream_sequence": e.seq} for e in todo),
        ):
            try:
                await self._commit(todo, owned, last)
            except (CheckpointConflict, StoreUnavailable):
                raise  # not the events' fault: the batch is fetched again
            except Exception as e:  # the projection refused the batch: find the poison event
                # Never str(e): SQLAlchemy's ends in the batch's rows as bound parameters.
                log.warning(
                    "projection_batch_failed",
                    projection=self.projection.name,
                    error_type=error_type(e),
                    error=error_text(e),
                )
                await self._one_by_one(todo, owned, last)
        self._maybe_crash("after_commit")
        await messages[-1].ack()  # AckPolicy.ALL: acks the whole batch
        self.stats.applied += len(todo)
        self.stats.last_seq = last
        lag = messages[-1].metadata.num_pending  # what the consumer has left after this batch
        metrics.projection_applied(self.projection.name, len(todo), lag, time.monotonic() - started)

    async def _commit(self, events: Sequence[Event], owned: frozenset[int], last: int) -> None:
        moves = {p: (self.positions.get(p, 0), max(last, self.positions.get(p, 0))) for p in owned}

        def work(tx: Any) -> None:
            if events:
                self.projection.apply(events, tx)

        self._maybe_crash("before_commit")
        await self.store.commit(self.projection.name, moves, work)
        for p, (_, new) in moves.items():
            self.positions[p] = new

    async def _one_by_one(self, events: Sequence[Event], owned: frozenset[int], last: int) -> None:
        for event in events:
            # An inline store commits on the loop's thread: a batch of 1 024 is a thousand
            # transactions, a second or more, and the loop must still renew the leases.
            await asyncio.sleep(0)
            for attempt in range(1, self.max_attempts + 1):
                try:
                    await self._commit([event], owned, event.seq)
                    break
                except (CheckpointConflict, StoreUnavailable):
                    raise
                except Exception as e:
                    if attempt == self.max_attempts:
                        await self._dead_letter(event, e)
                        await self._commit([], owned, event.seq)
        await self._commit([], owned, last)

    async def _dead_letter(self, event: Event, error: Exception) -> None:
        dead = {
            "Broker-Dlq-Projection": self.projection.name,
            "Broker-Dlq-Error": error_text(error),
            "Broker-Dlq-Stream": event.stream,
            "Broker-Dlq-Seq": str(event.seq),
            "Broker-Dlq-Subject": event.subject,
            "Nats-Msg-Id": f"dlq:{self.projection.name}:{event.stream}:{event.seq}",
        }
        subject = (
            f"{SUBJECT_PREFIX[Stream.DLQ]}.{event.stream}.{self.projection.name.replace('.', '_')}"
        )
        own = dlq_headers(event.headers)
        headers = {**own, **dead}
        stub: str | None = None
        duplicate = False  # dead-lettered before: the batch came back after a crash
        if message_size(event.data, headers) > self.js._nc.max_payload:
            stub = "the event with its dead-letter headers is over the server's max_payload"
        else:
            try:
                ack = await self.js.publish(subject, event.data, headers=headers)
                duplicate = bool(ack.duplicate)
            except _NATS_DOWN:
                raise  # the batch is fetched again once NATS is back
            except Exception as e:  # the message itself refused: never stall on it
                stub = f"the event could not be published: {e!r}"[:300]
        if stub is not None:
            essential = {k: v for k, v in own.items() if k.lower() in PAYLOAD_HEADERS}
            ack = await self.js.publish(subject, b"", headers={**essential, **dead, DLQ_STUB: stub})
            duplicate = bool(ack.duplicate)
        if duplicate:  # one entry in the DLQ, counted and logged once
            return
        self.stats.dead_lettered += 1
        metrics.dead_lettered(self.projection.name)
        log.error(
            "projection_event_dead_lettered",
            projection=self.projection.name,
            seq=event.seq,
            error_type=error_type(error),
            error=error_text(error),
            stub=stub,
        )

    def _maybe_crash(self, where: str) -> None:
        if self._crash and self._crash[0] == where and self.stats.batches == self._crash[1]:
            log.warning("crash_point_reached", where=where, batch=self.stats.batches)
            os.kill(os.getpid(), signal.SIGKILL)


def dlq_headers(headers: Mapping[str, str], budget: int = DLQ_HEADER_BYTES) -> dict[str, str]:
    """The event's own headers that go with it to the DLQ: not NATS's (``Nats-*``), only
    names a client can publish, and no more than ``budget`` bytes of them (first come)."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        if name.startswith("Nats-") or not _HEADER_NAME.fullmatch(name):
            continue
        size = header_line_size(name, value)
        if size <= budget:
            kept[name] = value
            budget -= size
    return kept


def _cancelling() -> bool:
    """Whether the running task itself has been asked to stop (not a stray cancellation)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a projection is: the lowest partition checkpoint and what is left to apply;
    ``ahead_of_stream`` when the checkpoints belong to another stream than the one there now
    (``lag`` is then negative): a checkpoint is past the stream's last sequence (by how much),
    or ``stream_replaced``: they were recorded before the stream was made again (``lag`` -1,
    whatever the new stream's length)."""

    applied_seq: int
    lag: int
    ahead_of_stream: bool = False
    stream_replaced: bool = False


async def progress(
    js: JetStreamContext, projection: Projection, store: CheckpointSource
) -> Progress:
    """Applied sequence (the lowest partition checkpoint) and lag (the stream's last sequence
    minus it, or minus the last sequence the stream no longer holds: messages that aged out
    can never be applied; 0: caught up). Checkpoints of another stream -- past the stream's
    last sequence, or recorded before it was made again -- give a negative lag and
    ``ahead_of_stream``. Only reads ``store``."""
    info = await js.stream_info(projection.stream)
    positions = await store.load(projection.name)
    seqs = [positions.get(p, 0) for p in range(projection.partitions)]
    lowest, highest = min(seqs, default=0), max(seqs, default=0)
    last = info.state.last_seq
    if highest > last:
        return Progress(lowest, last - highest, ahead_of_stream=True)
    recorded = await store.stream_identity(projection.name)
    if stream_replaced(recorded, stream_identity(projection.stream, info), positions):
        return Progress(lowest, -1, ahead_of_stream=True, stream_replaced=True)
    gone = max(0, info.state.first_seq - 1)
    return Progress(lowest, max(0, last - max(lowest, gone)))
