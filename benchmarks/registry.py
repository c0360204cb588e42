"""Registry benchmark: snapshot reads under a writer, and append-to-visible latency.

1. Lookups/s of ``RegistryView.snapshot.get`` while another task keeps updating agents,
   against a plain ``dict`` lookup of the same keys in the same run (target >= 0.5x).
2. Time from a registry write (``put_agent`` called) to the change being visible in the
   snapshot of *another process* following the stream: p50/p99.
3. With ``--as-of-pages``: the time to list every page of the registry ``as_of`` the stream's
   last seq, as ``GET /v1/agents?as_of=`` does, with the registries rebuilt kept for the next
   pages against rebuilding the history for each page (the path before they were kept).

Usage: ``python benchmarks/registry.py [--agents 1000] [--updates 300] [--as-of-pages]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.embedded import NatsServer, ServerSpec  # noqa: E402
from broker.envelope import Tenant  # noqa: E402
from broker.http.agents import MAX_LIST_PAGE, MAX_PAGE_BYTES  # noqa: E402
from broker.publisher import Publisher  # noqa: E402
from broker.registry.commands import put_agent, registry_as_of  # noqa: E402
from broker.registry.manifest import AgentManifest  # noqa: E402
from broker.registry.pages import agent_page  # noqa: E402
from broker.registry.snapshot import RebuiltRegistries, RegistryView  # noqa: E402
from broker.settings import Settings  # noqa: E402
from broker.streams import provision  # noqa: E402

T = Tenant("bench")
YIELD_EVERY = 1000

_WATCHER = """
import asyncio, sys, time
import nats
from broker.registry.snapshot import RegistryView

async def main():
    nc = await nats.connect(sys.argv[1])
    view = RegistryView()
    await view.start(nc.jetstream())
    print("ready", flush=True)
    seen = view.snapshot.last_seq
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        await view.wait_for(seen + 1, timeout=1)
        now = time.time()
        if view.snapshot.last_seq > seen:
            seen = view.snapshot.last_seq
            print(seen, now, flush=True)
            if seen >= int(sys.argv[2]):
                break
    await nc.close()

