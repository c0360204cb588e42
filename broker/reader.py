"""Reading a stream from any point: an ephemeral, unacknowledged pull consumer.

Used for time travel and history (the registry) and, later, replay. The consumer lives in
memory on the server, acknowledges nothing, and is removed when the read ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


async def read_batches(
    js: JetStreamContext,
    stream: str,
    *,
    subject: str | None = None,
    start_seq: int | None = None,
    start_time: datetime | None = None,
    batch: int = 512,
    fetch_timeout: float = 2.0,
) -> AsyncIterator[list[Msg]]:
    """Every message of ``stream`` (matching ``subject``) from a point to the current end, in
    the batches the server delivered (at most ``batch`` each).

    Ends when the consumer reports nothing pending, so a read of a quiet stream returns
    promptly; messages appended during the read may or may not be included.
    """
    config = ConsumerConfig(
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
    sub = await js.pull_subscribe(subject or ">", stream=stream, config=config)
    try:
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
) -> AsyncIterator[Msg]:
    """Every message of ``stream`` (matching ``subject``) from a point to the current end,
    one at a time (see :func:`read_batches`)."""
    async for messages in read_batches(
        js,
        stream,
        subject=subject,
        start_seq=start_seq,
        start_time=start_time,
        batch=batch,
        fetch_timeout=fetch_timeout,
    ):
        for message in messages:
            yield message
