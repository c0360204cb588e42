"""The registry's history against a real server: events an earlier release stored, events
that cannot be read at all, and live views across a NATS restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pytest
from structlog.testing import capture_logs

from broker.embedded import NatsServer
from broker.envelope import NATS_EXPECTED_LAST_SUBJECT_SEQ, Tenant
from broker.publisher import Publisher
from broker.registry.commands import (
    CommandResult,
    IfMatch,
    agent_history,
    delete_agent,
    put_agent,
    registry_as_of,
)
from broker.registry.events import EVENT_TYPE_HEADER, RegistryEventType
from broker.registry.manifest import validate_manifest
from broker.registry.snapshot import RegistryView
from broker.routing.embedder import HashingEmbedder
from broker.routing.load import InstanceLoad, LoadView
from broker.routing.scoring import Scorer
from broker.streams import AGENT_LOAD_BUCKET

pytestmark = pytest.mark.integration
T = Tenant("default")
_T = TypeVar("_T")
#: How long a view's start may wait for a replay that made no progress: a test that waits
#: this long has waited for a stall, not for the stream.
STALLED_AFTER = 10.0


def manifest(name: str, content_types: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0.0",
        "description": "Renders documents.",
        "capabilities": [
            {"action": "render", "description": "render", "content_types": content_types}
        ],
    }


async def store_raw(
    publisher: Publisher, name: str, body: bytes, *, event_type: str, expected: int
) -> int:
    """Append ``body`` to the agent's subject with the headers a release's
    :func:`broker.registry.events.encode` set; its stream sequence."""
    ack = await publisher.js.publish(
        f"reg.{T}.agent.{name}",
        body,
        headers={
            EVENT_TYPE_HEADER: event_type,
            "Broker-Event-Schema": "1",
            "Content-Type": "application/json",
            NATS_EXPECTED_LAST_SUBJECT_SEQ: str(expected),
        },
    )
    return ack.seq


async def started_view(publisher: Publisher) -> tuple[RegistryView, float]:
    """A view started on the stream, and how long its start took."""
    view = RegistryView()
    began = time.monotonic()
    await view.start(publisher.js, stalled_after=STALLED_AFTER)
    return view, time.monotonic() - began


async def test_manifest_an_earlier_release_accepted_is_read_as_stored(
    publisher: Publisher,
) -> None:
    """Release 3c3da76 stored ``content_types: ["text/plain\\n"]``; today's rules refuse it
    at the API. Read back, the agent is there as stored (view, history, as_of, routers), and
    a put and a delete over it work."""
    legacy = manifest("legacy", ["text/plain\n", "application/json"])
    # What that release's events.encode stored: the manifest's model_dump, type and names.
    stored = {
        **legacy,
        "endpoint": None,
        "embedding": None,
        "limits": {"max_qps": None, "max_concurrency": None},
        "security": {"allowed_tools": [], "memory_scope": "tenant_isolated"},
        "labels": {},
    }
    body = orjson.dumps(
        {"type": "AgentRegistered", "tenant": T, "name": "legacy", "manifest": stored}
    )
    seq = await store_raw(publisher, "legacy", body, event_type="AgentRegistered", expected=0)

    view, took = await started_view(publisher)
    assert view.ready
    assert view.snapshot.last_seq == seq
    assert took < STALLED_AFTER / 2
    record = view.snapshot.agent(T, "legacy")
    assert record is not None
    assert record.seq == seq
    assert record.manifest.capabilities[0].content_types == ["text/plain\n", "application/json"]

    history, _ = await agent_history(publisher.js, T, "legacy")
    assert [(e.type, e.seq) for e in history] == [(RegistryEventType.REGISTERED, seq)]
    assert history[0].manifest == record.manifest
    assert (await registry_as_of(publisher.js, T, seq=seq)).agent(T, "legacy") is not None

    # A router reads the manifest as it is: no crash, and a media type it lists as it should
    # still routes (the one with the newline matches nothing, as it never did).
    scorer = Scorer(HashingEmbedder())
    for content_type in ("text/plain", "application/json"):
        scorer.decide(view.snapshot, T, b'{"doc": "render"}', {"Content-Type": content_type}, {})
    assert scorer.catalogs.get(view.snapshot, T).agents == ("legacy",)

    fixed = validate_manifest(manifest("legacy", ["text/plain"]))
    put = await put_agent(publisher, T, fixed, if_match=IfMatch.seq(seq))
    assert put.event is not None
    assert put.event.type is RegistryEventType.UPDATED
    assert await view.wait_for(put.seq, 5.0)
    updated = view.snapshot.agent(T, "legacy")
    assert updated is not None
    assert updated.manifest == fixed
    assert updated.registered_seq == seq

    gone = await delete_agent(publisher, T, "legacy", if_match=IfMatch.seq(put.seq))
    assert gone.event is not None
    assert gone.event.type is RegistryEventType.DEREGISTERED
    assert await view.wait_for(gone.seq, 5.0)
    assert view.snapshot.agent(T, "legacy") is None
    history, _ = await agent_history(publisher.js, T, "legacy")
    assert [e.seq for e in history] == [seq, put.seq, gone.seq]


async def test_event_that_cannot_be_read_is_skipped_and_a_write_replaces_it(
    publisher: Publisher,
) -> None:
    """An event that is not JSON, as the stream's last, neither stalls a view's start nor
    stops it: the view moves past it (logged once with its seq, counted). A put over it
    names its seq and replaces it; so does a delete over an event of an unknown type."""
    first = await put_agent(publisher, T, validate_manifest(manifest("render", ["text/plain"])))
    broken = await store_raw(
        publisher, "render", b"{not json", event_type="AgentUpdated", expected=first.seq
    )

    with capture_logs() as logs:
        view, took = await started_view(publisher)
    assert view.ready
    assert took < STALLED_AFTER / 2
    assert view.snapshot.last_seq == broken
    assert view.skipped == 1
    unreadable = [e for e in logs if e["event"] == "registry_event_unreadable"]
    assert [e["seq"] for e in unreadable] == [broken]
    assert not [e for e in logs if e["event"] == "registry_view_incomplete"]
    record = view.snapshot.agent(T, "render")  # as it was before the event no one can read
    assert record is not None
    assert record.seq == first.seq

    assert [e.seq for e in (await agent_history(publisher.js, T, "render"))[0]] == [first.seq]
    assert (await registry_as_of(publisher.js, T)).last_seq == broken

    again = validate_manifest(manifest("render", ["text/plain", "image/png"]))
    put: CommandResult = await put_agent(publisher, T, again, if_match=IfMatch.seq(broken))
    assert put.event is not None
    assert put.event.type is RegistryEventType.UPDATED
    assert await view.wait_for(put.seq, 5.0)
    current = view.snapshot.agent(T, "render")
    assert current is not None
    assert current.manifest == again

    future = orjson.dumps({"type": "AgentSuspended", "tenant": T, "name": "render"})
    suspended = await store_raw(
        publisher, "render", future, event_type="AgentSuspended", expected=put.seq
    )
    assert await view.wait_for(suspended, 5.0)
    assert view.skipped == 2
    gone = await delete_agent(publisher, T, "render")
    assert gone.event is not None
    assert gone.seq == suspended + 1
    assert await view.wait_for(gone.seq, 5.0)
    assert view.snapshot.agent(T, "render") is None


# --- live views across a NATS restart ---------------------------------------------------------

#: How long after a restart began a write made once the server is back must be visible. With
#: nats-py's default 5 s idle heartbeat a lost consumer is noticed after 5 to 20 s; with the
#: views' 0.5 s, within 2 s.
VISIBLE_WITHIN = 4.5


async def restarted(server: NatsServer, publisher: Publisher) -> float:
    """Stop and start ``server`` on its port and store; when the stop began (monotonic),
    once the publisher is connected again."""
    began = time.monotonic()
    await asyncio.to_thread(server.restart)
    assert await publisher.wait_connected(20)
    return began


async def retried(write: Callable[[], Awaitable[_T]], timeout: float = 20.0) -> _T:
    """``await write()`` until it succeeds (the server may still be starting JetStream)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await write()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_registry_view_sees_a_write_made_after_a_nats_restart(
    nats_server: NatsServer, publisher: Publisher
) -> None:
    """A restart drops the view's ordered consumer; the view notices by its missing idle
    heartbeats and resumes where it was, so a write made after the restart is visible within
    seconds (it took 5 to 20 s: a PUT answered ``agent: null``, GET 404, routers did not
    see the agent)."""
    view = RegistryView()
    await view.start(publisher.js)
    before = await put_agent(publisher, T, validate_manifest(manifest("before", ["text/plain"])))
    assert await view.wait_for(before.seq, 5.0)

    began = await restarted(nats_server, publisher)
    after_manifest = validate_manifest(manifest("after", ["text/plain"]))
    after = await retried(lambda: put_agent(publisher, T, after_manifest))
    seen = await view.wait_for(after.seq, 20.0)
    took = time.monotonic() - began
    assert seen
    assert took < VISIBLE_WITHIN, f"the view saw seq {after.seq} {took:.1f} s after the restart"
    assert view.snapshot.agent(T, "after") is not None