asyncio.run(main())
"""


def manifest(i: int, version: str = "1.0.0") -> AgentManifest:
    return AgentManifest.model_validate(
        {
            "name": f"agent-{i}",
            "version": version,
            "description": f"Agent number {i}.",
            "capabilities": [{"action": "work"}],
        }
    )


async def lookups(
    view: RegistryView, publisher: Publisher, agents: int, seconds: float
) -> tuple[float, float, int]:
    """(snapshot lookups/s under a writer, dict lookups/s, updates applied meanwhile).

    Both loops look up the same ``(tenant, name)`` keys and yield to the event loop every
    ``YIELD_EVERY`` lookups, so the writer and the snapshot watcher keep running.
    """
    keys = [(T, f"agent-{i}") for i in range(agents)]
    plain = dict(view.snapshot)
    stop = asyncio.Event()
    applied = 0

    async def writer() -> None:
        nonlocal applied
        i = 0
        while not stop.is_set():
            await put_agent(publisher, T, manifest(i % agents, f"2.0.{i}"))
            applied += 1
            i += 1

    task = asyncio.create_task(writer())
    rounds = [keys[i : i + YIELD_EVERY] for i in range(0, len(keys), YIELD_EVERY)]
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for chunk in rounds:
            for key in chunk:
                view.snapshot.get(key)  # the latest snapshot, every time
            count += len(chunk)
            await asyncio.sleep(0)
    snapshot_rate = count / (time.perf_counter() - began)
    stop.set()
    await task

    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for chunk in rounds:
            for key in chunk:
                plain.get(key)
            count += len(chunk)
            await asyncio.sleep(0)
    dict_rate = count / (time.perf_counter() - began)
    return snapshot_rate, dict_rate, applied


async def as_of_pages(publisher: Publisher) -> dict[str, float]:
    """Seconds to list every page as of the stream's last seq: each page rebuilt from the
    history, then with the registry rebuilt for the first page kept for the next."""
    seq = (await publisher.js.stream_info("REGISTRY")).state.last_seq

    async def listing(rebuilt: RebuiltRegistries | None) -> tuple[float, int]:
        after, pages, began = None, 0, time.perf_counter()
        while True:
            snapshot = await registry_as_of(publisher.js, T, seq=seq, rebuilt=rebuilt)
            page = agent_page(
                snapshot.agents(T), after=after, limit=MAX_LIST_PAGE, max_bytes=MAX_PAGE_BYTES
            )
            pages += 1
            if page.next_after is None:
                return time.perf_counter() - began, pages
            after = page.next_after

    rebuilt_each_page, pages = await listing(None)
    kept, _ = await listing(RebuiltRegistries())
    return {
        "pages": pages,
        "rebuilt_each_page_s": round(rebuilt_each_page, 3),
        "kept_s": round(kept, 3),
        "ratio": round(rebuilt_each_page / kept, 1),
    }


async def visibility(url: str, publisher: Publisher, updates: int) -> list[float]:
    """Milliseconds from write call to visible in another process, per update."""
    info = await publisher.js.stream_info("REGISTRY")
    last = info.state.last_seq + updates
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WATCHER,
        url,
        str(last),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    while (await proc.stdout.readline()).strip() != b"ready":
        pass
    sent: dict[int, float] = {}
    for i in range(updates):
        began = time.time()
        result = await put_agent(publisher, T, manifest(i % 50, f"3.0.{i}"))
        sent[result.seq] = began
        await asyncio.sleep(0.002)
    latencies = []
    for line in (await proc.stdout.read()).decode().splitlines():
        seq, seen = line.split()
        if int(seq) in sent:
            latencies.append((float(seen) - sent[int(seq)]) * 1000)
    await proc.wait()
    return sorted(latencies)


async def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(ServerSpec(store_dir=Path(tmp))).start()
        try:
            nc = await nats.connect(server.url)
            await provision(nc.jetstream(), Settings())
            await nc.close()
            publisher = Publisher([server.url])
            publisher.start()
            await publisher.wait_connected(5)
            for i in range(args.agents):
                await put_agent(publisher, T, manifest(i))
            listing = await as_of_pages(publisher) if args.as_of_pages else None
            view = RegistryView()
            await view.start(publisher.js)
            snapshot_rate, dict_rate, applied = await lookups(
                view, publisher, args.agents, args.seconds
            )
            latencies = await visibility(server.url, publisher, args.updates)
            await publisher.close()
        finally:
            server.stop()
    n = len(latencies)
    extra = {"as_of_pages": listing} if listing else {}
    return {
        **extra,
        "agents": args.agents,
        "snapshot_lookups_per_s": round(snapshot_rate),
        "dict_lookups_per_s": round(dict_rate),
        "ratio": round(snapshot_rate / dict_rate, 3),
        "updates_applied_during_lookups": applied,
        "visible_in_other_process_ms": {
            "samples": n,
            "p50": round(latencies[n // 2], 2),
            "p99": round(latencies[min(n - 1, int(n * 0.99))], 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3.0, help="per lookup phase")
    parser.add_argument("--as-of-pages", action="store_true", help="time as_of listings too")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    vis = result["visible_in_other_process_ms"]
    assert isinstance(vis, dict)
    print(f"\nregistry benchmark: {args.agents} agents")
    print(
        f"snapshot lookups/s under a writer  {result['snapshot_lookups_per_s']:>12,}  "
        f"({result['updates_applied_during_lookups']} updates applied meanwhile)"
    )
    print(f"plain dict lookups/s               {result['dict_lookups_per_s']:>12,}")
    print(
        f"ratio                              {result['ratio']:>12.2f}x  target >= 0.5x "
        f"{'ok' if float(str(result['ratio'])) >= 0.5 else 'MISSED'}"
    )
    print(
        f"append -> visible in another process: p50 {vis['p50']} ms, p99 {vis['p99']} ms "
        f"({vis['samples']} updates)"
    )
    if listing := result.get("as_of_pages"):
        assert isinstance(listing, dict)
        print(
            f"as_of listing, {listing['pages']} pages: {listing['rebuilt_each_page_s']} s "
            f"rebuilt per page, {listing['kept_s']} s kept: {listing['ratio']}x"
        )


if __name__ == "__main__":
    main()
