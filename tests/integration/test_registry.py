"""The registry against a real server: events, concurrency, time travel, live snapshots."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime

import nats
import pytest
from nats.aio.msg import Msg

from broker.envelope import Tenant
from broker.errors import NotFound
from broker.publisher import Publisher
from broker.registry.commands import (
    VersionConflict,
    agent_history,
    delete_agent,
    put_agent,
    registry_as_of,
)
from broker.registry.manifest import AgentManifest
from broker.registry.snapshot import RegistryView
from tests._wait import await_until

pytestmark = pytest.mark.integration
T = Tenant("acme")


def manifest(
    name: str, version: str = "1.0.0", description: str = "Translates text."
) -> AgentManifest:
    return AgentManifest.model_validate(
        {
            "name": name,
            "version": version,
            "description": description,
            "capabilities": [{"action": "translate", "content_types": ["text/plain"]}],
        }
    )


async def test_history_is_in_order_and_identical_reapply_appends_nothing(
    publisher: Publisher,
) -> None:
    first = await put_agent(publisher, T, manifest("tr"))
    assert first.changed
    assert first.event is not None
    assert first.event.type == "AgentRegistered"
    same = await put_agent(publisher, T, manifest("tr"))
    assert not same.changed
    assert same.seq == first.seq
    second = await put_agent(publisher, T, manifest("tr", "1.1.0"))
    assert second.event is not None
    assert second.event.type == "AgentUpdated"
    gone = await delete_agent(publisher, T, "tr")
    events, _ = await agent_history(publisher.js, T, "tr")
    assert [(e.type, e.seq) for e in events] == [
        ("AgentRegistered", first.seq),
        ("AgentUpdated", second.seq),
        ("AgentDeregistered", gone.seq),
    ]
    with pytest.raises(NotFound):
        await delete_agent(publisher, T, "tr")


async def test_history_comes_in_pages_that_together_hold_every_event(
    publisher: Publisher,
) -> None:
    """An agent updated many times had its whole history read into one answer (up to
    256 KiB a manifest); it is read a page at a time now, each saying where the next starts."""
    seqs = [(await put_agent(publisher, T, manifest("pg", f"1.{n}.0"))).seq for n in range(7)]
    await put_agent(publisher, T, manifest("other"))  # another agent's events are skipped
    pages, start = [], 1
    while True:
        events, after = await agent_history(publisher.js, T, "pg", from_seq=start, limit=3)
        pages.append([e.seq for e in events])
        if after is None:
            break
        start = after
    assert pages == [seqs[0:3], seqs[3:6], seqs[6:]]
    assert (await agent_history(publisher.js, T, "pg", from_seq=seqs[-1] + 1)) == ([], None)


async def test_writes_read_the_agents_last_event_from_the_leader_not_any_replica(
    publisher: Publisher, nats_url: str
) -> None:
    """A direct get may be answered by a replica still catching up (seen on a 3-node cluster
    after a paused follower resumed); the read before a write must be the leader's."""
    snoop = await nats.connect(nats_url)
    asked: list[str] = []
    leader_read = "$JS.API.STREAM.MSG.GET.REGISTRY"

    async def heard(msg: Msg) -> None:
        asked.append(msg.subject)

    sub = await snoop.subscribe("$JS.API.>", cb=heard)
    await snoop.flush()
    try:
        await put_agent(publisher, T, manifest("lead"))
        await put_agent(publisher, T, manifest("lead"))
        await delete_agent(publisher, T, "lead")

        async def three_reads() -> bool:
            return asked.count(leader_read) >= 3

        # the snoop's callbacks run on its own tasks: a loaded machine runs them late
        assert await await_until(three_reads)
        await snoop.flush()
        await asyncio.sleep(0.1)  # room for a fourth read, which would be a defect
    finally:
        await sub.unsubscribe()
        await snoop.close()
    assert asked.count(leader_read) == 3
    assert not [s for s in asked if s.startswith("$JS.API.DIRECT.GET")]


