"""``broker dev-cluster``'s restart delays (:class:`broker.devcluster.RestartBackoff`): a
process that keeps dying at start is started again less and less often, not at every
check forever."""

from __future__ import annotations

import pytest

from broker.devcluster import RestartBackoff

pytestmark = pytest.mark.unit


def crash_loop(backoff: RestartBackoff, name: str, times: int, *, up: float = 0.1) -> list[float]:
    """``name`` exits ``up`` seconds after each start, ``times`` times; the delays chosen.
    Each start happens as soon as it is due."""
    now, delays = 1000.0, []
    for _ in range(times):
        delay = backoff.exited(name, now)
        assert delay is not None
        delays.append(delay)
        assert not backoff.due(name, now + delay - 0.01)
        now += delay
        assert backoff.due(name, now)
        backoff.started(name, now)
        now += up
    return delays


def test_a_process_that_dies_at_every_start_waits_twice_as_long_each_time_up_to_the_cap() -> None:
    delays = crash_loop(RestartBackoff(first=0.5, cap=30.0), "worker-0", 9)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_process_found_exited_again_before_its_start_keeps_its_first_schedule() -> None:
    """Every check sees it exited until it is started: the delay is chosen (and logged) once."""
    backoff = RestartBackoff(first=0.5)
    assert backoff.exited("n1", 10.0) == 0.5
    assert backoff.exited("n1", 10.3) is None
    assert not backoff.due("n1", 10.4)
    assert backoff.due("n1", 10.5)


def test_the_delay_starts_over_after_the_process_stayed_up() -> None:
    backoff = RestartBackoff(first=0.5, cap=30.0, steady=30.0)
    assert crash_loop(backoff, "router-0", 4) == [0.5, 1.0, 2.0, 4.0]
    # Last started at 1007.8, then up for about a minute: it worked for a while, so it gets
    # the first delay again, not 8 s.
    assert backoff.exited("router-0", 1067.5) == 0.5
    backoff.started("router-0", 1068.0)
    assert backoff.exited("router-0", 1068.1) == 1.0


def test_each_process_has_its_own_delay() -> None:
    backoff = RestartBackoff(first=0.5)
    crash_loop(backoff, "worker-0", 5)
    assert backoff.exited("ingress", 2000.0) == 0.5
    assert backoff.due("worker-0", 0.0)  # nothing is scheduled for it now


def test_a_process_never_seen_to_exit_may_start() -> None:
    assert RestartBackoff().due("n0", 0.0)
