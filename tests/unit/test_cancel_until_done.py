"""``cancel_until_done``: a task is cancelled again while it runs. nats-py swallows a
cancellation that lands in its flush (``Client._flush_pending``); cancelled once and
awaited, a publisher's connector, a worker's or an agent's connect went on to the next
attempt and the process waited on it until its stop deadline, or for good."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import pytest
from nats.aio.client import DEFAULT_CONNECT_TIMEOUT

from broker.natsconn import cancel_until_done, explain_connect_error

pytestmark = pytest.mark.unit


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    attempts = 0

    async def connect_loop() -> None:
        nonlocal attempts
        while True:
            attempts += 1
            try:  # as nats-py's _flush_pending does
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if attempts == 1:
                    continue
                raise

    task = asyncio.create_task(connect_loop())
    await asyncio.sleep(0.01)
    # Not wait_for: its own cancellation on timeout would cancel the task a second time.
    stopping = asyncio.ensure_future(cancel_until_done(task))
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert stopping in done, "still waiting on a task that swallowed its cancellation"
    assert task.cancelled()
    assert attempts >= 2


async def test_an_error_raised_while_unwinding_is_read_so_asyncio_does_not_log_it() -> None:
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, c: reported.append(c))

    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise OSError("the socket broke while closing") from None

    task = asyncio.create_task(fails_when_cancelled())
    await asyncio.sleep(0)
    await cancel_until_done(task)
    assert task.done()
    assert not task.cancelled()
    del task  # not read here: cancel_until_done read it
    gc.collect()
    assert reported == []  # no "Task exception was never retrieved"


async def test_a_finished_task_is_left_as_it_is() -> None:
    async def answer() -> int:
        return 42

    task = asyncio.create_task(answer())
    await task
    await cancel_until_done(task)
    assert task.result() == 42


def test_a_timeout_names_nats_py_s_connect_timeout_when_none_was_set() -> None:
    message = explain_connect_error(TimeoutError(), {"servers": ["nats://n1:4222"]})
    assert message == f"NATS at nats://n1:4222 did not answer within {DEFAULT_CONNECT_TIMEOUT} s"
    message = explain_connect_error(
        TimeoutError(), {"servers": ["nats://n1"], "connect_timeout": 5}
    )
    assert message.endswith("within 5 s")


async def test_a_task_s_own_cleanup_is_not_cut_short() -> None:
    """Cancelled again every 0.1 s, a ``finally`` that closes a connection (seconds against
    a hung server) was interrupted after 0.1 s."""
    steps: list[str] = []

    async def closes_on_the_way_out() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            steps.append("closing")
            await asyncio.sleep(0.5)
            steps.append("closed")

    task = asyncio.create_task(closes_on_the_way_out())
    await asyncio.sleep(0)
    await cancel_until_done(task)
    assert steps == ["closing", "closed"]
    assert task.cancelled()


async def test_cancelled_while_it_waits_it_cancels_the_task_again_and_stops_waiting() -> None:
    cancels = 0

    async def swallows() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1
                if cancels >= 2:
                    raise

    task = asyncio.create_task(swallows())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(cancel_until_done(task, again=30))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await asyncio.wait({task}, timeout=1)
    assert task.cancelled()  # the second cancel, from the waiter's own cancellation
