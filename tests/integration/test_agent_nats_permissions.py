"""An agent of tenant ``shop`` runs under the NATS permissions that docs/tenants.md gives an
agent's user, read from the page itself: it replies, reports a failure, heartbeats, makes
its inbox consumer again, gives up on a message delivered ``max_deliveries`` times, and
(with the page's extra lines) registers itself, without one permission violation. The same
user cannot fetch from or append to another tenant's (or agent's) inbox, read other
clients' inboxes, or write another instance's heartbeat."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from structlog.testing import capture_logs

from broker.agent import Agent, Request
from broker.embedded import NatsServer, ServerSpec
from broker.envelope import Outbound
from broker.errors import Unavailable
from broker.http.route import REPLY_PREFIX
from broker.natsconn import ConnectOptions, open_client
from broker.publisher import Publisher
from broker.routing.events import (
    H_REPLY_TO,
    FailureReason,
    RouteDecided,
    RouteFailed,
    failed_subject,
    inbox_subject,
)
from broker.routing.load import InstanceLoad, load_key
from broker.routing.replies import error_subject, reply_subject, stored_answer
from broker.settings import Settings
from broker.streams import AGENT_LOAD_BUCKET, Stream, provision
from tests._wait import await_until
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration

TENANTS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "tenants.md"
TENANT, NAME, OTHER_TENANT = "shop", "render", "billing"
BROKER_PASSWORD, AGENT_PASSWORD = "broker-secret", "agent-secret"
INBOX_PREFIX = f"_INBOX_{TENANT}_{NAME}"
CONSUMER = f"agent-{TENANT}~{NAME}"
CALLER = f"{REPLY_PREFIX}.caller"  # where an ingress waits for replies
MANIFEST: dict[str, Any] = {
    "name": NAME,
    "version": "1.0.0",
    "description": "Renders documents",
    "capabilities": [{"action": "render", "description": "render", "content_types": []}],
}


def documented_authorization(*, register: bool, without: str | None = None) -> str:
    """The page's ``authorization`` block for agent ``render`` of tenant ``shop``; with the
    lines an agent that registers itself needs added to its ``publish`` list; without the
    lines that hold ``without``."""
    blocks: list[str] = re.findall(r"```text\n(.*?)```", TENANTS_PAGE.read_text(), flags=re.DOTALL)
    config = next(block for block in blocks if block.startswith("authorization {"))
    if without is not None:
        kept = [line for line in config.splitlines(keepends=True) if without not in line]
        assert len(kept) < config.count("\n"), f"no line holds {without!r}"
        config = "".join(kept)
    if register:
        extra = next(block for block in blocks if "reg.<tenant>.agent.<name>" in block)
        assert config.count("publish: [\n") == 1
        config = config.replace("publish: [\n", "publish: [\n" + extra)
    for placeholder, value in {
        "<tenant>": TENANT,
        "<name>": NAME,
        "<broker-password>": BROKER_PASSWORD,
        "<agent-password>": AGENT_PASSWORD,
    }.items():
        config = config.replace(placeholder, value)
    assert "<" not in config, config
    return config


def broker_options() -> ConnectOptions:
    return ConnectOptions(user="broker", password=BROKER_PASSWORD)


def agent_options() -> ConnectOptions:
    """The agent's user, and the inbox prefix the page tells it to connect with."""
    options = ConnectOptions(user=f"agent-{TENANT}-{NAME}", password=AGENT_PASSWORD)
    options["inbox_prefix"] = INBOX_PREFIX
    return options


class Broker:
    """The server with the page's users, and the broker's own (unlimited) connection."""

    def __init__(self, server: NatsServer, publisher: Publisher) -> None:
        self.server = server
        self.publisher = publisher

    @property
    def js(self) -> JetStreamContext:
        return self.publisher.js

    async def route(self, tenant: str, seq: int, payload: bytes, *, reply: bool = True) -> None:
        """Append what a router appends: a ``RouteDecided`` for ``render`` of ``tenant``."""
        route = RouteDecided(tenant, seq, f"msg.{tenant}.docs", _decision(agent=NAME))
        headers = route.to_headers({H_REPLY_TO: CALLER} if reply else {})
        await self.publisher.publish(Outbound(route.subject, payload, headers))

    async def failure(self) -> RouteFailed | None:
        """The last ``RouteFailed`` stored for ``render`` of ``shop``."""
        try:
            raw = await self.js.get_last_msg(Stream.ROUTES, failed_subject(TENANT, NAME))
        except nats.js.errors.NotFoundError:
            return None
        return RouteFailed.from_headers(raw.headers or {})

    async def consumer_exists(self) -> bool:
        try:
            await self.js.consumer_info(Stream.ROUTES, CONSUMER)
        except nats.js.errors.NotFoundError:
            return False
        return True

    def violations(self, client: str) -> list[str]:
        """The server's permission-violation lines for connections whose name starts with
        ``client``."""
        return [
            line
            for line in self.server.log_path.read_text().splitlines()
            if "Violation" in line and f":{client}" in line
        ]


