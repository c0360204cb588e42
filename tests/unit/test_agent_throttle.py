"""The agent's NATS error lines: one per text and interval, with a count of those held."""

from __future__ import annotations

import time

import pytest

from broker.natsconn import LogThrottle


def test_one_line_per_text_and_interval_with_the_count_held_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    throttle = LogThrottle(10.0)
    assert throttle.admit("denied a") == 0
    assert [throttle.admit("denied a") for _ in range(3)] == [None, None, None]
    assert throttle.admit("denied b") == 0  # another text is let through at once
    now[0] += 10.0
    assert throttle.admit("denied a") == 3
    assert throttle.admit("denied a") is None
