"""The confidence interval the observability benchmark gives each median: distribution-free
(order statistics), as wide as needed for the confidence asked and no wider."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from benchmarks.observability import median_interval

pytestmark = pytest.mark.unit


def coverage(n: int, k: int) -> float:
    """The chance that the median lies between the k-th smallest and k-th largest of n."""
    outside: float = sum(math.comb(n, j) for j in range(k)) / 2**n  # fewer than k below it
    return 1 - 2 * outside


@pytest.mark.parametrize("n", range(6, 61))
def test_the_interval_covers_the_median_as_asked_and_is_the_narrowest_that_does(n: int) -> None:
    values = [float(i) for i in range(n)]
    random.Random(n).shuffle(values)  # the order they come in does not matter
    low, high = median_interval(values)
    k = int(low) + 1  # values are their own ranks: the k-th smallest is k - 1
    assert high == n - k  # symmetric: the k-th largest
    assert coverage(n, k) >= 0.95
    if k + 1 <= n // 2:
        assert coverage(n, k + 1) < 0.95


def test_known_intervals() -> None:
    assert median_interval([5.0, 1.0, 2.0, 3.0, 4.0, 6.0]) == (1.0, 6.0)  # 6 rounds: 96.9 %
    assert median_interval([float(i) for i in range(1, 13)]) == (3.0, 10.0)  # 12: 96.1 %
    assert median_interval([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_fewer_than_six_values_give_their_whole_range() -> None:
    assert median_interval([2.0]) == (2.0, 2.0)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)


def test_a_lower_confidence_narrows_it() -> None:
    values = [float(i) for i in range(20)]
    narrow, wide = median_interval(values, 0.5), median_interval(values, 0.99)
    assert wide[0] < narrow[0] <= narrow[1] < wide[1]


def test_no_values_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_the_instruction_count_reads_only_the_dumps_asked_for(tmp_path: Path) -> None:
    """``benchmarks/instructions.py`` sums part 1 of each process's and thread's dump (from
    counting on to the dump it asked for), not what ran after it (the stop)."""
    from benchmarks.instructions import counted

    def dump(name: str, part: int, trigger: str, summary: int) -> None:
        (tmp_path / name).write_text(
            f"version: 1\ncreator: callgrind-3.19.0\npid: 1\ncmd:  python\npart: {part}\n\n"
            f"desc: I1 cache: \ndesc: Trigger: {trigger}\n\npositions: line\nevents: Ir\n"
            f"summary: {summary}\n\n\ntotals: {summary}\n"
        )

    dump("cg.100.1", 1, "dump", 1_000)
    dump("cg.100.1-02", 1, "dump", 250)  # another thread of the same process
    dump("cg.100", 2, "Program termination", 7_000)
    dump("cg.101", 1, "Program termination", 9_000)  # a process that never got the request
    assert counted(tmp_path) == {"Ir": 1_250}
    assert counted(tmp_path / "nothing") == {}


def test_by_thread_each_threads_instructions_are_kept_apart(tmp_path: Path) -> None:
    """``--by-thread``: callgrind writes one dump per thread; each is labelled by its
    process's place in pid order and its thread number, and their sum is the total."""
    from benchmarks.instructions import counted, counted_by_thread

    for pid, thread, part, summary in [
        (300, 1, 1, 1_000),  # the worker's event loop
        (300, 3, 1, 400),  # its span export
        (200, 1, 1, 50),  # broker serve
        (300, 3, 2, 9_999),  # after the dump: not counted
    ]:
        (tmp_path / f"cg.{pid}.{part}-{thread:02d}").write_text(
            f"version: 1\ncreator: callgrind-3.19.0\npid: {pid}\ncmd:  python\npart: {part}\n"
            f"thread: {thread}\n\ndesc: Trigger: dump\n\npositions: line\nevents: Ir\n"
            f"summary: {summary}\n"
        )
    assert counted_by_thread(tmp_path) == {"p1/t1": 1_000, "p1/t3": 400, "p0/t1": 50}
    assert counted(tmp_path) == {"Ir": 1_450}


def test_with_the_cache_simulation_every_event_is_summed(tmp_path: Path) -> None:
    """``--cache-sim``: the misses are summed event by event, named by the dump's header
    (callgrind's order is not cachegrind's)."""
    from benchmarks.instructions import counted

    events = "Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw"
    for name, part, summary in [
        ("cg.1.1", 1, "100 40 20 1 3 2 0 1 1"),
        ("cg.1.1-02", 1, "50 10 5 2 1 0 1 0 0"),
        ("cg.1", 2, "7 7 7 7 7 7 7 7 7"),  # after the dump: not counted
    ]:
        (tmp_path / name).write_text(
            f"version: 1\ncreator: callgrind-3.19.0\npid: 1\ncmd:  python\npart: {part}\n\n"
            f"desc: Trigger: dump\n\npositions: line\nevents: {events}\nsummary: {summary}\n"
        )
    assert counted(tmp_path) == {
        "Ir": 150,
        "Dr": 50,
        "Dw": 25,
        "I1mr": 3,
        "D1mr": 4,
        "D1mw": 2,
        "ILmr": 1,
        "DLmr": 1,
        "DLmw": 1,
    }


def test_a_sampled_publish_is_costed_on_the_unsampled_configurations_busiest_thread(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``observability.py --threads`` divides what a traced configuration's event loop thread
    adds over ``traced 0%`` (else ``off``) of its own tree by its sampled publishes."""
    from benchmarks.observability import Config, per_sampled_publish

    def config(name: str, loop: list[float], spans: float) -> Config:
        # "p2/t0" is the event loop; "p2/t3" the export thread, busier only when sampling
        threads = [{"p2/t0": u, "p2/t3": 1.0 + spans * 100} for u in loop]
        return Config(name, {}, threads=threads, spans_per_message=spans)

    cases = [
        config("off", [100.0, 102.0, 98.0], 0.0),
        config("traced 0%", [110.0, 111.0, 109.0], 0.0),
        config("traced 10%", [130.0, 131.0, 129.0], 0.2),
        config("base off", [90.0], 0.0),
        config("base traced 100%", [120.0], 2.0),
    ]
    per_sampled_publish(cases)
    lines = capsys.readouterr().out.splitlines()
    costed = {line.split("  ")[1].strip(): line for line in lines if line.startswith("  ")}
    assert set(costed) == {"traced 10%", "base traced 100%"}
    assert "200.0 us  (p2/t0, against traced 0%)" in costed["traced 10%"]
    assert "30.0 us  (p2/t0, against base off)" in costed["base traced 100%"]
