"""What ``/v1/status`` and ``broker status`` read from a real nats-server: every page of a
stream's consumers, one instance per ``agent_load`` key, and a document that stays JSON
whatever numbers an agent heartbeats."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig
from rich.console import Console

from broker.cli_status import render
from broker.settings import Settings
from broker.streams import agent_load_spec, provision
from broker.telemetry import status
from broker.telemetry.status import BuildInfo, collect

pytestmark = pytest.mark.integration

BUILD = BuildInfo("0.0.0", "test", None, "default")
AGENTS = 300  # more than one page (256) of CONSUMER.LIST


@pytest_asyncio.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


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


async def agent_load_with_history(nc: NatsClient) -> nats.js.kv.KeyValue:
    """The ``agent_load`` bucket as an operator may have made it: keeping 10 values a key."""
    spec = dataclasses.replace(agent_load_spec(Settings()), history=10)
    return await nc.jetstream().create_key_value(spec)


async def test_one_instance_that_heartbeats_into_a_bucket_with_history_counts_once(
    nc: NatsClient,
) -> None:
    kv = await agent_load_with_history(nc)
    for qps in (1, 2, 3, 4, 5):
        await kv.put("default.echo.inst1", json.dumps({"qps": qps, "in_flight": 2}).encode())
    await kv.put("default.echo.inst2", b'{"qps": 100, "in_flight": 100}')
    await kv.delete("default.echo.inst2")  # stopped: its older heartbeat is no instance

    agents = (await collect(nc, build=BUILD)).to_dict()["agents"]

    assert [(a["name"], a["load"]["instances"]) for a in agents] == [("echo", 1)]
    load = agents[0]["load"]
    assert (load["qps"], load["in_flight"]) == (5.0, 2.0)
    assert [i["instance"] for i in agents[0]["instances"]] == ["inst1"]


async def test_absurd_heartbeat_numbers_leave_the_status_document_valid_json(
    nc: NatsClient,
) -> None:
    kv = await agent_load_with_history(nc)
    huge = b'{"qps": 1.0e308, "in_flight": 1.0e308, "p99_ms": -5, "error_rate": 7}'
    await kv.put("default.buggy.a", huge)
    await kv.put("default.buggy.b", huge)
    await kv.put("default.buggy.c", b'{"qps": 1e400}')  # not a heartbeat (no such double)
    await kv.put("default.ocr.x", b'{"qps": 3.5, "in_flight": 1, "p99_ms": 20}')

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
