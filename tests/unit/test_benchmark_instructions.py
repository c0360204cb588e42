"""What the instruction benchmark reads from callgrind's dumps: only the counted part of each
process and thread (the dump it asked for), every event named in the dump's header."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.instructions import counted

pytestmark = pytest.mark.unit


def dump(path: Path, name: str, *, part: int, trigger: str, events: str, summary: str) -> None:
    (path / name).write_text(
        f"version: 1\ncreator: callgrind\npid: 1\ncmd: python\npart: {part}\n\n"
        f"desc: Trigger: {trigger}\n\npositions: line\nevents: {events}\n"
        f"summary: {summary}\n\nfl=(1) x.c\nfn=(1) f\n1 1\n"
    )


def test_the_counted_parts_are_summed_event_by_event(tmp_path: Path) -> None:
    events = "Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw"
    dump(tmp_path, "cg.1", part=1, trigger="dump", events=events, summary="100 1 0 40 3 1 20 2 1")
    dump(tmp_path, "cg.2-02", part=1, trigger="dump", events=events, summary="50 2 1 10 1 0 5 0 0")
    # not what was asked for: the rest of a run after the dump, and a program's exit
    dump(tmp_path, "cg.1.2", part=2, trigger="dump", events=events, summary="7 7 7 7 7 7 7 7 7")
    dump(tmp_path, "cg.3", part=1, trigger="Program termination", events=events, summary="9 9")
    assert counted(tmp_path) == {
        "Ir": 150,
        "I1mr": 3,
        "ILmr": 1,
        "Dr": 50,
        "D1mr": 4,
        "DLmr": 1,
        "Dw": 25,
        "D1mw": 2,
        "DLmw": 1,
    }


def test_without_the_cache_simulation_there_are_instructions_only(tmp_path: Path) -> None:
    dump(tmp_path, "cg.1", part=1, trigger="dump", events="Ir", summary="123")
    assert counted(tmp_path) == {"Ir": 123}
    assert counted(tmp_path / "nothing") == {}
