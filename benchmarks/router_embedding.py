"""Router throughput with a neural embedder: a batch per call against one text at a time.

A router with a costly embedder (:func:`broker.routing.embedder.costly`) embeds the texts
of each fetched batch in one call on a worker thread (``Scorer.embed_ahead``). This
measures what that buys, in one run and on one nats-server:

- ``one at a time``: the router as it was before, each message's text embedded when its
  decision is made while the event loop waits (the same router with the batch step left
  out);
- ``batched``: the router as it is;
- ``model alone``: the raw baseline, ``embed`` of the same texts in chunks of the router's
  fetch size (256), with no NATS and no decisions: the most a router could do.

Each run is a process of its own (the model loaded before the clock starts). It publishes
``--messages`` distinct texts (the text requests of the dev set of ``benchmarks/routing.py``,
numbered) with ``Broker-Route-Mode: auto`` to a fresh nats-server, registers the fleet of
``benchmarks/routing_quality/agents.yaml`` and times one router from its start until every
message is routed; the agents' catalog is embedded before the clock starts. The three run
in a rotated order each round. It also records the longest
stall of the router's event loop (a task that wakes every 5 ms and notes how late it
is), which is how long acks, load reports and registry changes wait.

The embedder is the built-in default (all-MiniLM-L6-v2 in NumPy) unless ``--embedder SPEC``
names another; ``--model DIR`` is ``--embedder sentence-transformers:DIR`` (the
``embeddings`` extra and a local model)::

    python benchmarks/router_embedding.py [--embedder minilm] [--messages 512]
    python benchmarks/router_embedding.py --model /path/to/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.routing import DEV  # noqa: E402
from broker.embedded import NatsServer, ServerSpec  # noqa: E402
from broker.envelope import Outbound, Tenant  # noqa: E402
from broker.logs import configure_logging  # noqa: E402
from broker.publisher import Publisher  # noqa: E402
from broker.registry.commands import put_agent  # noqa: E402
from broker.registry.manifest import AgentManifest  # noqa: E402
from broker.registry.snapshot import RegistryView  # noqa: E402
from broker.routing import Scorer  # noqa: E402
from broker.routing.embedder import Embedder, load_embedder  # noqa: E402
from broker.routing.events import H_ROUTE_MODE, ROUTE_MODE_AUTO  # noqa: E402
from broker.routing.load import LoadView  # noqa: E402
from broker.routing.policy import Policy  # noqa: E402
from broker.routing.router import _BATCH, Router  # noqa: E402
from broker.settings import Settings  # noqa: E402
from broker.streams import provision  # noqa: E402

TENANT = Tenant("bench")
POLICY = Policy(require_live=False)
TICK_S = 0.005
MODES = ["one at a time", "batched", "model alone"]


class OneAtATime(Router):
    """The router without its batch step: each text embedded when its decision is made."""

    async def _embed_ahead(self, batch: Sequence[Msg]) -> None:
        return None


def texts(count: int) -> list[str]:
    plain = [body for _, kind, body, _ in DEV if kind == "text/plain"]
    plain += [text for *_, text in DEV if text]
    return [f"{plain[i % len(plain)]} (ticket {i})" for i in range(count)]


async def stall_watch(longest: list[float]) -> None:
    """Note the longest delay past a 5 ms sleep: how long the event loop was held."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(TICK_S)
        longest[0] = max(longest[0], time.perf_counter() - before - TICK_S)


async def ready_router(
    url: str, embedder: Embedder, router_class: type[Router] = Router
) -> tuple[Publisher, Router]:
    """A connected router whose registry view has caught up and whose catalog is built (the
    agents embedded before any clock starts)."""
    publisher = Publisher([url])
    publisher.start()
    await publisher.wait_connected(10)
    registry = RegistryView()
    await registry.start(publisher.js)
    scorer = Scorer(embedder, POLICY)
    scorer.catalogs.get(registry.snapshot, TENANT)
    return publisher, router_class(publisher, scorer, POLICY, registry, LoadView())