async def test_load_view_hears_an_instance_after_a_nats_restart(
    nats_server: NatsServer, publisher: Publisher
) -> None:
    """The routers' load view follows the bucket with the same kind of consumer: after a
    restart it hears new heartbeats within seconds, not after the bucket's TTL, by which
    time the instances still running would have expired from it."""
    view = LoadView()
    await view.start(publisher.js)
    try:
        bucket = await publisher.js.key_value(AGENT_LOAD_BUCKET)
        first = InstanceLoad(tenant=T, agent="before", instance="i-1", at=time.time())
        await bucket.put(first.key, first.to_json())
        assert await view.wait_until(lambda v: "before" in v.loads(T), 5.0)

        began = await restarted(nats_server, publisher)
        bucket = await publisher.js.key_value(AGENT_LOAD_BUCKET)
        later = InstanceLoad(tenant=T, agent="after", instance="i-2", at=time.time())
        await retried(lambda: bucket.put(later.key, later.to_json()))
        seen = await view.wait_until(lambda v: "after" in v.loads(T), 20.0)
        took = time.monotonic() - began
        assert seen
        assert took < VISIBLE_WITHIN, f"the load view heard it {took:.1f} s after the restart"
    finally:
        await view.stop()


async def test_a_heartbeat_read_at_start_counts_from_when_it_was_stored(
    publisher: Publisher,
) -> None:
    """A view (a router starting, or its consumer made anew) reads the bucket's current
    values; one stored nearly a TTL earlier counted as heard then, and kept an instance that
    had died right after it live for up to two TTLs."""
    bucket = await publisher.js.key_value(AGENT_LOAD_BUCKET)
    last = InstanceLoad(tenant=T, agent="gone", instance="i-1", at=time.time())
    await bucket.put(last.key, last.to_json())
    await asyncio.sleep(2.0)  # the instance died after that beat; time passes
    view = LoadView()
    await view.start(publisher.js)  # the bucket's TTL (15 s)
    try:
        assert await view.wait_until(lambda v: "gone" in v.loads(T), 5.0)  # still in its TTL
        # Counted from when it was stored (2 s back), it is gone a TTL less 1.9 s from now;
        # counted from when the view read it, it would stay 1.9 s more.
        view.refresh(time.monotonic() + view.ttl - 1.9)
        assert "gone" not in view.loads(T)
    finally:
        await view.stop()
