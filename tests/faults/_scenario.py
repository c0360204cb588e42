"""One fault under load, measured: publish, inject, wait for recovery, heal, publish more,
then audit the stream and the replica.

Timeline of :func:`exercise`::

    load ──────────────────────────────────────────────────────────────▶ stop
          WARMUP acked │ inject      heal after `hold` s    AFTER_HEAL acked │ audit
                       └─ probes until one begun after the fault is acked ─┘
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa

from broker.devcluster import BrokerChild, Topology
from tests._wait import wait_for
from tests.e2e._broker import alive, children
from tests.faults._audit import (
    ReplicaAudit,
    StreamAudit,
    audit_replica,
    audit_stream,
    ingress_node,
    replica_max_seq,
    stream_leader,
    wait_stream_current,
)
from tests.faults._load import LoadResult, PublishLoad, time_to_recover

#: Messages acknowledged before the fault, and after healing, at the least.
WARMUP = 60
AFTER_HEAL = 60
#: Publishing must come back within this many seconds of any fault here.
MAX_RECOVERY_S = 30.0

Step = Callable[[], Awaitable[None]]


@dataclass
class FaultOutcome:
    scenario: str
    load: LoadResult
    probes: LoadResult
    recovery_s: float
    replica_recovery_s: float | None
    leader_before: str
    leader_after_recovery: str
    #: the node the ingress was connected to when the fault came
    ingress_on: str
    stream: StreamAudit
    replica: ReplicaAudit

    @property
    def acked(self) -> dict[str, int]:
        return {**self.load.acked, **self.probes.acked}

    def retryable(self) -> dict[str, int]:
        return dict(self.load.retryable + self.probes.retryable)

    def other_errors(self) -> dict[str, int]:
        return dict(self.load.other + self.probes.other)

    def summary(self) -> str:
        replica = (
            f" replica recovered {self.replica_recovery_s:.1f} s"
            if self.replica_recovery_s is not None
            else ""
        )
        return (
            f"{self.scenario}: acked {len(self.acked)}, lost {len(self.stream.lost)}, "
            f"duplicates {len(self.stream.duplicate_keys)}/{len(self.stream.duplicate_ids)} "
            f"(key/id), replica lost {len(self.replica.lost)} duplicated "
            f"{self.replica.duplicated}, recovered {self.recovery_s:.2f} s{replica}, "
            f"leader {self.leader_before}->{self.leader_after_recovery}, "
            f"ingress on {self.ingress_on}, "
            f"retried {self.retryable()}, other errors {self.other_errors()}, "
            f"duplicate acks {self.load.duplicate_acks}"
        )

    def check(self) -> None:
        """Nothing acknowledged was lost or stored twice, the replica matches the stream,
        clients saw only retryable errors, and publishing came back in time."""
        assert len(self.load.acked) >= WARMUP + AFTER_HEAL, self.summary()
        assert self.stream.lost == [], f"{self.summary()}; lost keys {self.stream.lost[:20]}"
        assert self.stream.duplicate_keys == {}, self.summary()
        assert self.stream.duplicate_ids == {}, self.summary()
        assert self.stream.undecodable == [], (
            f"{self.summary()}; payloads stored that no client sent (seq, key, first bytes): "
            f"{self.stream.undecodable[:5]}"
        )
        assert self.replica.lost == [], (
            f"{self.summary()}; rows missing for stream sequences {self.replica.lost[:20]}, "
            f"checkpoints {self.replica.checkpoints}"
        )
        assert self.replica.duplicated == 0, self.summary()
        assert self.other_errors() == {}, self.summary()
        assert self.load.given_up == [], self.summary()
        assert self.recovery_s < MAX_RECOVERY_S, self.summary()


async def _replica_recovery(engine: sa.Engine, load: LoadResult, since: float) -> float:
    """Seconds from ``since`` until the replica holds a message acknowledged after it."""
    deadline = since + 90
    while time.monotonic() < deadline:
        after = [seq for key, seq in load.acked.items() if load.acked_at[key] > since]
        if after and await asyncio.to_thread(replica_max_seq, engine) >= min(after):
            return time.monotonic() - since
        await asyncio.sleep(0.1)
    raise AssertionError("the replica took no message acknowledged after the fault in 90 s")


async def exercise(
    topology: Topology,
    engine: sa.Engine,
    scenario: str,
    *,
    inject: Step,
    heal: Step,
    hold: float,
    watch_replica: bool = False,
) -> FaultOutcome:
    """Run the timeline above; ``heal`` runs ``hold`` seconds after ``inject``."""
    leader_before = await stream_leader(topology.nats_url)
    ingress_on = await asyncio.to_thread(ingress_node, topology)
    async with PublishLoad(topology.base_url, scenario) as load:
        await load.wait_acked(WARMUP, timeout=60)
        since = time.monotonic()
        await inject()
        healing = asyncio.create_task(_later(hold, heal))
        replica_watch = (
            asyncio.create_task(_replica_recovery(engine, load.result, since))
            if watch_replica
            else None
        )
        try:
            recovery_s, probes = await time_to_recover(topology.base_url, scenario, since)
            leader_after = await stream_leader(topology.nats_url)
            await healing
            await load.wait_acked(len(load.result.acked) + AFTER_HEAL, timeout=90)
        except BaseException:
            if replica_watch is not None:
                replica_watch.cancel()
            raise
        finally:
            if not healing.done():  # a failed test still leaves the topology to heal
                with contextlib.suppress(Exception):
                    await healing
    replica_recovery_s = await replica_watch if replica_watch is not None else None
    await asyncio.to_thread(topology.wait_ready, 90)
    await wait_stream_current(topology.nats_url, topology.spec.replicas)
    stream = await audit_stream(topology.nats_url, {**load.result.acked, **probes.acked})
    replica = await audit_replica(engine, stream, f"{scenario}-")
    return FaultOutcome(
        scenario=scenario,
        load=load.result,
        probes=probes,
        recovery_s=recovery_s,
        replica_recovery_s=replica_recovery_s,
        leader_before=leader_before,
        leader_after_recovery=leader_after,
        ingress_on=ingress_on,
        stream=stream,
        replica=replica,
    )


async def _later(seconds: float, step: Step) -> None:
    await asyncio.sleep(seconds)
    await step()


def kill_tree(child: BrokerChild) -> None:
    """SIGKILL a broker process and every process under it at once, as a crashed container."""
    assert child.proc is not None, f"{child.name} was never started"
    assert child.running, f"{child.name} is not running"
    pids = [child.proc.pid, *children(child.proc.pid)]
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    child.proc.wait(10)
    assert wait_for(lambda: not any(alive(pid) for pid in pids), timeout=10), pids