async def route_all(
    store: Path, embedder: Embedder, router_class: type[Router], bodies: list[str]
) -> tuple[float, float]:
    """Seconds for one router to route ``bodies`` on a fresh server; the longest stall."""
    server = await fleet_server(store, bodies)
    try:
        publisher, router = await ready_router(server.url, embedder, router_class)
        stop = asyncio.Event()
        longest = [0.0]
        started = time.perf_counter()
        watch = asyncio.create_task(stall_watch(longest))
        running = asyncio.create_task(router.run(stop))
        while router.stats.routed + router.stats.dead_lettered < len(bodies):
            if running.done():
                running.result()
                raise SystemExit("the router stopped early")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(running, 10)
        await publisher.close()
        return elapsed, longest[0]
    finally:
        server.stop()


async def fleet_server(store: Path, bodies: list[str]) -> NatsServer:
    """A fresh nats-server with the streams, the fleet registered and ``bodies`` stored."""
    server = NatsServer(ServerSpec(store)).start()
    nc = await nats.connect(server.url)
    await provision(nc.jetstream(), Settings())
    await nc.close()
    publisher = Publisher([server.url])
    publisher.start()
    await publisher.wait_connected(10)
    fleet = yaml.safe_load((ROOT / "benchmarks/routing_quality/agents.yaml").read_text())
    for manifest in fleet["agents"]:
        await put_agent(publisher, TENANT, AgentManifest.model_validate(manifest))
    auto = {H_ROUTE_MODE: ROUTE_MODE_AUTO, "Content-Type": "text/plain"}
    pending = [
        await publisher.submit(Outbound(f"msg.{TENANT}.ask", body.encode(), dict(auto)))
        for body in bodies
    ]
    await asyncio.gather(*pending)
    await publisher.close()
    return server


async def router_child(args: argparse.Namespace) -> None:
    """One router process of a scaling run: ready (model loaded, catalog built), then routes
    from the line "go" on stdin until SIGTERM."""
    publisher, router = await ready_router(args.router_child, load_embedder(args.embedder))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await router.run(stop)
    await publisher.close()


async def wait_decided(url: str, count: int, timeout: float = 600.0) -> None:
    """Until ``count`` decisions are stored (routed to an inbox, or dead-lettered)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            routes = (await js.stream_info("ROUTES")).state.messages
            if routes + (await js.stream_info("DLQ")).state.messages >= count:
                return
            await asyncio.sleep(0.02)
        raise SystemExit(f"{count} decisions were not stored in {timeout:g} s")
    finally:
        await nc.close()


def scaled_run(args: argparse.Namespace, routers: int, blas: str | None, round_: int) -> float:
    """Messages per second for ``routers`` router processes sharing the work."""
    bodies = [f"{body} r{round_}" for body in texts(args.messages)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OTEL_"))}
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = blas
    with tempfile.TemporaryDirectory(prefix="router-scaling-") as tmp:
        server = asyncio.run(fleet_server(Path(tmp), bodies))
        command = [sys.executable, __file__, "--embedder", args.embedder or ""]
        children = [
            subprocess.Popen(
                [*command, "--router-child", server.url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(routers)
        ]
        try:
            for child in children:
                assert child.stdout is not None
                if child.stdout.readline().strip() != "ready":
                    raise SystemExit("a router child did not start")
            started = time.perf_counter()
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            asyncio.run(wait_decided(server.url, len(bodies)))
            return len(bodies) / (time.perf_counter() - started)
        finally:
            for child in children:
                child.terminate()
            for child in children:
                child.wait(30)
            server.stop()


SCALING = [
    ("1 router", 1, None),
    ("2 routers", 2, None),
    ("2 routers, 1 BLAS thread each", 2, "1"),
]


def measure_scaling(args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, list[float]] = {name: [] for name, *_ in SCALING}
    for round_ in range(args.rounds):
        for shift in range(len(SCALING)):
            name, routers, blas = SCALING[(round_ + shift) % len(SCALING)]
            rate = scaled_run(args, routers, blas, round_)
            rates[name].append(rate)
            print(f"round {round_ + 1} {name:30} {rate:8.1f} msgs/s", flush=True)
    return summary(args, rates)


def summary(args: argparse.Namespace, rates: dict[str, list[float]]) -> dict[str, Any]:
    """What every report starts with: the run and each configuration's median rate."""
    return {
        "embedder": load_embedder(args.embedder).name,
        "messages": args.messages,
        "rounds": args.rounds,
        "msgs_per_s": {name: round(statistics.median(r), 1) for name, r in rates.items()},
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}",
    }


