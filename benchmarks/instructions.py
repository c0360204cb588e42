"""Telemetry's cost counted in instructions: the same configurations as ``observability.py``,
each broker run under callgrind, instructions per publish.

``observability.py`` measures CPU time, and on a shared machine its rounds of one
configuration spread by tens of percent: a few points of overhead need many rounds and
still leave wide intervals. Callgrind counts the instructions the broker's processes run in
user space (every thread: the event loop, granian's, the span export), and runs of one tree
agree within about 1.5 %, whatever else the machine is doing (what remains depends on
timing: how many requests one turn of the event loop serves, when the garbage collector
runs). So one run per configuration says where a change of a few percent moves the cost;
a difference of a percent or two is noise here too.

What it leaves out, and CPU time includes: the kernel (socket calls, thread wake-ups; about
a quarter of a loaded worker's time), cache misses, and one thread waiting for another
(callgrind runs one thread at a time). An instruction count is a floor of the overhead,
not the overhead: read it beside ``observability.py``'s.

One distortion the other way: work driven by the clock runs far more often per publish
under callgrind, which slows the broker about fifty-fold. The metrics flush (every 0.5 s)
folds about a hundred publishes there against ten thousand at full speed, so its fixed cost
is counted about a hundred times over: on 2026-11-27 metrics measured +5.5 % over ``off``,
and +2.4 % with the flush moved out of the counted window.

Per configuration: start ``broker serve`` under ``valgrind --tool=callgrind
--trace-children=yes`` with counting off, warm it up, switch counting on
(``callgrind_control -i on``), send ``--messages`` publishes, wait until the round's spans
have been exported (a traced configuration's export is its own cost), dump, stop. Needs
valgrind (Debian's ``valgrind`` package) and h2load for the load. Usage::

    python benchmarks/instructions.py [--messages 4000] [--only off --only metrics ...]
        [--baseline-tree DIR] [--cache-sim [--last-level-bytes N]] [--by-thread] [--keep DIR]
        [--json]

``--baseline-tree DIR`` also runs every configuration from another checkout (an A/B of two
commits; see ``observability.py``).

``--by-thread`` also counts each thread apart (``--separate-threads``) and reports the
busiest ones per configuration: the worker's event loop (the request path, with its
difference from ``off``'s), granian's threads, the span export thread.

With ``traced 0%`` and a sampling configuration among those run, it also reports what one
sampled publish adds over an unsampled one (all threads; the event loop with
``--by-thread``).

``--cache-sim`` also has callgrind simulate the caches and reports the misses per publish:
at the first level (32 KiB of code, 32 KiB of data) and at a last level sized as this
machine's L2 per core (1 MiB; ``--last-level-bytes``), where a miss is a fetch from the
shared L3 or memory. Each process is simulated alone, so the misses other processes cause
on a shared core are not there: again a floor. What it shows is a footprint: code and data
that a sparsely sampled request touches and the requests between two sampled ones do not
are fetched again for each sampled request, which instructions do not show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._h2load import h2load_available, json_payload
from benchmarks.observability import (
    EXPORT_WAIT_S,
    Config,
    Sink,
    _tree,
    configs,
    drive,
    start_broker,
    stored,
    wait_for_export,
    with_baseline,
)
from broker.embedded import NatsServer, ServerSpec
from broker.logs import configure_logging

#: Valgrind is slow: a broker takes tens of seconds to start under it.
READY_TIMEOUT_S = 300.0
WARM_UP = 300


def counted(path: Path) -> dict[str, int]:
    """Each event's total in the dumps callgrind wrote under ``path`` on request (part 1 of
    each process and thread: from counting on to the dump): ``Ir``, the instructions, and
    with ``--cache-sim`` the simulated misses (``I1mr``, ``D1mr``, ``ILmr``, ...)."""
    totals: dict[str, int] = {}
    for _, _, events in _dumps(path):
        for event, value in events.items():
            totals[event] = totals.get(event, 0) + value
    return totals


def counted_by_thread(path: Path) -> dict[str, int]:
    """The instructions of each thread in the dumps under ``path`` (``--by-thread``), as
    ``p<i>/t<n>``: the i-th process by pid (``broker serve`` first, then the worker it
    started), callgrind's thread number n (1: the main thread, which runs the worker's event
    loop; the others in the order they started)."""
    dumps = _dumps(path)
    order = {pid: i for i, pid in enumerate(sorted({pid for pid, _, _ in dumps}))}
    out: dict[str, int] = {}
    for pid, thread, events in dumps:
        label = f"p{order[pid]}/t{thread}"
        out[label] = out.get(label, 0) + events.get("Ir", 0)
    return out


def _dumps(path: Path) -> list[tuple[int, int, dict[str, int]]]:
    """``(pid, thread, totals)`` of each dump on request under ``path`` (one per process,
    or with ``--separate-threads`` one per thread; thread 0 where the dump names none)."""
    found = []
    for dump in sorted(path.glob("cg.*")):
        text = dump.read_text(errors="replace")
        if "\npart: 1\n" not in text or "\ndesc: Trigger: dump\n" not in text:
            continue
        pid = thread = 0
        events: list[str] = []
        totals: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("pid:"):
                pid = int(line.split()[1])
            elif line.startswith("thread:"):
                thread = int(line.split()[1])
            elif line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                totals = {e: int(v) for e, v in zip(events, line.split()[1:], strict=False)}
        found.append((pid, thread, totals))
    return found


#: What ``--cache-sim`` reports per publish: the instruction and data reads and writes that
#: missed the simulated first level (L1) and last level (sized as this machine's L2 by
#: default: what a request fetches from further away).
MISSES = {
    "L1 misses (code)": ("I1mr",),
    "L1 misses (data)": ("D1mr", "D1mw"),
    "L2 misses (code)": ("ILmr",),
    "L2 misses (data)": ("DLmr", "DLmw"),
}


def callgrind_control(option: str, pids: list[int]) -> None:
    for pid in pids:
        subprocess.run(
            ["callgrind_control", option, str(pid)], capture_output=True, check=False, timeout=60
        )


def instructions(
    args: argparse.Namespace,
    config: Config,
    nats_url: str,
    sink: Sink,
    workdir: Path,
    payload: bytes,
) -> dict[str, float]:
    """One configuration's events per publish: ``Ir`` (instructions), and with
    ``--cache-sim`` the simulated misses; with ``--by-thread`` also each thread's
    instructions, as ``Ir@p<i>/t<n>`` (see :func:`counted_by_thread`)."""
    out = workdir / config.key / "callgrind"
    out.mkdir(parents=True)
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}/cg.%p",
    ]
    if args.by_thread:
        valgrind.append("--separate-threads=yes")
    if args.cache_sim:
        valgrind += [
            "--cache-sim=yes",
            "--I1=32768,8,64",
            "--D1=32768,8,64",
            f"--LL={args.last_level_bytes},16,64",
        ]
    broker = start_broker(nats_url, config, workdir, prefix=valgrind, ready_timeout=READY_TIMEOUT_S)
    try:
        url = f"http://127.0.0.1:{broker.port}/v1/publish"
        drive("h2load", f"{url}/ins.warm.{config.key}", payload, WARM_UP, 1, args.concurrency)
        wait_for_export(sink, config, 0, EXPORT_WAIT_S)
        pids = _tree(broker.pid)
        callgrind_control("--instr=on", pids)
        exports = sink.exported(config.key)
        subject = f"ins.run.{config.key}"
        result = drive("h2load", f"{url}/{subject}", payload, args.messages, 1, args.concurrency)
        if result.ok != args.messages:
            raise SystemExit(f"{config.name}: {result.ok}/{args.messages} succeeded")
        count = asyncio.run(stored(nats_url, f"msg.default.{subject}"))
        if count != args.messages:
            raise SystemExit(f"{config.name}: stream holds {count}/{args.messages}")
        wait_for_export(sink, config, exports, EXPORT_WAIT_S)
        callgrind_control("--dump", pids)
        deadline = time.monotonic() + 60
        while not (totals := counted(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        broker.stop()
    if not totals.get("Ir"):
        raise SystemExit(f"{config.name}: callgrind wrote no counts under {out}")
    if args.by_thread:
        totals.update({f"Ir@{label}": n for label, n in counted_by_thread(out).items()})
    return {event: total / int(args.messages) for event, total in totals.items()}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=4000, help="publishes counted")
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=10, help="streams, one connection")
    parser.add_argument("--only", action="append", help="run only these configurations")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run every configuration from this checkout (git worktree add DIR COMMIT, "
        "with the built broker/codecs/_lazy*.so copied in), as 'base <name>'",
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate the caches (callgrind --cache-sim; about twice as slow) and report "
        "the misses per publish: what the code and data a request touches cost to fetch",
    )
    parser.add_argument(
        "--last-level-bytes",
        type=int,
        default=1 << 20,
        help="size of the simulated last level with --cache-sim (default 1 MiB, this machine's "
        "L2 per core: a miss there is a fetch from the shared L3 or memory)",
    )
    parser.add_argument(
        "--by-thread",
        action="store_true",
        help="also count each thread apart (callgrind --separate-threads) and report the "
        "instructions per publish of the busiest: the worker's event loop, granian's threads, "
        "the span export",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep each configuration's callgrind dumps in DIR/<configuration>/callgrind "
        "(an empty or new folder), to break its count down by function with callgrind_annotate",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    keep = args.keep
    if keep is not None and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        parser.error(f"--keep: {keep} is not an empty folder")
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing or not h2load_available():
        parser.error(
            f"needs valgrind and h2load (Debian: valgrind, nghttp2-client); missing: "
            f"{', '.join(missing + ([] if h2load_available() else ['h2load']))}"
        )
    return args


def main() -> None:
    args = _arguments()
    configure_logging("warning")  # the embedded server's debug lines would go to stdout
    sink = Sink()
    cases = [c for c in configs(sink.url) if not args.only or c.name in args.only]
    if args.baseline_tree is not None:
        cases = with_baseline(cases, args.baseline_tree.resolve(), sink.url) + cases
    payload = json_payload(args.payload_bytes)
    events: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(ServerSpec(store_dir=Path(tmp) / "nats")).start()
        workdir = Path(tmp) if args.keep is None else args.keep.resolve()
        try:
            for config in cases:
                events[config.name] = instructions(args, config, server.url, sink, workdir, payload)
                print(
                    f"{config.name:<12} {events[config.name]['Ir']:>10,.0f} instr/msg",
                    file=sys.stderr,
                )
        finally:
            server.stop()
    counts = {name: per_message["Ir"] for name, per_message in events.items()}
    misses = {
        name: {label: sum(per_message.get(e, 0.0) for e in keys) for label, keys in MISSES.items()}
        for name, per_message in events.items()
    }
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    if args.json:
        document: dict[str, Any] = {
            "machine": machine,
            "messages": args.messages,
            "per_message": counts,
        }
        if args.cache_sim:
            document["misses_per_message"] = misses
            document["last_level_bytes"] = args.last_level_bytes
        if args.by_thread:
            document["per_message_by_thread"] = by_thread(events)
        document["per_sampled_publish"] = per_sampled_publish(cases, events)
        print(json.dumps(document))
        return
    print(f"\nInstructions per publish, user space, all the broker's threads ({machine}):")
    header = f"{'configuration':<18}{'instructions':>14}{'vs off':>10}"
    if args.cache_sim:
        header += "".join(f"{label:>20}" for label in MISSES)
    print(header)
    for name, value in counts.items():
        base = counts.get("base off" if name.startswith("base ") else "off")
        ratio = f"{(value / base - 1) * 100:+.1f} %" if base else ""
        row = f"{name:<18}{value:>14,.0f}{ratio:>10}"
        if args.cache_sim:
            row += "".join(f"{misses[name][label]:>20,.1f}" for label in MISSES)
        print(row)
    if args.cache_sim:
        print(
            f"(misses per publish, simulated: L1 32 KiB code and data, last level "
            f"{args.last_level_bytes:,} bytes, each process alone)"
        )
    if args.by_thread:
        print_threads(events)
    print_sampled(per_sampled_publish(cases, events))


def per_sampled_publish(
    cases: list[Config], events: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """What one sampled publish adds over an unsampled one, for each configuration that
    samples, against the same tree's ``traced 0%`` when it ran: over all threads, and (with
    ``--by-thread``) on the worker's event loop, the busiest main thread. This is where a
    change to the sampled path shows first (on 2026-11-29 a card scan added to it took the
    event loop's share from 19 600 to 33 000)."""
    threads_of = by_thread(events)
    found: dict[str, dict[str, float]] = {}
    for case in cases:
        if not case.sampled:
            continue
        unsampled = ("base " if case.name.startswith("base ") else "") + "traced 0%"
        if unsampled not in events:
            continue
        row = {"all threads": (events[case.name]["Ir"] - events[unsampled]["Ir"]) / case.sampled}
        mains = {k: v for k, v in threads_of.get(unsampled, {}).items() if k.endswith("/t1")}
        loop = max(mains, key=mains.__getitem__, default=None)
        if loop is not None and loop in threads_of[case.name]:
            added = threads_of[case.name][loop] - mains[loop]
            row["event loop"] = added / case.sampled
        found[case.name] = row
    return found


def print_sampled(found: dict[str, dict[str, float]]) -> None:
    if not found:
        return
    print(
        "\nInstructions a sampled publish adds over an unsampled one (against the same tree's "
        "traced 0%, divided by the sampled share: at 10 % ten times the noise of the "
        "difference):"
    )
    for name, row in found.items():
        print(f"  {name:<18}" + "  ".join(f"{k} {v:>9,.0f}" for k, v in row.items()))


def by_thread(events: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each configuration's instructions per publish by thread label (its ``Ir@`` events)."""
    return {
        name: {k.removeprefix("Ir@"): v for k, v in per_message.items() if k.startswith("Ir@")}
        for name, per_message in events.items()
    }


#: Threads shown per configuration by ``--by-thread``.
SHOWN_THREADS = 4


def print_threads(events: dict[str, dict[str, float]]) -> None:
    """Each configuration's busiest threads, instructions per publish; a main thread's also
    as the difference from ``off``'s. (The other threads are numbered in the order they
    started, and a traced worker starts its span export before granian's threads, so the same
    number is not the same thread in two configurations.)"""
    print(
        "\nInstructions per publish by thread (p<i>: the i-th process by pid, broker serve "
        "first; t<n>: callgrind's thread number in start order, t1 the main thread, the "
        "worker's event loop):"
    )
    threads_of = by_thread(events)
    for name, threads in threads_of.items():
        base = threads_of.get("base off" if name.startswith("base ") else "off", {})
        busiest = sorted(threads.items(), key=lambda item: -item[1])[:SHOWN_THREADS]
        cells = []
        for label, value in busiest:
            main = label.endswith("/t1") and label in base and base is not threads
            delta = f" ({value - base[label]:+,.0f})" if main else ""
            cells.append(f"{label} {value:>9,.0f}{delta}")
        print(f"  {name:<16}" + "  ".join(cells))


if __name__ == "__main__":
    main()
