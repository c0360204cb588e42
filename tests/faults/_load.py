"""Publish load through the real ingress, as a careful client sends it.

Each client publishes over HTTP/2 (httpx, prior knowledge) one message at a time, every
message with its own ``Idempotency-Key`` and a payload ``{"id": key, …}``. A retryable
failure (502/503/504, a timeout, a refused or broken connection) is retried with the *same*
key and body until it is acknowledged; what the client saw is counted by kind. A probe
measures how long publishing stays unavailable after a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import httpx
import orjson

#: What a well-behaved client retries (with the same Idempotency-Key).
RETRYABLE_STATUS = frozenset({502, 503, 504})
#: The ingress answers within its publish timeout (5 s); this leaves room.
REQUEST_TIMEOUT = 10.0
#: A message not acknowledged this long after its first try counts as given up.
MESSAGE_DEADLINE = 90.0


@dataclass
class LoadResult:
    """What the clients saw."""

    #: idempotency key -> the stream sequence its (last) acknowledgement named
    acked: dict[str, int] = field(default_factory=dict)
    #: idempotency key -> when (monotonic) it was acknowledged
    acked_at: dict[str, float] = field(default_factory=dict)
    #: acknowledgements with ``duplicate: true``: a retry of a message already stored
    duplicate_acks: int = 0
    #: retryable failures by kind (``503 publish_timeout``, ``ConnectError`` …)
    retryable: Counter[str] = field(default_factory=Counter)
    #: every other failure (a 500, a 4xx): there must be none
    other: Counter[str] = field(default_factory=Counter)
    #: keys never acknowledged
    given_up: list[str] = field(default_factory=list)

    def record(self, key: str, body: dict[str, object]) -> None:
        self.acked[key] = int(str(body["seq"]))
        self.acked_at[key] = time.monotonic()
        self.duplicate_acks += bool(body.get("duplicate"))


async def _attempt(
    http: httpx.AsyncClient, subject: str, key: str, body: bytes
) -> str | dict[str, object]:
    """One try: the ack body, or the kind of failure (``"<status> <error_code>"`` or the
    transport error's class name)."""
    try:
        response = await http.post(
            f"/v1/publish/{subject}",
            content=body,
            headers={"Idempotency-Key": key, "Content-Type": "application/json"},
        )
    except httpx.TransportError as e:
        return type(e).__name__
    if response.status_code == 200:
        ack: dict[str, object] = response.json()
        return ack
    try:
        code = response.json().get("error_code", "?")
    except ValueError:
        code = "not-json"
    return f"{response.status_code} {code}"


def _retryable(kind: str) -> bool:
    status = kind.split(" ", 1)[0]
    return not status.isdigit() or int(status) in RETRYABLE_STATUS


class PublishLoad:
    """``clients`` concurrent publishers on ``faults.<scenario>`` until :meth:`stop`.

    ``async with PublishLoad(url, "leader_kill") as load: ...`` starts and stops them.
    """

    def __init__(
        self, base_url: str, scenario: str, *, clients: int = 4, interval: float = 0.1
    ) -> None:
        self.base_url = base_url
        self.scenario = scenario
        self.subject = f"faults.{scenario}"
        self.clients = clients
        self.interval = interval
        self.result = LoadResult()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self._tasks = [
            asyncio.create_task(self._client(c), name=f"client-{c}") for c in range(self.clients)
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.stop()
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> LoadResult:
        """Let every client finish the message it is on (acked or given up), then return."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        return self.result

    async def wait_acked(self, count: int, timeout: float) -> None:
        """Wait until ``count`` messages in all are acknowledged."""
        deadline = time.monotonic() + timeout
        while len(self.result.acked) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.result.acked)} of {count} messages acknowledged after "
                    f"{timeout} s; client errors {dict(self.result.retryable)} "
                    f"{dict(self.result.other)}"
                )
            for task in self._tasks:
                if task.done():
                    task.result()  # a client that crashed raises here
            await asyncio.sleep(0.05)

    async def _client(self, client: int) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url, http1=False, http2=True, timeout=REQUEST_TIMEOUT
        ) as http:
            n = 0
            while not self._stopping.is_set():
                key = f"{self.scenario}-c{client}-{n}"
                body = orjson.dumps({"id": key, "client": client, "n": n})
                await self._publish(http, key, body)
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def _publish(self, http: httpx.AsyncClient, key: str, body: bytes) -> None:
        """Until acknowledged: retry what is retryable with the same key, give up on the
        rest (a 4xx) or at the deadline."""
        deadline = time.monotonic() + MESSAGE_DEADLINE
        delay = 0.05
        while True:
            outcome = await _attempt(http, self.subject, key, body)
            if isinstance(outcome, dict):
                self.result.record(key, outcome)
                return
            if _retryable(outcome):
                self.result.retryable[outcome] += 1
            else:
                self.result.other[outcome] += 1
                if int(outcome.split(" ", 1)[0]) < 500:
                    self.result.given_up.append(key)
                    return
            if time.monotonic() > deadline:
                self.result.given_up.append(key)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def time_to_recover(
    base_url: str, scenario: str, since: float, *, every: float = 0.2, timeout: float = 60.0
) -> tuple[float, LoadResult]:
    """Seconds from ``since`` until a publish *begun* after it is acknowledged: a probe is
    started every ``every`` seconds (each with a new key, never retried) until one is.

    Also returns the probes' acknowledgements, which the loss check counts like any other.
    """
    probes = LoadResult()
    recovered = asyncio.Event()
    subject = f"faults.{scenario}.probe"
    async with httpx.AsyncClient(
        base_url=base_url, http1=False, http2=True, timeout=REQUEST_TIMEOUT
    ) as http:

        async def probe(n: int) -> None:
            key = f"{scenario}-probe-{n}"
            outcome = await _attempt(http, subject, key, orjson.dumps({"id": key}))
            if isinstance(outcome, dict):
                probes.record(key, outcome)
                recovered.set()
            elif _retryable(outcome):
                probes.retryable[outcome] += 1
            else:
                probes.other[outcome] += 1

        tasks: list[asyncio.Task[None]] = []
        n = 0
        while not recovered.is_set():
            if time.monotonic() - since > timeout:
                raise AssertionError(f"no publish succeeded within {timeout} s of the fault")
            tasks.append(asyncio.create_task(probe(n)))
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recovered.wait(), every)
        first = min(probes.acked_at.values())
        # Probes still waiting are not needed: a cancelled one is simply not acknowledged.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return first - since, probes