@asynccontextmanager
async def documented_broker(
    tmp_path: Path, *, register: bool = False, without: str | None = None
) -> AsyncIterator[Broker]:
    spec = ServerSpec(
        store_dir=tmp_path / "nats",
        extra_config=documented_authorization(register=register, without=without),
    )
    server = NatsServer(spec).start()
    publisher = Publisher([server.url], connect_options=broker_options())
    try:
        publisher.start()
        assert await publisher.wait_connected(5)
        await provision(publisher.js, Settings())
        yield Broker(server, publisher)
    finally:
        await publisher.close()
        server.stop()


@pytest.fixture
def no_agent_errors() -> Iterator[None]:
    """Fails the test when the agent logged a NATS error, a permission violation included
    (``agent_nats_error``, or ``nats_error`` of the publisher that registers it)."""
    with capture_logs() as logs:
        yield
    errors = [e for e in logs if e["event"] in {"agent_nats_error", "nats_error"}]
    assert errors == []


def make_agent(
    broker: Broker, calls: list[int], manifest: dict[str, Any] = MANIFEST, **options: Any
) -> Agent:
    """Agent ``render`` of ``shop`` under the page's user; its handler notes each message's
    sequence, fails on ``boom`` and echoes anything else."""
    agent = Agent(
        manifest,
        nats_url=broker.server.url,
        tenant=TENANT,
        ack_wait=1.0,
        heartbeat_interval=0.2,
        connect_options=agent_options(),
        **options,
    )

    @agent.handler
    async def handle(request: Request) -> dict[str, str]:
        calls.append(request.message_seq)
        if request.payload == b"boom":
            raise RuntimeError("boom")
        return {"rendered": request.text()}

    return agent


@asynccontextmanager
async def running(agent: Agent, broker: Broker) -> AsyncIterator[asyncio.Task[None]]:
    """``agent`` running against ``broker`` until the block ends (it must still run then)."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:

        async def heartbeating() -> bool:
            return await heartbeat(broker, agent) is not None

        assert await await_until(heartbeating, timeout=20), "the agent did not start"
        yield task
        assert not task.done(), task
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def heartbeat(broker: Broker, agent: Agent) -> InstanceLoad | None:
    kv = await broker.js.key_value(AGENT_LOAD_BUCKET)
    try:
        entry = await kv.get(load_key(TENANT, NAME, agent.instance))
    except nats.js.errors.KeyNotFoundError:
        return None
    return InstanceLoad.from_json(entry.value or b"")


def replied(replies: list[Msg], count: int) -> Callable[[], Awaitable[bool]]:
    async def enough() -> bool:
        return len(replies) >= count

    return enough


async def caller(broker: Broker) -> list[Msg]:
    """The replies that reach a caller waiting on :data:`CALLER`."""
    replies: list[Msg] = []

    async def on_reply(message: Msg) -> None:
        replies.append(message)

    await broker.publisher.nc.subscribe(CALLER, cb=on_reply)
    return replies


@pytest.mark.usefixtures("no_agent_errors")
async def test_an_agent_replies_fails_heartbeats_and_remakes_its_consumer_as_documented(
    tmp_path: Path,
) -> None:
    """A reply reaches the caller, a handler's failure is stored as ``RouteFailed``, the
    heartbeat is in ``agent_load`` (and deleted on stop), the inbox consumer deleted under
    the agent is made again and delivers the next message, and each message runs once (each
    ack landed): all without a permission violation of the agent's connection."""
    async with documented_broker(tmp_path) as broker:
        replies = await caller(broker)
        calls: list[int] = []
        agent = make_agent(broker, calls)
        async with running(agent, broker):
            load = await heartbeat(broker, agent)
            assert load is not None
            assert (load.tenant, load.agent) == (TENANT, NAME)

            await broker.route(TENANT, 1, b"doc-1")
            assert await await_until(replied(replies, 1), timeout=10)
            assert replies[0].data == b'{"rendered":"doc-1"}'
            stored = await stored_answer(broker.js, TENANT, 1)  # for a retried request
            assert stored is not None
            assert (stored.subject, stored.data) == (
                reply_subject(TENANT, NAME, 1),
                b'{"rendered":"doc-1"}',
            )

            await broker.route(TENANT, 2, b"boom")

            async def failure_stored() -> bool:
                return await broker.failure() is not None

            assert await await_until(failure_stored, timeout=10)
            failure = await broker.failure()
            assert failure is not None
            assert (failure.route.message_seq, failure.reason) == (2, FailureReason.ERROR)

            await broker.js.delete_consumer(Stream.ROUTES, CONSUMER)
            await broker.route(TENANT, 3, b"doc-3")
            assert await await_until(replied(replies, 2), timeout=20)
            assert replies[1].data == b'{"rendered":"doc-3"}'
            assert await broker.consumer_exists()
            await asyncio.sleep(2.5)  # over two ack_waits: an unacked message runs again
        assert calls == [1, 2, 3]
        assert len(replies) == 2
        assert await heartbeat(broker, agent) is None
        assert broker.violations(f"agent-{NAME}-") == []


