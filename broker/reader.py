"""Reading a stream from any point: an ephemeral, unacknowledged pull consumer.

Used for time travel and history (the registry) and replay. The consumer lives in memory
on the server, acknowledges nothing, and is deleted when the read ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, Sequence
from datetime import datetime

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker.errors import Unavailable

#: Deletions still in flight: the loop keeps only weak references to its tasks.
_deleting: set[asyncio.Task[None]] = set()


async def _delete_consumer(js: JetStreamContext, stream: str, name: str) -> None:
    """Best effort: a consumer that survives (NATS gone, a timeout) still expires by itself
    after its ``inactive_threshold``."""
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, name)


def _forget_consumer(js: JetStreamContext, stream: str, name: str) -> None:
    """Delete the consumer in the background: the reader (an HTTP response, a registry
    lookup) is done with it and need not wait one more round trip, nor a timeout when NATS
    is gone."""
    try:
        task = asyncio.get_running_loop().create_task(_delete_consumer(js, stream, name))
    except RuntimeError:  # no running loop (a generator finalized at shutdown): expiry
        return
    _deleting.add(task)
    task.add_done_callback(_deleting.discard)


#: Payload bytes one fetch asks for, by the size of the largest message seen so far. By
#: count alone, 1,024 messages near the 1 MiB publish limit made nats-server push a GB at the
#: reader at once: over its 64 MB per-client buffer, it cut the whole connection (every
#: other request on it too) and the deliveries in flight were lost.
READ_BYTES = 8 * 1024 * 1024
_SMALLEST_ESTIMATE = 1024  # small messages: the batch count is the bound
#: Fetches of one process in flight at once, whatever the number of reads: nats-server's
#: 64 MiB per-client buffer holds what every fetch on the connection asked for and the
#: client has not read yet. Eight replays of near-1 MiB messages, each fetching its 8 MiB
#: (its first fetch up to 16 messages), went over it: the server cut the process's one
#: connection as a slow consumer, and every publish on it failed (503) meanwhile.
FETCHES_AT_ONCE = 2
#: The gate of each event loop (a semaphore belongs to the loop it is first used on, and
#: holds it: the gates of closed loops are dropped as a new one is made).
_fetch_gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _fetch_gate() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    gate = _fetch_gates.get(loop)
    if gate is None:
        for closed in [other for other in _fetch_gates if other.is_closed()]:
            del _fetch_gates[closed]
        gate = _fetch_gates[loop] = asyncio.Semaphore(FETCHES_AT_ONCE)
    return gate


class FetchSize:
    """How many messages a fetch asks for, so that it holds about ``budget`` bytes of
    payload: it follows the largest recent message, at once when one is larger, halving back
    each batch after. ``first``: the message size assumed before any is seen."""

    def __init__(self, first: int, budget: int = READ_BYTES) -> None:
        self.message_bytes = first
        self.budget = budget

    def count(self, batch: int) -> int:
        """At most ``batch``, fewer when recent messages were large."""
        return max(1, min(batch, self.budget // self.message_bytes))

    def saw(self, messages: Sequence[Msg]) -> None:
        largest = max((len(m.data) for m in messages), default=0)
        self.message_bytes = max(largest, self.message_bytes // 2, _SMALLEST_ESTIMATE)


#: Tries in a row to go on after a read broke off (a fetch that timed out with messages still
#: pending, messages lost in transit, the connection cut) before giving up.
READ_ATTEMPTS = 3


class ReadInterrupted(Unavailable):
    """A read of a stream broke off before its end and could not go on."""

    error_code = "read_interrupted"


async def read_batches(
    js: JetStreamContext,
    stream: str,
    *,
    subject: str | None = None,
    start_seq: int | None = None,
    start_time: datetime | None = None,
    batch: int = 512,
    fetch_timeout: float = 2.0,
) -> AsyncGenerator[list[Msg], None]:
    """Every message of ``stream`` (matching ``subject``) from a point to the current end, in
    the batches the server delivered (at most ``batch`` each, and about :data:`READ_BYTES` of
    payload: fewer when the stream's messages are large).

    Ends when the consumer reports nothing pending, so a read of a quiet stream returns
    promptly; messages appended during the read may or may not be included. Never ends early
    in silence: when a fetch times out while messages are still pending, or a delivery was
    lost on the way (a gap in the consumer's sequence, the connection cut), the read goes on
    with a new consumer from the message after the last one handed out, and after
    :data:`READ_ATTEMPTS` such tries in a row it raises :class:`ReadInterrupted`.

    Each consumer is deleted as soon as it is done with, however the read ends (the last
    batch, the caller closing the iterator early, an error, a cancellation): left to its
    inactivity threshold, each read would hold a consumer on the server for that long, and a
    burst of replays piles them up. Close the iterator (``contextlib.aclosing``) when stopping
    early so this happens at once rather than when it is garbage-collected.
    """
    reading = _Read(js, stream, subject, start_seq, start_time)
    try:
        if not await reading.open():
            return
        failures = 0
        while True:
            try:
                messages = await reading.fetch(batch, fetch_timeout)
            except _BrokeOff as e:
                failures += 1
                if failures >= READ_ATTEMPTS:
                    raise ReadInterrupted(
                        f"the read of {stream} broke off after seq {reading.last_seq}: {e}"
                    ) from None
                if not await reading.reopen():
                    return
                continue
            failures = 0
            yield messages
            if messages[-1].metadata.num_pending == 0:
                return
    finally:
        await reading.close()


class _BrokeOff(Exception):
    """Why a fetch could not go on from where the read is."""


class _Read:
    """One read's consumer and where it is: the last stream sequence handed out, and the last
    consumer sequence (contiguous for what the consumer delivered, so a gap is a loss)."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subject: str | None,
        start_seq: int | None,
        start_time: datetime | None,
    ) -> None:
        self.js, self.stream, self.subject = js, stream, subject
        self.start_seq, self.start_time = start_seq, start_time
        self.last_seq: int | None = None
        self.last_delivered = 0
        self.size = FetchSize(READ_BYTES // 16)  # before any is seen: a first fetch of 16
        self.name = ""
        self.sub: JetStreamContext.PullSubscription | None = None

    async def open(self) -> bool:
        """A consumer from where the read is; ``False`` when it has nothing to deliver."""
        # Our own name, so the consumer can be deleted by name (pull_subscribe would invent
        # one and keep it in a private attribute).
        self.name = uuid.uuid4().hex
        self.last_delivered = 0
        config = ConsumerConfig(
            name=self.name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            filter_subject=self.subject,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        if self.last_seq is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last_seq + 1
        elif self.start_seq is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.start_seq
        elif self.start_time is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = self.start_time
        await self.js.add_consumer(self.stream, config=config)
        self.sub = await self.js.pull_subscribe_bind(consumer=self.name, stream=self.stream)
        info = await self.sub.consumer_info()
        return bool(info.num_pending)

    async def reopen(self) -> bool:
        await self.close()
        try:
            return await self.open()
        except nats.errors.Error:  # NATS still away: this try failed too
            return True

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """The next batch, sized by bytes; :class:`_BrokeOff` when the read cannot go on
        from here with this consumer."""
        if self.sub is None:
            raise _BrokeOff("no consumer")
        try:
            async with _fetch_gate():
                messages: list[Msg] = await self.sub.fetch(self.size.count(batch), timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either, by path
            messages = []
        except nats.errors.Error as e:  # the connection cut, a consumer gone, ...
            raise _BrokeOff(repr(e)) from None
        if not messages:  # the consumer said messages were pending
            raise _BrokeOff(f"no message within {timeout:g} s with messages pending")
        for i, message in enumerate(messages):
            delivered = message.metadata.sequence.consumer
            if delivered != self.last_delivered + 1:
                if i:  # hand out what came in order; the next fetch breaks off at the gap
                    messages = messages[:i]
                    break
                raise _BrokeOff(
                    f"deliveries {self.last_delivered + 1} to {delivered - 1} were lost"
                )
            self.last_delivered = delivered
            self.last_seq = message.metadata.sequence.stream
        self.size.saw(messages)
        return messages

    async def close(self) -> None:
        # First, and without awaiting: a cancelled reader may not get past an await here.
        if self.name:
            _forget_consumer(self.js, self.stream, self.name)
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None


async def read_messages(
    js: JetStreamContext,
    stream: str,
    *,
    subject: str | None = None,
    start_seq: int | None = None,
    start_time: datetime | None = None,
    batch: int = 512,
    fetch_timeout: float = 2.0,
) -> AsyncGenerator[Msg, None]:
    """Every message of ``stream`` (matching ``subject``) from a point to the current end,
    one at a time (see :func:`read_batches`)."""
    # Closing this iterator (a caller that found what it wanted) closes the read at once.
    batches = read_batches(
        js,
        stream,
        subject=subject,
        start_seq=start_seq,
        start_time=start_time,
        batch=batch,
        fetch_timeout=fetch_timeout,
    )
    async with contextlib.aclosing(batches):
        async for messages in batches:
            for message in messages:
                yield message
