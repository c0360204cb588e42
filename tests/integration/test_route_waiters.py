"""The subjects the ingress waits on for a decision or a reply cannot be guessed: they are
stored in the routed message, and the inbox is shared by every tenant."""

from __future__ import annotations

import asyncio

import pytest

from broker.http.route import RouteWaiters
from broker.publisher import Publisher

pytestmark = pytest.mark.integration


async def test_waited_on_subjects_are_random_and_each_hears_its_own_answer(
    publisher: Publisher,
) -> None:
    waiters = RouteWaiters(publisher)
    handed = [await waiters.expect() for _ in range(200)]
    subjects = [subject for subject, _ in handed]
    tokens = [s.rsplit(".", 1)[1] for s in subjects]
    assert len(set(tokens)) == 200
    assert all(len(t) >= 16 and not t.isdigit() for t in tokens)
    await publisher.nc.publish(subjects[7], b"seven")
    await publisher.nc.publish(subjects[0] + "x", b"a guess")
    message = await asyncio.wait_for(handed[7][1], 5)
    assert message.data == b"seven"
    assert not handed[0][1].done()
    for subject in subjects:
        waiters.forget(subject)