@pytest.mark.usefixtures("no_agent_errors")
async def test_an_agent_gives_up_on_the_max_deliveries_th_delivery_as_documented(
    tmp_path: Path,
) -> None:
    """A message whose first delivery went unsettled (an instance died with it) is not run
    on its ``max_deliveries``-th (2nd) delivery: ``RouteFailed`` is stored and the message
    terminated, through the documented permissions."""
    async with documented_broker(tmp_path) as broker:
        calls: list[int] = []
        async with running(make_agent(broker, calls, max_deliveries=2), broker):
            pass  # made the inbox consumer
        await broker.route(TENANT, 1, b"poison", reply=False)
        died_with_it = await broker.js.pull_subscribe_bind(CONSUMER, stream=Stream.ROUTES)
        assert len(await died_with_it.fetch(1, timeout=5)) == 1  # never settled

        async with running(make_agent(broker, calls, max_deliveries=2), broker):

            async def failure_stored() -> bool:
                return await broker.failure() is not None

            assert await await_until(failure_stored, timeout=20)
            info = await broker.js.consumer_info(Stream.ROUTES, CONSUMER)
            assert (info.num_ack_pending, info.num_pending) == (0, 0)
        failure = await broker.failure()
        assert failure is not None
        assert failure.route.message_seq == 1
        assert "delivered 2 times without being settled" in failure.message
        assert calls == []
        assert broker.violations(f"agent-{NAME}-") == []


@pytest.mark.usefixtures("no_agent_errors")
async def test_an_agent_registers_itself_with_the_documented_register_lines(
    tmp_path: Path,
) -> None:
    """``register=True`` registers the manifest at start, and a later start with another
    version updates it (a read of the last event, then a conditional append)."""
    async with documented_broker(tmp_path, register=True) as broker:
        calls: list[int] = []
        async with running(make_agent(broker, calls, register=True), broker):
            pass
        async with running(
            make_agent(broker, calls, {**MANIFEST, "version": "1.1.0"}, register=True), broker
        ):
            pass
        raw = await broker.js.get_last_msg(Stream.REGISTRY, f"reg.{TENANT}.agent.{NAME}")
        assert raw.seq == 2
        assert (raw.headers or {}).get("Broker-Event-Type") == "AgentUpdated"
        assert b'"1.1.0"' in (raw.data or b"")
        assert broker.violations(f"agent-{NAME}-") == []


