"""What ``/v1/status`` and ``broker status`` read from a real nats-server: every page of a
stream's consumers, one instance per ``agent_load`` key (read as the routers read it, and
aggregated as ``/metrics`` shows it), a tenant's own agents' consumers however they filter,
and a document that stays JSON whatever numbers an agent heartbeats."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import json
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import REGISTRY
from rich.console import Console

from broker.cli_status import render
from broker.routing.load import LoadView
from broker.settings import Settings
from broker.streams import agent_load_spec, provision
from broker.telemetry import metrics, status
from broker.telemetry.status import BuildInfo, collect

pytestmark = pytest.mark.integration

BUILD = BuildInfo("0.0.0", "test", None, "default")
AGENTS = 300  # more than one page (256) of CONSUMER.LIST


async def many_inboxes(nc: NatsClient, backlog: int) -> None:
    """The broker's streams; ROUTES with an inbox consumer per agent, named as
    :mod:`broker.agent` names them (sorted before ``proj_…``), and a projection's consumer
    with ``backlog`` messages left to process."""
    js = nc.jetstream()
    await provision(js, Settings())
    for i in range(AGENTS):
        config = ConsumerConfig(
            durable_name=f"agent-default~a{i:03d}",
            filter_subject=f"route.default.a{i:03d}",
            ack_policy=AckPolicy.EXPLICIT,
        )
        await js.add_consumer("ROUTES", config)
    projection = ConsumerConfig(
        durable_name="proj_replica_routes_w1", ack_policy=AckPolicy.EXPLICIT
    )
    await js.add_consumer("ROUTES", projection)
    for _ in range(backlog):
        await js.publish("route.default.nobody", b"{}")


def shown(document: dict[str, object]) -> str:
    """What ``broker status`` prints for ``document``."""
    out = io.StringIO()
    Console(file=out, width=300).print(render(document))
    return out.getvalue()


async def test_status_lists_a_projections_lag_behind_more_than_a_page_of_agent_inboxes(
    nc: NatsClient,
) -> None:
    await many_inboxes(nc, backlog=40)

    document = (await collect(nc, build=BUILD)).to_dict()

    routes = [c for c in document["consumers"] if c["stream"] == "ROUTES"]
    assert len(routes) == AGENTS + 1
    projection = [c for c in routes if c["kind"] == "projection"]
    assert [(c["name"], c["lag"]) for c in projection] == [("proj_replica_routes_w1", 40)]
    assert document["consumers_unlisted"] == {}
    assert "proj_replica_routes_w1" in shown(document)
    assert "not listed" not in shown(document)


async def test_status_says_how_many_consumers_it_did_not_read_past_its_page_bound(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await many_inboxes(nc, backlog=0)
    monkeypatch.setattr(status, "MAX_CONSUMER_PAGES", 1)

    document = (await collect(nc, build=BUILD)).to_dict()

    routes = [c for c in document["consumers"] if c["stream"] == "ROUTES"]
    assert len(routes) == 256
    assert document["consumers_unlisted"] == {"ROUTES": AGENTS + 1 - 256}
    assert f"{AGENTS + 1 - 256} more on ROUTES not listed" in shown(document)


def beat(key: str, **load: Any) -> bytes:
    """A heartbeat as agents store it under ``key`` (``<tenant>.<agent>.<instance>``)."""
    tenant, agent, instance = key.split(".", 2)
    return json.dumps({"tenant": tenant, "agent": agent, "instance": instance, **load}).encode()


async def agent_load_with_history(nc: NatsClient) -> nats.js.kv.KeyValue:
    """The ``agent_load`` bucket as an operator may have made it: keeping 10 values a key."""
    spec = dataclasses.replace(agent_load_spec(Settings()), history=10)
    return await nc.jetstream().create_key_value(spec)


async def test_one_instance_that_heartbeats_into_a_bucket_with_history_counts_once(
    nc: NatsClient,
) -> None:
    kv = await agent_load_with_history(nc)
    for qps in (1, 2, 3, 4, 5):
        await kv.put("default.echo.inst1", beat("default.echo.inst1", qps=qps, in_flight=2))
    await kv.put("default.echo.inst2", beat("default.echo.inst2", qps=100, in_flight=100))
    await kv.delete("default.echo.inst2")  # stopped: its older heartbeat is no instance

    agents = (await collect(nc, build=BUILD)).to_dict()["agents"]

    assert [(a["name"], a["load"]["instances"]) for a in agents] == [("echo", 1)]
    load = agents[0]["load"]
    assert (load["qps"], load["in_flight"]) == (5.0, 2)
    assert [i["instance"] for i in agents[0]["instances"]] == ["inst1"]


async def test_absurd_heartbeat_numbers_leave_the_status_document_valid_json(
    nc: NatsClient,
) -> None:
    kv = await agent_load_with_history(nc)
    huge = {"qps": 1.0e308, "in_flight": 1.0e308, "p99_ms": -5, "error_rate": 7}
    await kv.put("default.buggy.a", beat("default.buggy.a", **huge))
    await kv.put("default.buggy.b", beat("default.buggy.b", **huge))
    no_double = beat("default.buggy.c").replace(b"}", b', "qps": 1e400}')
    await kv.put("default.buggy.c", no_double)  # not a heartbeat (no such double)
    await kv.put("default.ocr.x", beat("default.ocr.x", qps=3.5, in_flight=1, p99_ms=20))

    document = (await collect(nc, build=BUILD)).to_dict()

    # What Starlette's JSONResponse did with the document (and raised on infinity).
    text = json.dumps(document, allow_nan=False)
    agents = {a["name"]: a["load"] for a in json.loads(text)["agents"]}
    assert agents["buggy"] == {
        "instances": 2,
        "in_flight": 2 * status.LOAD_MAX,
        "qps": 2 * status.LOAD_MAX,
        "p99_ms": 0.0,
        "error_rate": 1.0,
    }
    assert agents["ocr"] == {
        "instances": 1,
        "in_flight": 1.0,
        "qps": 3.5,
        "p99_ms": 20.0,
        "error_rate": 0.0,
    }
    assert "buggy" in shown(document)


async def test_status_misses_no_durable_consumer_while_reads_come_and_go_before_it(
    nc: NatsClient,
) -> None:
    """Reads (replays, registry lookups, this status's own tails) create and delete
    consumers all the time; one deleted between two pages of the list shifts the rest."""
    await many_inboxes(nc, backlog=0)
    js = nc.jetstream()
    stop = asyncio.Event()

    async def reads() -> None:  # named to sort before every durable
        for i in itertools.count():
            if stop.is_set():
                return
            name = f"0read{i}"
            await js.add_consumer("ROUTES", ConsumerConfig(name=name, inactive_threshold=30.0))
            await js.delete_consumer("ROUTES", name)

    churn = asyncio.create_task(reads())
    try:
        listed = []
        for _ in range(30):
            document = (await collect(nc, build=BUILD)).to_dict()
            listed.append(sum(c["stream"] == "ROUTES" for c in document["consumers"]))
    finally:
        stop.set()
        await churn
    assert listed == [AGENTS + 1] * 30


async def test_a_failed_route_is_shown_from_routes_once_whatever_the_dlq_holds(
    nc: NatsClient,
) -> None:
    """A decision for nobody is stored at route.<tenant>.-.dead (and copied to the DLQ): the
    ROUTES tail read route.<tenant>.* only, so it showed only while its DLQ copy was among
    the DLQ's last messages."""
    js = nc.jetstream()
    await provision(js, Settings())
    decision = json.dumps(
        {"message_seq": 4242, "attempt": 1, "reason": "no_candidate", "agent": None}
    )
    headers = {"Broker-Route": decision}
    await js.publish("route.default.-.dead", b"", headers=headers)
    await js.publish("dlq.default.route", b"", headers=headers)
    await js.publish("route.default.ocr.reply.4242", b"{}")  # an answer, not a decision
    for i in range(5):  # the DLQ's tail moves past the copy
        await js.publish(
            "dlq.MESSAGES.replica_messages",
            b"x",
            headers={"Broker-Dlq-Projection": "replica_messages", "Broker-Dlq-Seq": str(i + 1)},
        )
    for recent in (5, 50):  # the copy out of the DLQ's tail, and in it: shown once
        document = (await collect(nc, build=BUILD, recent=recent)).to_dict()
        failed = [r for r in document["routes"] if r["message_seq"] == 4242]
        assert len(failed) == 1, document["routes"]
        assert failed[0]["subject"] == "route.default.-.dead"
        assert failed[0]["reason"] == "no_candidate"


async def test_a_tail_stops_reading_at_its_snapshots_last_message(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages appended after the stream's state was read (a busy stream) are not read:
    the tail pulled until nothing was pending, for as long as they kept coming."""
    js = nc.jetstream()
    await provision(js, Settings())
    await asyncio.gather(*(js.publish("audit.default.tail", b"x") for _ in range(1200)))
    info = await js.stream_info("AUDIT")
    snapshot = dataclasses.replace(info.state, last_seq=info.state.first_seq + 99)
    read: list[int] = []
    real = status.read_batches

    async def counted(*args: Any, **kwargs: Any) -> Any:
        async for batch in real(*args, **kwargs):
            read.extend(m.metadata.sequence.stream for m in batch)
            yield batch

    monkeypatch.setattr(status, "read_batches", counted)
    tail = await status._tail(js, "AUDIT", snapshot, "audit.default.>", 10)
    assert [m.metadata.sequence.stream for m in tail] == list(
        range(snapshot.last_seq - 9, snapshot.last_seq + 1)
    )
    assert max(read) <= snapshot.last_seq + 512  # one batch past it at most, not 1 100


async def test_a_heartbeat_whose_body_is_not_for_its_key_is_not_shown(nc: NatsClient) -> None:
    """Who a heartbeat is for is its key (what NATS permissions limit a writer to), as the
    routers read it: the status page took the instance from the body, and the agent and
    tenant from the key, whatever the body said."""
    kv = await agent_load_with_history(nc)
    await kv.put("default.echo.inst1", beat("default.echo.inst1", qps=1))
    await kv.put("default.echo.inst2", beat("default.echo.inst9", qps=50))  # another instance
    await kv.put("default.spy.x", beat("other.spy.x", qps=50))  # another tenant's agent
    await kv.put("default.ghost.y", beat("default.echo.y", qps=50))  # another agent
    await kv.put("default.bare.z", b'{"qps": 50}')  # names nobody: not a heartbeat

    document = (await collect(nc, build=BUILD)).to_dict()

    assert [(a["name"], a["load"]["instances"]) for a in document["agents"]] == [("echo", 1)]
    assert [i["instance"] for i in document["agents"][0]["instances"]] == ["inst1"]
    assert document["agents"][0]["load"]["qps"] == 1.0
    for absent in ("spy", "ghost", "bare"):
        assert absent not in shown(document)


async def test_status_and_the_metrics_agree_on_an_agents_error_rate(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent's error rate is its instances' weighted by their QPS, on every page: the
    status showed the worst instance's (10 %) where ``/metrics`` showed 7.5 %."""
    monkeypatch.setattr(metrics, "_on", True)
    kv = await agent_load_with_history(nc)
    await kv.put("default.rated.1", beat("default.rated.1", qps=10, error_rate=0.0))
    await kv.put("default.rated.2", beat("default.rated.2", qps=30, error_rate=0.1))
    view = LoadView(refresh_interval=0.05)
    await view.start(nc.jetstream())
    try:
        seen = await view.wait_until(
            lambda v: getattr(v.loads("default").get("rated"), "instances", 0) == 2, 10
        )
    finally:
        await view.stop()
    assert seen

    document = (await collect(nc, build=BUILD)).to_dict()

    (load,) = [a["load"] for a in document["agents"] if a["name"] == "rated"]
    assert load["error_rate"] == pytest.approx(0.075)
    labels = {"tenant": "default", "agent": "rated"}
    exported = REGISTRY.get_sample_value("broker_agent_load_error_ratio", labels)
    assert exported == load["error_rate"]
    assert "7.5%" in shown(document)


async def test_a_tenants_view_lists_its_agents_consumers_that_filter_on_many_subjects(
    nc: NatsClient,
) -> None:
    """An agent's inbox consumer may filter on ``filter_subjects`` (a list) rather than
    ``filter_subject``: the tenant's view left such consumers out."""
    js = nc.jetstream()
    await provision(js, Settings())
    filters = {
        "agent-default~single": ["route.default.single"],
        "agent-default~many": ["route.default.many", "route.default.many2"],
        "agent-other~theirs": ["route.other.theirs", "route.other.theirs2"],
        "agent-default~mixed": ["route.default.mixed", "route.other.mixed"],
    }
    for name, subjects in filters.items():
        config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT)
        if len(subjects) == 1:
            config.filter_subject = subjects[0]
        else:
            config.filter_subjects = subjects
        await js.add_consumer("ROUTES", config)

    tenants_view = await collect(nc, build=BUILD, all_dead_letters=False)
    everything = await collect(nc, build=BUILD)

    def agents(found: status.BrokerStatus) -> list[str]:
        return sorted(c["name"] for c in found.to_dict()["consumers"] if c["kind"] == "agent")

    assert agents(tenants_view) == ["agent-default~many", "agent-default~single"]
    assert agents(everything) == sorted(filters)
    assert "agent-default~many" in shown(tenants_view.to_dict())


async def test_a_sequence_of_thousands_of_digits_in_a_stored_header_is_shown_as_none(
    nc: NatsClient,
) -> None:
    """A number is read from headers whoever wrote them; one of more than 4,300 digits made
    ``int()`` raise, and the whole status read failed (a 500 for every page of the tenant)."""
    js = nc.jetstream()
    await provision(js, Settings())
    huge = "9" * 5000
    decision = json.dumps({"message_seq": huge, "attempt": huge, "reason": "no_candidate"})
    await js.publish("route.default.-.dead", b"", headers={"Broker-Route": decision})
    await js.publish(
        "dlq.MESSAGES.replica_messages",
        b"x",
        headers={"Broker-Dlq-Projection": "replica_messages", "Broker-Dlq-Seq": huge},
    )

    document = (await collect(nc, build=BUILD)).to_dict()

    (route,) = document["routes"]
    assert (route["reason"], route["message_seq"], route["attempt"]) == ("no_candidate", None, None)
    (dead,) = document["dlq"]
    assert (dead["source"], dead["origin_seq"]) == ("replica_messages", None)
