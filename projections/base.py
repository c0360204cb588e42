"""What a projection is: a name, the stream it follows, and a pure-ish ``apply(batch, tx)``.

A projection turns stored messages into state. The runtime (:mod:`projections.runtime`)
hands it :class:`Event` batches in stream order and a transaction handle; whatever the
projection writes through that handle commits together with the projection's checkpoint
(the last stream sequence applied), so a crash can never apply a batch twice or skip one.

Work is split by **partition**: ``partition_of(key, count)`` maps an event's partition key
(tenant + subject by default) to one of ``count`` partitions with a stable hash, so every
event of one key is applied by one worker, in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from nats.aio.msg import Msg


@dataclass(frozen=True, slots=True)
class Event:
    """A stored message as a projection sees it."""

    stream: str
    seq: int
    subject: str
    time: datetime | None
    headers: Mapping[str, str]
    data: bytes

    @classmethod
    def from_msg(cls, message: Msg) -> Event:
        meta = message.metadata
        return cls(
            stream=meta.stream,
            seq=meta.sequence.stream,
            subject=message.subject,
            time=meta.timestamp,
            headers=dict(message.headers or {}),
            data=message.data,
        )

    @property
    def partition_key(self) -> str:
        """Tenant + subject: the unit whose order a partitioned projection keeps."""
        return self.subject


def partition_of(key: str, count: int) -> int:
    """A stable partition for ``key`` among ``count`` (the same in every process and
    version: Python's ``hash`` is salted per process, so it cannot be used)."""
    if count <= 1:
        return 0
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@runtime_checkable
class Projection(Protocol):
    """A named fold of one stream into state.

    ``stream`` and ``subjects`` say what it reads; ``partitions`` how many ways its work may
    be split across workers (1: never split). ``apply`` must be deterministic for a batch
    and write only through ``tx`` (its transaction: a SQLAlchemy ``Connection`` for SQL
    checkpoint stores); it raises to refuse a batch, and the runtime retries the events
    one by one to find the poison one.
    """

    name: str
    stream: str
    subjects: Sequence[str]
    partitions: int

    def setup(self, tx: Any) -> None:
        """Create what the projection writes to (idempotent)."""
        ...

    def apply(self, batch: Sequence[Event], tx: Any) -> None:
        """Apply ``batch`` (stream order, one partition's events or all) inside ``tx``."""
        ...

    def reset(self, tx: Any) -> None:
        """Drop everything the projection wrote (for a rebuild from the stream's start)."""
        ...