async def test_the_agent_user_reaches_no_other_inbox_consumer_or_heartbeat(
    tmp_path: Path,
) -> None:
    """Under the agent's user, a client cannot fetch from or read another tenant's inbox
    consumer, make its own consumer on their inbox, append to any inbox (its own included)
    or to another agent's failures, write another instance's heartbeat, or overhear other
    clients' inboxes (where the broker's reader gets their message): the server refuses
    each, and nothing is delivered or stored."""
    async with documented_broker(tmp_path) as broker:
        theirs = f"agent-{OTHER_TENANT}~{NAME}"
        their_inbox = inbox_subject(OTHER_TENANT, NAME)
        await broker.js.add_consumer(
            Stream.ROUTES,
            ConsumerConfig(
                durable_name=theirs, ack_policy=AckPolicy.EXPLICIT, filter_subject=their_inbox
            ),
        )
        await broker.route(OTHER_TENANT, 1, b"their secret", reply=False)
        forged = [
            their_inbox,
            inbox_subject(TENANT, "other"),
            inbox_subject(TENANT, NAME),
            failed_subject(OTHER_TENANT, NAME),
            failed_subject(TENANT, "other"),
            reply_subject(TENANT, "other", 1),
            reply_subject(OTHER_TENANT, NAME, 1),
            error_subject(TENANT, 1),
            f"$KV.{AGENT_LOAD_BUCKET}.{OTHER_TENANT}.{NAME}.x",
        ]
        refused = [
            f"$JS.API.CONSUMER.MSG.NEXT.ROUTES.{theirs}",
            f"$JS.API.CONSUMER.INFO.ROUTES.{theirs}",
            f"$JS.API.CONSUMER.CREATE.ROUTES.{CONSUMER}.{their_inbox}",
            *forged,
        ]
        overheard: list[Msg] = []

        async def overhear(message: Msg) -> None:
            overheard.append(message)

        async def quiet(e: Exception) -> None:
            pass  # the server log is what the test reads

        intruder = await open_client(
            servers=[broker.server.url], name="intruder", error_cb=quiet, **agent_options()
        )
        try:
            await intruder.subscribe("_INBOX.>", cb=overhear)
            js = intruder.jetstream(timeout=1.0)
            sub = await js.pull_subscribe_bind(theirs, stream=Stream.ROUTES)
            with pytest.raises(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=1.0)
            with pytest.raises(nats.errors.TimeoutError):
                await js.consumer_info(Stream.ROUTES, theirs)
            with pytest.raises(nats.errors.TimeoutError):
                await js.add_consumer(
                    Stream.ROUTES,
                    ConsumerConfig(
                        name=CONSUMER, durable_name=CONSUMER, filter_subject=their_inbox
                    ),
                )
            for subject in forged:
                await intruder.publish(subject, b"forged")
            await intruder.flush()

            reader = await broker.js.pull_subscribe_bind(theirs, stream=Stream.ROUTES)
            delivered = await reader.fetch(1, timeout=5)
            assert [m.data for m in delivered] == [b"their secret"]
            await delivered[0].ack()
            await broker.publisher.nc.flush()
            await intruder.flush()
        finally:
            await intruder.close()

        expected = [f'Publish Violation - Subject "{subject}"' for subject in refused]
        expected.append('Subscription Violation - Subject "_INBOX.>"')

        async def all_refused() -> bool:
            lines = "\n".join(broker.violations("intruder"))
            return all(line in lines for line in expected)

        assert await await_until(all_refused, timeout=10), broker.violations("intruder")
        assert overheard == []
        routes = await broker.js.stream_info(Stream.ROUTES)
        assert routes.state.messages == 1  # the broker's own decision, nothing forged
        kv = await broker.js.key_value(AGENT_LOAD_BUCKET)
        with pytest.raises(nats.js.errors.NoKeysError):
            await kv.keys()


async def test_an_agent_the_user_may_not_run_fails_to_start_with_unavailable(
    tmp_path: Path,
) -> None:
    """Agent ``render`` of ``billing`` under ``shop``'s user: its consumer requests go
    unanswered; ``run()`` raises ``Unavailable`` naming the permissions, not a bare timeout."""
    async with documented_broker(tmp_path) as broker:
        agent = Agent(
            MANIFEST,
            nats_url=broker.server.url,
            tenant=OTHER_TENANT,
            connect_options=agent_options(),
        )

        @agent.handler
        async def handle(request: Request) -> str:
            return "never"

        with pytest.raises(Unavailable, match=r"docs/tenants\.md"):
            await asyncio.wait_for(agent.run(asyncio.Event()), 60)


async def test_without_the_reply_line_the_agent_stops_storing_replies_at_the_first_refusal(
    tmp_path: Path,
) -> None:
    """The server refuses the first append (a permission violation, on the connection): the
    agent says so once and appends no more for a while, rather than a violation per reply;
    the callers still get their replies."""
    async with documented_broker(tmp_path, without=".reply.*") as broker:
        replies = await caller(broker)
        calls: list[int] = []
        agent = make_agent(broker, calls)
        with capture_logs() as logs:
            async with running(agent, broker):
                await broker.route(TENANT, 1, b"first")
                assert await await_until(replied(replies, 1), timeout=20)

                async def paused() -> bool:
                    return any("paused_seconds" in e for e in not_stored(logs))

                assert await await_until(paused, timeout=10), logs
                for seq in (2, 3, 4):
                    await broker.route(TENANT, seq, b"more")
                assert await await_until(replied(replies, 4), timeout=20)
                await asyncio.sleep(0.5)
        assert len(broker.violations("agent-")) == 1, broker.violations("agent-")
        (logged,) = not_stored(logs)
        assert reply_subject(TENANT, NAME, 1) in logged["error"]


def not_stored(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "agent_reply_not_stored"]
