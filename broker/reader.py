"""Reading a stream from any point: an ephemeral, unacknowledged pull consumer.

Used for time travel and history (the registry) and replay. The consumer lives in memory
on the server, acknowledges nothing, and is deleted when the read ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator
from datetime import datetime

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

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
    the batches the server delivered (at most ``batch`` each).

    Ends when the consumer reports nothing pending, so a read of a quiet stream returns
    promptly; messages appended during the read may or may not be included.

    The consumer is deleted as soon as the read ends, however it ends (the last batch, the
    caller closing the iterator early, an error, a cancellation): left to its inactivity
    threshold, each read would hold a consumer on the server for that long, and a burst of
    replays piles them up. Close the iterator (``contextlib.aclosing``) when stopping early
    so this happens at once rather than when it is garbage-collected.
    """
    # Our own name, so the consumer can be deleted by name (pull_subscribe would invent one
    # and keep it in a private attribute).
    name = uuid.uuid4().hex
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        filter_subject=subject,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    if start_seq is not None:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start_seq
    elif start_time is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = start_time
    sub: JetStreamContext.PullSubscription | None = None
    try:
        await js.add_consumer(stream, config=config)
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        info = await sub.consumer_info()
        if info.num_pending == 0:
            return
        while True:
            try:
                messages = await sub.fetch(batch, timeout=fetch_timeout)
            except nats.errors.TimeoutError:
                return
            if messages:
                yield messages
            if not messages or messages[-1].metadata.num_pending == 0:
                return
    finally:
        # First, and without awaiting: a cancelled reader may not get past an await here.
        _forget_consumer(js, stream, name)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


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