def model_alone(embedder: Embedder, bodies: list[str]) -> float:
    embedder.embed(bodies[:8])  # warm up
    started = time.perf_counter()
    for i in range(0, len(bodies), _BATCH):
        embedder.embed(bodies[i : i + _BATCH])
    return time.perf_counter() - started


async def one_run(args: argparse.Namespace) -> dict[str, float | None]:
    """One mode's run in this process: messages per second and the longest stall."""
    # No warm-up call here: the router's scorer runs the model on a thread of its own, and a
    # model used from two threads of a process ran single texts at half speed. The agents'
    # catalog, embedded before the clock starts, warms the model up on that thread.
    embedder = load_embedder(args.embedder)
    bodies = [f"{body} r{args.round}" for body in texts(args.messages)]
    if args.run == "model alone":
        return {"rate": len(bodies) / model_alone(embedder, bodies), "stall": None}
    router_class = OneAtATime if args.run == "one at a time" else Router
    with tempfile.TemporaryDirectory(prefix="router-embedding-") as tmp:
        seconds, stall = await route_all(Path(tmp), embedder, router_class, bodies)
    return {"rate": len(bodies) / seconds, "stall": stall}


def run_in_process(args: argparse.Namespace, mode: str, round_: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--messages", str(args.messages)]
    command += ["--embedder", args.embedder or ""]
    command += ["--run", mode, "--round", str(round_)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {mode!r} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    stalls: dict[str, list[float]] = {m: [] for m in MODES[:2]}
    for round_ in range(args.rounds):
        for shift in range(len(MODES)):
            mode = MODES[(round_ + shift) % len(MODES)]
            result = run_in_process(args, mode, round_)
            rates[mode].append(result["rate"])
            note = ""
            if result["stall"] is not None:
                stalls[mode].append(result["stall"])
                note = f"  longest loop stall {result['stall'] * 1000:7.1f} ms"
            print(f"round {round_ + 1} {mode:14} {result['rate']:8.1f} msgs/s{note}", flush=True)
    median = {m: statistics.median(r) for m, r in rates.items()}
    return {
        **summary(args, rates),
        "batched_vs_one_at_a_time": round(median["batched"] / median["one at a time"], 2),
        "batched_vs_model_alone": round(median["batched"] / median["model alone"], 2),
        "longest_stall_ms": {m: round(max(s) * 1000, 1) for m, s in stalls.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--embedder", help="embedder spec (default: the built-in default)")
    parser.add_argument("--model", help="a local sentence-transformers model directory")
    parser.add_argument("--messages", type=int, default=512, help="routed messages per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: 1 router against 2 router processes (with and without one BLAS "
        "thread each) sharing the work",
    )
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)  # one run, in a child
    parser.add_argument("--router-child", help=argparse.SUPPRESS)  # a scaling run's router
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        args.embedder = f"sentence-transformers:{args.model}"
    if args.run:
        configure_logging("critical")
        print(json.dumps(asyncio.run(one_run(args))))
        return
    if args.router_child:
        configure_logging("critical")
        asyncio.run(router_child(args))
        return
    if args.scaling:
        configure_logging("warning")
        scaling = measure_scaling(args)
        print(json.dumps(scaling, indent=2))
        return
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\nrouter with {result['embedder']}, {args.messages} messages x {args.rounds} rounds")
    for mode, rate in result["msgs_per_s"].items():
        stall = result["longest_stall_ms"].get(mode)
        tail = f"   longest loop stall {stall} ms" if stall is not None else ""
        print(f"  {mode:14} {rate:8.1f} msgs/s{tail}")
    print(f"  batched / one at a time: {result['batched_vs_one_at_a_time']}x")
    print(f"  batched / model alone:   {result['batched_vs_model_alone']}x")
    print(f"  {result['machine']}")


if __name__ == "__main__":
    main()