async def test_a_stale_if_match_with_the_current_manifest_is_unchanged_not_a_conflict(
    publisher: Publisher,
) -> None:
    """A conditional put whose answer was lost, sent again: the manifest is already the one
    asked for, so it is a no-op, not a 409 against itself."""
    first = await put_agent(publisher, T, manifest("retried"))
    second = await put_agent(publisher, T, manifest("retried", "1.1.0"), if_match=first.seq)
    again = await put_agent(publisher, T, manifest("retried", "1.1.0"), if_match=first.seq)
    assert (again.changed, again.seq) == (False, second.seq)
    with pytest.raises(VersionConflict):  # a different manifest still conflicts
        await put_agent(publisher, T, manifest("retried", "1.2.0"), if_match=first.seq)


async def test_a_conditional_delete_sent_again_is_unchanged_not_a_404(
    publisher: Publisher,
) -> None:
    """A conditional delete whose answer was lost, sent again: the agent was deregistered
    from the version it names, so it is a no-op with the deregistration's seq. Without
    If-Match, or with another version, it is still not registered."""
    registered = await put_agent(publisher, T, manifest("gone"))
    deleted = await delete_agent(publisher, T, "gone", if_match=registered.seq)
    assert deleted.changed
    again = await delete_agent(publisher, T, "gone", if_match=registered.seq)
    assert (again.changed, again.seq) == (False, deleted.seq)
    for if_match in (None, registered.seq + 100, deleted.seq):
        with pytest.raises(NotFound):
            await delete_agent(publisher, T, "gone", if_match=if_match)
    assert len((await agent_history(publisher.js, T, "gone"))[0]) == 2
    # registered again and deleted unconditionally: an old If-Match no longer matches
    await put_agent(publisher, T, manifest("gone"))
    await delete_agent(publisher, T, "gone")
    with pytest.raises(NotFound):
        await delete_agent(publisher, T, "gone", if_match=registered.seq)


async def test_stale_if_match_and_concurrent_writers_get_409(publisher: Publisher) -> None:
    v1 = await put_agent(publisher, T, manifest("cc"))
    await put_agent(publisher, T, manifest("cc", "2.0.0"), if_match=v1.seq)
    with pytest.raises(VersionConflict):
        await put_agent(publisher, T, manifest("cc", "3.0.0"), if_match=v1.seq)
    # Ten writers race from the same read: exactly one wins, the rest are told so.
    head = (await agent_history(publisher.js, T, "cc"))[0][-1].seq
    results = await asyncio.gather(
        *(put_agent(publisher, T, manifest("cc", f"4.0.{i}"), if_match=head) for i in range(10)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, VersionConflict) for r in results if isinstance(r, BaseException))
    assert len((await agent_history(publisher.js, T, "cc"))[0]) == 3


async def test_time_travel_returns_the_old_state_after_later_changes(publisher: Publisher) -> None:
    await put_agent(publisher, T, manifest("a"))
    b = await put_agent(publisher, T, manifest("b"))
    await asyncio.sleep(0.01)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await put_agent(publisher, T, manifest("a", "9.0.0"))
    await delete_agent(publisher, T, "b")
    await put_agent(publisher, T, manifest("c"))
    by_seq = await registry_as_of(publisher.js, T, seq=b.seq)
    by_time = await registry_as_of(publisher.js, T, time=moment)
    for old in (by_seq, by_time):
        assert [r.name for r in old.agents(T)] == ["a", "b"]
        record = old.agent(T, "a")
        assert record is not None
        assert record.manifest.version == "1.0.0"
    now = await registry_as_of(publisher.js, T)
    assert [(r.name, r.manifest.version) for r in now.agents(T)] == [("a", "9.0.0"), ("c", "1.0.0")]


async def test_live_view_follows_the_stream_and_a_restart_rebuilds_it(publisher: Publisher) -> None:
    view = RegistryView()
    await view.start(publisher.js)
    assert view.ready
    readers_saw: list[int] = []
    old = view.snapshot
    result = await put_agent(publisher, T, manifest("live"))
    assert await view.wait_for(result.seq, timeout=2)
    readers_saw.append(len(view.snapshot))
    assert old.agent(T, "live") is None  # an earlier snapshot never changes under a reader
    assert view.snapshot.agent(T, "live") is not None
    await put_agent(publisher, T, manifest("other"))
    last = await delete_agent(publisher, T, "live")
    assert await view.wait_for(last.seq, timeout=2)

    rebuilt = RegistryView()  # a restarted process: replays the stream from the start
    await rebuilt.start(publisher.js)
    assert rebuilt.snapshot.last_seq == view.snapshot.last_seq
    assert rebuilt.snapshot.agents(T) == view.snapshot.agents(T)
    assert [r.name for r in rebuilt.snapshot.agents(T)] == ["other"]


