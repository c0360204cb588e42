"""How long a worker waits before it starts a task that ended again: growing, capped."""

from __future__ import annotations

import pytest

from projections.worker import RESTART_MAX_SECONDS, restart_delay

pytestmark = pytest.mark.unit


def test_the_delay_doubles_from_half_a_second_up_to_the_cap() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert RESTART_MAX_SECONDS == 10.0


def test_a_task_that_ends_for_ever_waits_the_cap_never_more() -> None:
    assert restart_delay(10_000) == RESTART_MAX_SECONDS
    assert restart_delay(0) == 0.5
