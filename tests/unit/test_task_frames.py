"""``task_frames``: where a suspended task waits, each coroutine it awaits down to the
innermost (what a stop past its deadline writes, and a projection worker's SIGUSR1 logs).
``Task.get_stack`` gave only the outermost."""

from __future__ import annotations

import asyncio

import pytest

from broker._process import task_frames

pytestmark = pytest.mark.unit


async def waits_for_the_lease() -> None:
    await asyncio.Event().wait()


async def applies_a_batch() -> None:
    await waits_for_the_lease()


async def test_every_awaited_coroutine_is_listed_innermost_last() -> None:
    task = asyncio.create_task(applies_a_batch())
    await asyncio.sleep(0)  # suspended in the innermost await
    try:
        frames = task_frames(task)
    finally:
        task.cancel()
    names = [frame.rsplit(" ", 1)[1] for frame in frames]
    assert names[:2] == ["applies_a_batch", "waits_for_the_lease"]
    assert all(frame.startswith(f"{__file__}:") for frame in frames[:2]), frames
    assert names[-1] == "wait"  # asyncio.Event.wait, where it is parked


async def test_a_finished_task_has_no_frames() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    assert task_frames(task) == []