_OTHER_PROCESS = """
import asyncio, json, sys
import nats
from broker.registry.snapshot import RegistryView

async def main():
    nc = await nats.connect(sys.argv[1])
    view = RegistryView()
    await view.start(nc.jetstream())
    assert await view.wait_for(int(sys.argv[2]), timeout=10)
    print(json.dumps([[r.name, r.seq, r.manifest.version] for r in view.snapshot.agents("acme")]))
    await nc.close()

asyncio.run(main())
"""


async def test_two_processes_converge_on_the_same_snapshot(
    publisher: Publisher, nats_url: str
) -> None:
    view = RegistryView()
    await view.start(publisher.js)
    last = 0
    for i in range(20):
        last = (await put_agent(publisher, T, manifest(f"agent-{i % 7}", f"1.0.{i}"))).seq
    assert await view.wait_for(last, timeout=5)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _OTHER_PROCESS,
        nats_url,
        str(last),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    other = json.loads(stdout.decode().strip().splitlines()[-1])
    mine = [[r.name, r.seq, r.manifest.version] for r in view.snapshot.agents(T)]
    assert other == mine


async def test_a_long_history_replays_with_one_copy_per_batch_not_per_event(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted process folds the registry's history in batches: copying the whole
    registry for every event made a long history take quadratic time to replay."""
    from broker.registry import snapshot as snapshot_module

    names = [f"batch-{i}" for i in range(150)]
    last = 0
    for version in range(4):  # 600 events: registered, then updated three times
        results = await asyncio.gather(
            *(put_agent(publisher, T, manifest(n, f"1.0.{version}")) for n in names)
        )
        last = max(last, *(r.seq for r in results))
    folds: list[int] = []
    real_fold = snapshot_module.fold

    def counting_fold(events, base=None):  # type: ignore[no-untyped-def]
        events = list(events)
        folds.append(len(events))
        return real_fold(events, base)

    monkeypatch.setattr(snapshot_module, "fold", counting_fold)
    view = RegistryView()
    await view.start(publisher.js)
    assert view.ready
    assert view.snapshot.last_seq >= last
    assert len(folds) <= sum(folds) // 256 + 2, folds[:20]
    versions = {r.name: r.manifest.version for r in view.snapshot.agents(T) if r.name in names}
    assert versions == dict.fromkeys(names, "1.0.3")
    # Caught up, it applies each new event at once.
    folds.clear()
    change = await put_agent(publisher, T, manifest("batch-0", "2.0.0"))
    assert await view.wait_for(change.seq, timeout=2)
    assert folds == [1]


async def test_an_event_naming_another_agent_than_its_subject_changes_nothing(
    publisher: Publisher,
) -> None:
    """A self-registering agent may publish only on its own ``reg.<tenant>.agent.<name>``;
    the tenant and name in the body were what the registry went by, so that agent could
    remove or replace any agent of any tenant (and its owner's PUT of the same manifest
    then changed nothing)."""
    victim = await put_agent(publisher, Tenant("bank"), manifest("payments"))
    mine = await put_agent(publisher, T, manifest("mine"))
    forged = [
        {"type": "AgentDeregistered", "tenant": "bank", "name": "payments", "manifest": None},
        {
            "type": "AgentRegistered",
            "tenant": "bank",
            "name": "evil",
            "manifest": manifest("evil").model_dump(mode="json"),
        },
        {  # its own name in the body, another in the manifest
            "type": "AgentUpdated",
            "tenant": str(T),
            "name": "mine",
            "manifest": manifest("payments", "9.9.9").model_dump(mode="json"),
        },
    ]
    for body in forged:
        await publisher.js.publish(f"reg.{T}.agent.mine", json.dumps(body).encode())
    view = RegistryView()
    await view.start(publisher.js)
    assert [a.name for a in view.snapshot.agents(Tenant("bank"))] == ["payments"]
    assert view.snapshot.agent(Tenant("bank"), "payments").seq == victim.seq  # type: ignore[union-attr]
    assert view.snapshot.agent(T, "mine").seq == mine.seq  # type: ignore[union-attr]
    assert view.snapshot.agent(T, "payments") is None
