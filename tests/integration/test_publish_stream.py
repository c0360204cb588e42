"""A streamed publish's writer against a real server: a resent stream's duplicates are
checked side by side, at most ``_CHECKS_AT_ONCE`` at a time, their lines in record order.

The HTTP side is an in-memory stand-in for granian's protocol object (the body's chunks in,
the ack lines out); ``tests/e2e/test_streaming.py`` runs the same over real HTTP/2.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from broker import auth
from broker.envelope import Outbound
from broker.http import publish
from broker.http.state import IngressState
from broker.publisher import PublishAck, Publisher
from broker.settings import Settings


class _Stream:
    """One streamed request: its body's chunks, and the lines the ingress writes back."""

    def __init__(self, body: bytes) -> None:
        self.chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        self.lines: list[dict[str, Any]] = []

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._body()

    async def _body(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> _Stream:
        assert status == 200
        return self

    async def send_bytes(self, data: bytes) -> None:
        self.lines.append(orjson.loads(data))


async def stream(publisher: Publisher, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    auth.bind(auth.Principal("test", ("default",), frozenset()), "default")
    body = b"".join(orjson.dumps(r) + b"\n" for r in records)
    request = _Stream(body)
    state = IngressState(Settings(), publisher)
    await publish._DuplexPublish(state, "stream.checks").run(request)  # type: ignore[arg-type]
    assert [line["index"] for line in request.lines] == list(range(len(records)))
    return request.lines


def keyed(run: str, count: int, data: Callable[[int], Any] = lambda i: i) -> list[dict[str, Any]]:
    return [{"idempotency_key": f"{run}-{i}", "data": data(i)} for i in range(count)]


Check = Callable[[Outbound, PublishAck], Awaitable[PublishAck]]


def watch_checks(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch, hold: asyncio.Event
) -> list[int]:
    """Make each duplicate's check wait for ``hold``; returns the number of checks in flight,
    recorded as each one starts."""
    in_flight: list[int] = []
    running = 0
    check: Check = publisher.same_request

    async def held(out: Outbound, ack: PublishAck) -> PublishAck:
        nonlocal running
        running += 1
        in_flight.append(running)
        try:
            await hold.wait()
            return await check(out, ack)
        finally:
            running -= 1

    monkeypatch.setattr(publisher, "same_request", held)
    return in_flight


async def test_a_resent_streams_checks_run_side_by_side_in_order(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = uuid.uuid4().hex[:8]
    first = await stream(publisher, keyed(run, 10))
    assert [line["duplicate"] for line in first] == [False] * 10

    hold = asyncio.Event()
    in_flight = watch_checks(publisher, monkeypatch, hold)
    changed = {3, 8}
    again = keyed(run, 10, lambda i: {"changed": i} if i in changed else i)
    resend = asyncio.create_task(stream(publisher, again))
    for _ in range(200):  # every check starts while none has finished
        if len(in_flight) == 10:
            break
        await asyncio.sleep(0.01)
    assert max(in_flight) == 10
    hold.set()
    lines = await resend
    for i, line in enumerate(lines):
        if i in changed:
            assert line["error_code"] == "idempotency_key_reused"
        else:
            assert (line["duplicate"], line["seq"]) == (True, first[i]["seq"])


async def test_at_most_so_many_checks_run_at_once(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = uuid.uuid4().hex[:8]
    count = publish._CHECKS_AT_ONCE + 8
    await stream(publisher, keyed(run, count))
    hold = asyncio.Event()
    in_flight = watch_checks(publisher, monkeypatch, hold)
    resend = asyncio.create_task(stream(publisher, keyed(run, count)))
    for _ in range(200):
        if len(in_flight) >= publish._CHECKS_AT_ONCE:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # time for more to start, were any allowed to
    assert len(in_flight) == publish._CHECKS_AT_ONCE
    hold.set()
    lines = await resend
    assert max(in_flight) == publish._CHECKS_AT_ONCE
    assert len(in_flight) == count
    assert all(line["duplicate"] for line in lines)


async def test_a_check_that_fails_unexpectedly_fails_its_record_alone(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = uuid.uuid4().hex[:8]
    await stream(publisher, keyed(run, 4))
    check: Check = publisher.same_request

    async def broken_on_the_third(out: Outbound, ack: PublishAck) -> PublishAck:
        if out.headers.get("Nats-Msg-Id", "").endswith(f"{run}-2"):
            raise RuntimeError("a bug")
        return await check(out, ack)

    monkeypatch.setattr(publisher, "same_request", broken_on_the_third)
    lines = await stream(publisher, [*keyed(run, 4), {"data": "new"}])
    assert [line.get("error_code") for line in lines] == [None, None, "internal_error", None, None]
    assert [line.get("duplicate") for line in lines] == [True, True, None, True, False]
