"""Acknowledged data survives faults of the cluster and of the broker's own processes.

Each test drives publish load through the ingress (HTTP/2, an Idempotency-Key per message,
retries with the same key), injects one fault, and checks: no acknowledged message lost,
no message stored twice (by key and by payload id, over the whole stream), the PostgreSQL
replica holds each message exactly once, clients saw only retryable errors, and publishing
came back; the time to recover is printed in the run's summary.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from broker.devcluster import Topology
from broker.embedded import NatsServer
from broker.publisher import jetstream_error
from tests.faults._audit import stream_leader
from tests.faults._scenario import FaultOutcome, exercise, kill_tree

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

#: A killed node stays down this long before it is started again.
NODE_DOWN_S = 5.0
#: A paused leader stays paused this long: past JetStream's election timeout (4 to 9 s),
#: so the followers elect a new leader while the old one still believes it leads.
PAUSE_S = 10.0


async def _start(nodes: list[NatsServer]) -> None:
    for node in nodes:
        node.launch()  # here, on the main thread: the node dies with the test process
    for node in nodes:
        await asyncio.to_thread(node.wait_ready, 60)


async def _other_than(topology: Topology, leader: str) -> NatsServer:
    return next(n for n in topology.cluster.nodes if n.spec.server_name != leader)


@pytest.mark.parametrize("role", ["leader", "follower"])
async def test_sigkill_of_a_messages_stream_node_loses_and_duplicates_nothing(
    healthy: Topology, replica_engine: sa.Engine, outcomes: list[FaultOutcome], role: str
) -> None:
    """SIGKILL the MESSAGES stream's leader (or a follower); start it again 5 s later."""
    leader = await stream_leader(healthy.nats_url)
    node = healthy.node(leader) if role == "leader" else await _other_than(healthy, leader)

    async def inject() -> None:
        node.kill()

    async def heal() -> None:
        await _start([node])

    outcome = await exercise(
        healthy, replica_engine, f"kill_{role}", inject=inject, heal=heal, hold=NODE_DOWN_S
    )
    outcomes.append(outcome)
    outcome.check()
    if role == "leader":
        assert outcome.leader_after_recovery != leader, outcome.summary()


async def test_sigstop_of_the_leader_then_sigcont_loses_and_duplicates_nothing(
    healthy: Topology, replica_engine: sa.Engine, outcomes: list[FaultOutcome]
) -> None:
    """Pause the MESSAGES leader past the election timeout, then let it run again."""
    node = healthy.node(await stream_leader(healthy.nats_url))

    async def inject() -> None:
        node.pause()

    async def heal() -> None:
        node.resume()

    outcome = await exercise(
        healthy, replica_engine, "pause_leader", inject=inject, heal=heal, hold=PAUSE_S
    )
    outcomes.append(outcome)
    outcome.check()


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_restart_of_all_three_nodes_loses_and_duplicates_nothing(
    healthy: Topology, replica_engine: sa.Engine, outcomes: list[FaultOutcome], how: str
) -> None:
    """Every node stopped at once -- crashed (SIGKILL) or stopped cleanly (SIGTERM) -- and
    all started again: the whole cluster is down for a moment."""
    nodes = healthy.cluster.nodes

    async def inject() -> None:
        stop = NatsServer.kill if how == "sigkill" else NatsServer.stop
        await asyncio.gather(*(asyncio.to_thread(stop, node) for node in nodes))

    async def heal() -> None:
        await _start(nodes)

    outcome = await exercise(
        healthy, replica_engine, f"restart_all_{how}", inject=inject, heal=heal, hold=0
    )
    outcomes.append(outcome)
    outcome.check()


async def test_sigkill_of_the_ingress_then_restart_loses_and_duplicates_nothing(
    healthy: Topology, replica_engine: sa.Engine, outcomes: list[FaultOutcome]
) -> None:
    """The ingress process tree (broker serve, granian and its worker) SIGKILLed mid-load
    and started again, as its supervisor would."""
    ingress = healthy.ingress
    assert ingress is not None

    async def inject() -> None:
        await asyncio.to_thread(kill_tree, ingress)

    async def heal() -> None:
        ingress.start()

    outcome = await exercise(
        healthy, replica_engine, "kill_ingress", inject=inject, heal=heal, hold=0
    )
    outcomes.append(outcome)
    outcome.check()
    assert sum(outcome.retryable().values()) > 0, "the clients never noticed the ingress die"


async def test_sigkill_of_a_projection_worker_then_restart_keeps_the_replica_exact(
    healthy: Topology, replica_engine: sa.Engine, outcomes: list[FaultOutcome]
) -> None:
    """The worker SIGKILLed mid-batch and started again: once its leases expire it goes on
    where the committed checkpoint says, and every message is in the replica exactly once."""
    worker = healthy.workers[0]

    async def inject() -> None:
        await asyncio.to_thread(kill_tree, worker)

    async def heal() -> None:
        worker.start()

    outcome = await exercise(
        healthy,
        replica_engine,
        "kill_worker",
        inject=inject,
        heal=heal,
        hold=0,
        watch_replica=True,
    )
    outcomes.append(outcome)
    outcome.check()
    assert outcome.replica_recovery_s is not None


def test_a_retry_that_overtakes_its_original_is_a_retryable_503() -> None:
    """JetStream answers 10158 ("duplicate message id is in process") to a publish whose key
    is still being proposed -- seen here when a paused leader resumed: the client must retry
    with the same key, so the ingress answers 503, not 500."""
    error = jetstream_error(409, 10158, "duplicate message id is in process", "msg.t.a")
    assert error.status == 503
    assert error.retryable
    assert "retry with the same key" in error.message
