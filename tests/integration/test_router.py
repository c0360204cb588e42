"""The router's loop on a real nats-server: a costly embedder embeds each fetched batch (and
the agents its decisions need) in one call, off the event loop; a stopped router leaves
its connection free to close."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import nats
import orjson
import pytest
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from broker.envelope import Outbound, Tenant
from broker.errors import Unavailable
from broker.publisher import _DRAIN_SECONDS, Publisher
from broker.registry.commands import put_agent
from broker.registry.manifest import AgentManifest
from broker.registry.snapshot import RegistryView
from broker.routing import Scorer
from broker.routing import router as router_module
from broker.routing.embedder import Embedder, HashingEmbedder, Matrix
from broker.routing.events import (
    H_DECISION_TO,
    H_REPLY_TO,
    H_ROUTE_MODE,
    ROUTE_MODE_AUTO,
    FailureReason,
    RouteDecided,
    RouteFailed,
)
from broker.routing.load import LoadView
from broker.routing.policy import DEFAULT_POLICY
from broker.routing.replies import reply_headers, reply_subject
from broker.routing.router import Router, decision_id_key
from broker.routing.types import DecisionReason
from broker.streams import ATTEMPTS_BUCKET, KEYS_BUCKET, Stream, dlq_subject
from tests._wait import await_until
from tests.unit.test_routing_embed_ahead import CostlyEmbedder
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration
T = Tenant("acme")
AGENTS = {
    "translator": ("translate", "Translates text between languages: German, French, Spanish."),
    "weather": ("forecast", "Answers questions about the weather forecast, temperature and rain."),
    "summarizer": ("summarize", "Summarises long documents, articles and reports."),
}
REQUESTS = {
    "please translate this letter into German": "translator",
    "what does the weather forecast say about rain tomorrow": "weather",
    "summarise the attached quarterly report for me": "summarizer",
}


async def start_router(
    publisher: Publisher, embedder: Embedder
) -> tuple[Router, asyncio.Event, asyncio.Task[None]]:
    """A router on ``publisher``'s connection (every registered agent eligible, live or not),
    running until the event is set."""
    registry = RegistryView()
    await registry.start(publisher.js)
    policy = DEFAULT_POLICY.model_copy(update={"require_live": False})
    router = Router(publisher, Scorer(embedder, policy), policy, registry, LoadView())
    stop = asyncio.Event()
    return router, stop, asyncio.create_task(router.run(stop))


async def stored_failure(
    publisher: Publisher,
    route: RouteDecided,
    payload: bytes,
    original: dict[str, str] | None = None,
    *,
    reason: FailureReason = FailureReason.ERROR,
) -> tuple[RouteFailed, dict[str, str]]:
    """The failure of ``route`` an agent would send once ``route`` is stored in its inbox
    (as a router stores it), and that failure's headers."""
    decided = route.to_headers(original or {})
    ack = await publisher.publish(Outbound(route.subject, payload, dict(decided)))
    failure = RouteFailed(route, reason, "boom", "i-1", ack.seq)
    return failure, failure.to_headers(decided)


async def register_agents(publisher: Publisher) -> None:
    for name, (action, description) in AGENTS.items():
        manifest = {
            "name": name,
            "version": "1.0.0",
            "description": description,
            "capabilities": [{"action": action}],
        }
        await put_agent(publisher, T, AgentManifest.model_validate(manifest))


async def test_a_fetched_batch_is_embedded_once_and_routed_as_labelled(
    publisher: Publisher, nats_url: str
) -> None:
    await register_agents(publisher)
    texts = list(REQUESTS) * 8  # 24 messages, each text 8 times
    seqs = {}
    for text in texts:
        auto = {H_ROUTE_MODE: ROUTE_MODE_AUTO}
        ack = await publisher.publish(Outbound(f"msg.{T}.chat", text.encode(), auto))
        seqs[ack.seq] = text
    # A plain message is skipped by the router: its text is not embedded.
    await publisher.publish(Outbound(f"msg.{T}.chat", b"a message nobody routes", {}))

    embedder = CostlyEmbedder()
    router, stop, running = await start_router(publisher, embedder)
    try:

        async def all_routed() -> bool:
            return router.stats.routed == len(texts)

        assert await await_until(all_routed, timeout=20)
        assert router.stats.skipped == 1
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(running, 10)

    # The three distinct texts were embedded in one call, on a worker thread.
    # One call embedded the three distinct texts and the agents (the tenant's catalog was
    # not built yet), on the model's thread: the event loop never waited for the model.
    assert len(embedder.calls) == 1
    texts_embedded, thread = embedder.calls[0]
    assert set(REQUESTS) <= set(texts_embedded)
    assert len(texts_embedded) == len(REQUESTS) + len(AGENTS)
    assert thread != threading.get_ident()

    nc = await nats.connect(nats_url)
    sub = await nc.jetstream().subscribe(
        f"route.{T}.*", stream=Stream.ROUTES, ordered_consumer=True
    )
    routed = {}
    for _ in texts:
        stored = await sub.next_msg(timeout=5)
        decided = RouteDecided.from_headers(stored.headers or {})
        routed[decided.message_seq] = decided.decision.agent
    await nc.close()
    assert routed == {seq: REQUESTS[text] for seq, text in seqs.items()}


async def test_a_router_that_routed_messages_stops_and_its_connection_closes_at_once(
    nats_url: str, publisher: Publisher
) -> None:
    """nats-py never marks a pull subscription's fetched messages done, so a connection
    drained with the router's pull subscriptions still open waited out the whole drain
    timeout (and logged the cancelled wait as an error)."""
    auto = {H_ROUTE_MODE: ROUTE_MODE_AUTO}
    for _ in range(3):
        await publisher.publish(Outbound(f"msg.{T}.chat", b"hello", dict(auto)))
    own = Publisher([nats_url])
    own.start()
    assert await own.wait_connected(5)
    router, stop, running = await start_router(own, CostlyEmbedder())

    async def all_seen() -> bool:
        return router.stats.dead_lettered == 3  # no agents: each goes to the DLQ

    assert await await_until(all_seen, timeout=10)
    stop.set()
    await asyncio.wait_for(running, 5)
    started = time.monotonic()
    await own.close()
    assert time.monotonic() - started < _DRAIN_SECONDS / 2


async def test_a_batch_step_longer_than_the_ack_wait_gets_no_message_delivered_again(
    publisher: Publisher, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedding a batch ahead that takes longer than the whole ack wait (a big model, long
    texts): every message of the batch is told to JetStream as in progress (``+WPI``) every
    third of the ack wait while it runs, so none is delivered again to a second router
    sharing the consumer, and each is decided once. (The renewal used to come only after
    the step, too late for a step this long: the second router decided them too.)"""
    monkeypatch.setattr(router_module, "_ACK_WAIT", 0.6)  # renewals every 0.2 s
    auto = {H_ROUTE_MODE: ROUTE_MODE_AUTO}
    for text in REQUESTS:
        await publisher.publish(Outbound(f"msg.{T}.chat", text.encode(), dict(auto)))
    watcher = await nats.connect(nats_url)
    progress: list[bytes] = []

    async def on_ack(msg: Msg) -> None:
        progress.append(msg.data)

    await watcher.subscribe("$JS.ACK.MESSAGES.>", cb=on_ack)
    slow_model = CostlyEmbedder(delay=1.5)
    slow, stop, running = await start_router(publisher, slow_model)

    async def fetched() -> bool:  # the slow router holds the whole batch, embedding it
        return any(len(texts) == len(REQUESTS) for texts, _ in slow_model.calls)

    other = Publisher([nats_url])
    other.start()
    try:
        assert await await_until(fetched, timeout=10)
        assert await other.wait_connected(5)
        fast, stop_fast, running_fast = await start_router(other, CostlyEmbedder())

        async def all_decided() -> bool:
            return slow.stats.routed + slow.stats.dead_lettered == len(REQUESTS)

        try:
            assert await await_until(all_decided, timeout=10)
            await asyncio.sleep(1.0)  # past another ack wait: a redelivery would be decided
            consumer = await publisher.js.consumer_info(
                Stream.MESSAGES, router_module.ROUTER_CONSUMER
            )
        finally:
            stop.set()
            stop_fast.set()
            await asyncio.wait_for(asyncio.gather(running, running_fast), 5)
    finally:
        await other.close()
        await watcher.flush()
        await watcher.close()
    assert consumer.num_redelivered == 0
    assert fast.stats.routed + fast.stats.dead_lettered == 0
    assert progress.count(b"+WPI") >= 3 * len(REQUESTS)  # 1.5 s of step, one every 0.2 s


async def test_a_message_whose_decision_cannot_be_stored_is_dead_lettered_not_retried_forever(
    publisher: Publisher,
) -> None:
    """Stored headers just under JetStream's 64 KiB limit (a 32 KiB Broker-Text, ~31 KiB
    of ce-* attributes) leave no room for the decision's own: the append is refused every
    time. The message used to be handed back every second, for ever, with no decision and
    no DLQ entry; it is now dead-lettered with the headers routing needs."""
    await register_agents(publisher)
    headers = {H_ROUTE_MODE: ROUTE_MODE_AUTO, "Broker-Text": "translate " + "a" * 32 * 1024}
    headers |= {"Content-Type": "text/plain", "ce-pad": "p" * 800}
    headers |= {f"ce-ext{i:02d}": "x" * 1040 for i in range(30)}
    ack = await publisher.publish(Outbound(f"msg.{T}.big", b"please route me", headers))
    router, stop, running = await start_router(publisher, HashingEmbedder())

    async def dead_lettered() -> bool:
        return router.stats.dead_lettered == 1

    try:
        assert await await_until(dead_lettered, timeout=10)
        await asyncio.sleep(1.5)  # a message handed back would be tried again meanwhile
        consumer = await publisher.js.consumer_info(Stream.MESSAGES, router_module.ROUTER_CONSUMER)
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)
    assert (consumer.ack_floor.stream_seq, consumer.num_redelivered) == (ack.seq, 0)
    dlq = await publisher.js.get_last_msg(Stream.DLQ, dlq_subject(T))
    route = RouteDecided.from_headers(dlq.headers or {})
    assert (route.message_seq, route.decision.agent) == (ack.seq, None)
    assert "cannot be stored" in route.decision.detail
    assert (dlq.headers or {})["Content-Type"] == "text/plain"
    assert not any(name.startswith("ce-") for name in dlq.headers or {})
    assert (router.stats.routed, router.stats.dead_lettered) == (0, 1)


class Poisoned(CostlyEmbedder):
    """Fails on any text that says "poison", as a model might on one odd input."""

    def embed(self, texts: Sequence[str]) -> Matrix:
        if any("poison" in text for text in texts):
            raise RuntimeError("poisoned input")
        return super().embed(texts)


async def test_a_message_the_model_fails_on_is_retried_then_dead_lettered(
    publisher: Publisher, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One poison message neither stops the router nor comes back forever: it is delivered
    three times, then dead-lettered with the error; the rest of its batch is routed."""
    monkeypatch.setattr(router_module, "_FAILED_DECISION_DELAY", 0.1)
    await register_agents(publisher)
    auto = {H_ROUTE_MODE: ROUTE_MODE_AUTO}
    poison = await publisher.publish(
        Outbound(f"msg.{T}.chat", b"translate this poison pill", dict(auto))
    )
    for text in REQUESTS:
        await publisher.publish(Outbound(f"msg.{T}.chat", text.encode(), dict(auto)))
    router, stop, running = await start_router(publisher, Poisoned())

    async def all_decided() -> bool:
        return router.stats.routed == len(REQUESTS) and router.stats.dead_lettered == 1

    try:
        assert await await_until(all_decided, timeout=15)
        assert not running.done()
        assert router.stats.errors == 3
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)
    nc = await nats.connect(nats_url)
    sub = await nc.jetstream().subscribe(f"dlq.{T}.route", stream=Stream.DLQ, ordered_consumer=True)
    dead = RouteDecided.from_headers((await sub.next_msg(timeout=5)).headers or {})
    await nc.close()
    assert dead.message_seq == poison.seq
    assert "failed on 3 deliveries (RuntimeError: poisoned input)" in dead.decision.detail


async def routed_once(
    publisher: Publisher, nats_url: str, text: str
) -> tuple[nats.NATS, Any, Router, dict[str, str], Any]:
    """A stored routed message whose caller waits on a subscription, and a router (not
    running) to decide and deliver it by hand: a connection, the subscription, the router,
    the message's headers and its ack."""
    await register_agents(publisher)
    nc = await nats.connect(nats_url)
    notices = await nc.subscribe("decisions.redo")
    headers = {H_ROUTE_MODE: ROUTE_MODE_AUTO, H_DECISION_TO: "decisions.redo"}
    ack = await publisher.publish(Outbound(f"msg.{T}.chat", text.encode(), dict(headers)))
    registry = RegistryView()
    await registry.start(publisher.js)
    policy = DEFAULT_POLICY.model_copy(update={"require_live": False})
    router = Router(publisher, Scorer(CostlyEmbedder(), policy), policy, registry, LoadView())
    return nc, notices, router, headers, ack


async def test_a_decision_made_again_after_a_crash_reports_the_stored_one(
    publisher: Publisher, nats_url: str
) -> None:
    """A router that crashed after appending a decision and before its ack: the message comes
    back and is decided again, maybe for another agent (the loads moved). That append is
    deduplicated, so the inbox holds the first decision; the caller must hear that one."""
    text = "please translate this letter into German"
    nc, notices, router, headers, ack = await routed_once(publisher, nats_url, text)
    first = router.decide(T, text.encode(), headers, message_seq=ack.seq)
    assert first.agent == "translator"
    decided = RouteDecided(T, ack.seq, f"msg.{T}.chat", first)
    await router._deliver(decided, text.encode(), dict(headers))
    again = replace(decided, decision=replace(first, agent="weather"))
    await router._deliver(again, text.encode(), dict(headers))
    heard = [orjson.loads((await notices.next_msg(timeout=5)).data) for _ in range(2)]
    await nc.close()
    assert [h["agent"] for h in heard] == ["translator", "translator"]
    assert heard[0]["route_seq"] == heard[1]["route_seq"]
    assert router.stats.routed == 2
    assert router.stats.dead_lettered == 0


@pytest.mark.parametrize("first_for", ["translator", None])
async def test_a_decision_made_again_of_another_kind_keeps_the_first(
    publisher: Publisher, nats_url: str, first_for: str | None
) -> None:
    """Decided for an agent, the router crashes before its ack, and the message decided again
    finds nobody (the agent went away), or the other way round: the first decision stands,
    and the message is in the agent's inbox or in the DLQ, never both."""
    text = "please translate this letter into French"
    nc, notices, router, headers, ack = await routed_once(publisher, nats_url, text)
    routed = router.decide(T, text.encode(), headers, message_seq=ack.seq)
    nobody = replace(routed, agent=None, reason=DecisionReason.NO_CANDIDATE, detail="gone")
    first, second = (routed, nobody) if first_for else (nobody, routed)
    for decision in (first, second):
        route = RouteDecided(T, ack.seq, f"msg.{T}.chat", decision)
        await router._deliver(route, text.encode(), dict(headers))
    heard = [orjson.loads((await notices.next_msg(timeout=5)).data) for _ in range(2)]
    js = nc.jetstream()
    in_inbox = await js.stream_info(Stream.ROUTES, subjects_filter=f"route.{T}.translator")
    in_dlq = await js.stream_info(Stream.DLQ, subjects_filter=f"dlq.{T}.route")
    await nc.close()
    assert [h["agent"] for h in heard] == [first_for, first_for]
    inbox = sum((in_inbox.state.subjects or {}).values())
    dead = sum((in_dlq.state.subjects or {}).values())
    assert (inbox, dead) == ((1, 0) if first_for else (0, 1))
    # Each decision counts; a dead letter counts once, as the DLQ holds it once.
    assert (router.stats.routed, router.stats.dead_lettered) == ((2, 0) if first_for else (0, 1))


async def test_a_decision_id_an_agent_took_first_does_not_keep_the_message_from_its_inbox(
    publisher: Publisher, nats_url: str
) -> None:
    """An agent's user may publish its own ``.failed`` subject with any header: a guessed
    ``Nats-Msg-Id`` of the next decision made JetStream drop that decision as a duplicate,
    and the router took the agent's record for it. It is stored again without the id, and
    the caller hears the stored decision."""
    text = "please translate this letter into Spanish"
    nc, notices, router, headers, ack = await routed_once(publisher, nats_url, text)
    decision = router.decide(T, text.encode(), headers, message_seq=ack.seq)
    route = RouteDecided(T, ack.seq, f"msg.{T}.chat", decision)
    squat = Outbound(f"route.{T}.weather.failed", b"mine", {"Nats-Msg-Id": route.msg_id})
    taken = await publisher.publish(squat)
    await router._deliver(route, text.encode(), dict(headers))
    heard = orjson.loads((await notices.next_msg(timeout=5)).data)
    js = nc.jetstream()
    stored = await js.get_msg(Stream.ROUTES, heard["route_seq"])
    await nc.close()
    assert heard["agent"] == "translator"
    assert heard["route_seq"] != taken.seq
    assert stored.subject == f"route.{T}.translator"
    assert RouteDecided.from_headers(stored.headers or {}).message_seq == ack.seq


async def test_a_held_decision_id_whose_holder_cannot_be_read_hands_the_message_back(
    publisher: Publisher, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking the unread holder for the stored decision could leave the message in no inbox:
    the delivery fails as retryable instead (the message is decided again later)."""
    text = "please translate this letter into Dutch"
    nc, _, router, headers, ack = await routed_once(publisher, nats_url, text)
    route = RouteDecided(
        T, ack.seq, f"msg.{T}.chat", router.decide(T, text.encode(), headers, message_seq=ack.seq)
    )
    squat = {"Nats-Msg-Id": route.msg_id}
    await publisher.publish(Outbound(f"route.{T}.weather.failed", b"mine", squat))

    async def unreadable(*_: Any, **__: Any) -> Any:
        raise nats.errors.TimeoutError

    monkeypatch.setattr(router.js, "get_msg", unreadable)
    with pytest.raises(Unavailable) as refused:
        await router._deliver(route, text.encode(), dict(headers))
    await nc.close()
    assert refused.value.retryable


async def test_a_mirror_copys_id_an_agent_took_first_does_not_keep_it_from_the_shadow(
    publisher: Publisher, nats_url: str
) -> None:
    text = "please translate this letter into Italian"
    nc, _, router, headers, ack = await routed_once(publisher, nats_url, text)
    decision = replace(
        router.decide(T, text.encode(), headers, message_seq=ack.seq), mirror_to="weather"
    )
    route = RouteDecided(T, ack.seq, f"msg.{T}.chat", decision)
    shadow = replace(route, mirror=True, decision=replace(decision, agent="weather"))
    squat = {"Nats-Msg-Id": shadow.msg_id}
    await publisher.publish(Outbound(f"route.{T}.summarizer.failed", b"mine", squat))
    await router._deliver(route, text.encode(), dict(headers))
    copy = await nc.jetstream().get_last_msg(Stream.ROUTES, f"route.{T}.weather")
    await nc.close()
    copied = RouteDecided.from_headers(copy.headers or {})
    assert (copied.message_seq, copied.mirror) == (ack.seq, True)


async def test_decision_ids_are_keyed_so_no_agent_can_send_one_first(
    publisher: Publisher, nats_url: str
) -> None:
    """With the key from ``broker_keys`` (the same for every router), the id an agent could
    compute holds nothing of the router's, and a decision made again after a crash is still
    deduplicated against the first."""
    key = await decision_id_key(publisher.js)
    assert len(key) == 32
    assert await decision_id_key(publisher.js) == key  # what a second router reads
    text = "please translate this letter into Polish"
    nc, notices, router, headers, ack = await routed_once(publisher, nats_url, text)
    router.id_key = key
    decision = router.decide(T, text.encode(), headers, message_seq=ack.seq)
    route = RouteDecided(T, ack.seq, f"msg.{T}.chat", decision)
    squat = Outbound(f"route.{T}.weather.failed", b"mine", {"Nats-Msg-Id": route.msg_id})
    await publisher.publish(squat)
    with capture_logs() as logs:
        await router._deliver(route, text.encode(), dict(headers))
        await router._deliver(route, text.encode(), dict(headers))  # after a crash
    heard = [orjson.loads((await notices.next_msg(timeout=5)).data) for _ in range(2)]
    stored = await nc.jetstream().get_msg(Stream.ROUTES, heard[0]["route_seq"])
    await nc.close()
    assert heard[0]["route_seq"] == heard[1]["route_seq"]
    assert not [e for e in logs if e["event"] == "route_id_taken"]
    assert (stored.headers or {})["Nats-Msg-Id"] == route.keyed_msg_id(key) != route.msg_id


async def test_the_first_router_makes_the_key_bucket_when_it_was_not_provisioned(
    publisher: Publisher,
) -> None:
    """A router started before ``broker serve`` provisioned ``broker_keys`` (an upgrade)
    makes it rather than run with ids no other router hashes alike."""
    await publisher.js.delete_key_value(KEYS_BUCKET)
    key = await decision_id_key(publisher.js)
    assert await decision_id_key(publisher.js) == key
    info = await publisher.js.stream_info(f"KV_{KEYS_BUCKET}")
    assert info.config.max_msgs_per_subject == 1


def test_a_failure_record_carries_no_deduplication_id_another_agent_could_take() -> None:
    route = RouteDecided(T, 9, f"msg.{T}.chat", replace(_decision(), agent="translator"))
    failure = RouteFailed(route, FailureReason.ERROR, "boom", "i-1")
    assert "Nats-Msg-Id" not in failure.to_headers({"Nats-Msg-Id": "x", "Content-Type": "a/b"})


async def test_a_retry_embeds_a_new_text_off_the_event_loop(publisher: Publisher) -> None:
    """A failed message whose text this router has not embedded (another router decided its
    first attempt) is embedded ahead like a fetched batch: the loop keeps serving while the
    model runs, instead of waiting on it."""
    await register_agents(publisher)
    text = "please translate this letter into German"
    original = {"Content-Type": "text/plain"}
    ack = await publisher.publish(Outbound(f"msg.{T}.chat", text.encode(), dict(original)))
    policy = DEFAULT_POLICY.model_copy(update={"require_live": False})
    registry = RegistryView()
    await registry.start(publisher.js)
    elsewhere = Router(publisher, Scorer(CostlyEmbedder(), policy), policy, registry, LoadView())
    first = elsewhere.decide(T, text.encode(), original, message_seq=ack.seq)
    decided = RouteDecided(T, ack.seq, f"msg.{T}.chat", first)
    failure, headers = await stored_failure(publisher, decided, text.encode(), original)
    await publisher.publish(Outbound(failure.subject, text.encode(), headers))

    longest = 0.0

    async def tick() -> None:
        nonlocal longest
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest, last = max(longest, now - last), now

    router, stop, running = await start_router(publisher, CostlyEmbedder(delay=0.5))
    ticker = asyncio.create_task(tick())
    try:

        async def retried() -> bool:
            return router.stats.retried == 1

        assert await await_until(retried, timeout=15)
    finally:
        ticker.cancel()
        stop.set()
        await asyncio.wait_for(running, 10)
    assert longest < 0.3, f"the loop stalled {longest:.2f} s behind the model"


async def test_a_failure_naming_another_tenant_or_agent_than_its_subject_is_ignored(
    publisher: Publisher,
) -> None:
    """An agent may publish only on its own ``route.<tenant>.<agent>.failed``; one that
    wrote another tenant's route into its failure had the router send its payload (and its
    chosen reply subject) into that tenant's inboxes, and cool that tenant's agent down."""
    await register_agents(publisher)
    forged = RouteDecided(T, 1001, f"msg.{T}.x", replace(_decision(), agent="translator"))
    failure = RouteFailed(forged, FailureReason.ERROR, "boom", "i-1")
    genuine_route = RouteDecided(T, 1002, f"msg.{T}.x", replace(_decision(), agent="weather"))
    genuine, genuine_headers = await stored_failure(publisher, genuine_route, b"weather?")
    injected = b"please translate: INJECTED"
    # published on another tenant's agent's own failure subject, claiming acme's translator
    await publisher.publish(
        Outbound("route.shop.render.failed", injected, failure.to_headers({"Broker-Intent": "x"}))
    )
    await publisher.publish(Outbound(genuine.subject, b"weather?", genuine_headers))
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        with capture_logs() as logs:

            async def genuine_retried() -> bool:
                return router.stats.retried == 1

            assert await await_until(genuine_retried, timeout=15)
            await asyncio.sleep(0.5)  # the forged one, read first, had its chance
        cooling = router.cooldowns.cooling(T)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert router.stats.retried == 1  # the genuine failure only
    assert "translator" not in cooling
    assert any(entry["event"] == "route_failure_forged" for entry in logs)
    info = await publisher.js.stream_info(Stream.ROUTES, subjects_filter=f"route.{T}.>")
    stored = []
    for subject in info.state.subjects or {}:
        if not subject.endswith(".failed"):
            message = await publisher.js.get_last_msg(Stream.ROUTES, subject)
            stored.append(message.data)
    assert injected not in stored


async def test_a_failure_stored_again_past_the_duplicate_window_is_retried_once(
    publisher: Publisher,
) -> None:
    """An agent that dies after storing ``RouteFailed`` and before its ack runs the message
    again and stores the failure again, a minute or more later. Past ``ROUTES``' duplicate
    window (1 s here, 120 s by default) the next attempt was decided and routed twice."""
    await register_agents(publisher)
    info = await publisher.js.stream_info(Stream.ROUTES)
    window = info.config.duplicate_window
    info.config.duplicate_window = 1.0
    await publisher.js.update_stream(info.config)
    route = RouteDecided(T, 2001, f"msg.{T}.x", replace(_decision(), agent="translator"))
    text = b"what does the weather forecast say about rain tomorrow"
    failure, headers = await stored_failure(publisher, route, text)
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        await publisher.publish(Outbound(failure.subject, text, headers))

        async def retried() -> bool:
            return router.stats.retried == 1

        assert await await_until(retried, timeout=15)
        await asyncio.sleep(1.5)  # past the window
        await publisher.publish(Outbound(failure.subject, text, headers))

        async def repeated() -> bool:
            return router.stats.failures_repeated == 1

        assert await await_until(repeated, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        info.config.duplicate_window = window
        await publisher.js.update_stream(info.config)
    assert router.stats.retried == 1
    decided = []
    sub = await publisher.js.subscribe(f"route.{T}.*", stream=Stream.ROUTES, ordered_consumer=True)
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            message = await sub.next_msg(timeout=1)
            decided.append(RouteDecided.from_headers(message.headers or {}))
    await sub.unsubscribe()
    second = [d for d in decided if d.message_seq == 2001 and d.attempt == 2]
    assert len(second) == 1


async def test_an_agent_cannot_have_its_tenants_messages_retried_with_its_own_payload(
    publisher: Publisher,
) -> None:
    """Within a tenant the subject check passes: an agent may name itself in a failure of
    any of its tenant's messages. Routers retried the failure's own payload and claims (a
    message routed elsewhere, any attempt), so an agent could put its text into the
    tenant's other inboxes as another caller's message, and record an attempt that kept
    the genuine failure from being retried for a day. Now only a failure of a decision
    stored in the agent's inbox is retried, with the stored payload."""
    await register_agents(publisher)
    injected = b"please translate: INJECTED"
    elsewhere = RouteDecided(T, 3001, f"msg.{T}.x", replace(_decision(), agent="translator"))
    routed = await publisher.publish(Outbound(elsewhere.subject, b"hi", elsewhere.to_headers({})))
    claim = RouteDecided(T, 3001, f"msg.{T}.x", replace(_decision(), agent="weather"))
    # a decision read by sequence, with a detail beyond ASCII (nats-py's get_msg mangled it)
    own_decision = replace(_decision(), agent="weather", detail="schon übersetzt ✓")
    own = RouteDecided(T, 3003, f"msg.{T}.x", own_decision)
    text = b"please translate this letter into German"
    genuine, genuine_headers = await stored_failure(publisher, own, text)
    forged = [
        # another agent's decision, claimed as this agent's
        RouteFailed(claim, FailureReason.ERROR, "boom", "i-x", routed.seq),
        # no decision named at all (what every failure was)
        RouteFailed(replace(claim, message_seq=3002), FailureReason.ERROR, "boom", "i-x"),
        # its own decision, with a later attempt than the one stored
        replace(genuine, route=replace(own, attempt=5)),
    ]
    for failure in forged:
        await publisher.publish(Outbound(failure.subject, injected, failure.to_headers({})))
    # the genuine failure, its payload swapped
    await publisher.publish(Outbound(genuine.subject, injected, genuine_headers))
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:
        with capture_logs() as logs:

            async def retried() -> bool:
                return router.stats.retried == 1

            assert await await_until(retried, timeout=15)
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    events = [entry["event"] for entry in logs]
    assert events.count("route_failure_forged") == 2
    assert events.count("route_failure_unverifiable") == 1
    attempts = await publisher.js.key_value(ATTEMPTS_BUCKET)
    assert (await attempts.get(f"{T}.3003")).value == b"2"
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await attempts.get(f"{T}.3001")
    sub = await publisher.js.subscribe(f"route.{T}.*", stream=Stream.ROUTES, ordered_consumer=True)
    second: list[tuple[RouteDecided, bytes]] = []
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            message = await sub.next_msg(timeout=1)
            route = RouteDecided.from_headers(message.headers or {})
            if route.message_seq in (3001, 3002, 3003) and route.attempt > 1:
                second.append((route, message.data))
    await sub.unsubscribe()
    assert [(route.message_seq, route.attempt, data) for route, data in second] == [(3003, 2, text)]


async def test_a_message_stored_on_a_condition_is_routed_without_it(publisher: Publisher) -> None:
    """``POST /v1/route`` takes ``Expected-Last-Subject-Sequence`` like a publish: the
    message is stored with ``Nats-Expected-Last-Subject-Sequence``. Routers copied it into
    the decision, where JetStream checked it against the agent's inbox: the second message
    routed to an agent was refused and dead-lettered (its decision "cannot be stored")."""
    await register_agents(publisher)
    text = b"please translate this letter into German"
    for subject in ("a", "b", "c"):
        conditional = {H_ROUTE_MODE: ROUTE_MODE_AUTO, "Nats-Expected-Last-Subject-Sequence": "0"}
        await publisher.publish(Outbound(f"msg.{T}.cond-{subject}", text, conditional))
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:

        async def all_decided() -> bool:
            return router.stats.routed + router.stats.dead_lettered >= 3

        assert await await_until(all_decided, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert (router.stats.routed, router.stats.dead_lettered) == (3, 0)


async def test_a_failure_of_a_message_already_answered_is_neither_retried_nor_dead(
    publisher: Publisher,
) -> None:
    """An agent that replied and lost its ack runs the message again after ack_wait, past
    its deadline: its ``expired`` failure dead-lettered a message whose caller had the
    reply (and a retryable failure would have run it on another agent)."""
    await register_agents(publisher)
    route = RouteDecided(T, 4001, f"msg.{T}.x", replace(_decision(), agent="translator"))
    text = b"please translate this letter into German"
    waiting = {H_REPLY_TO: "_BROKER_REPLY.x.1", "Broker-Deadline": "1"}
    failure, headers = await stored_failure(
        publisher, route, text, waiting, reason=FailureReason.EXPIRED
    )
    answered = reply_headers(failure.route_seq or 0, {"Content-Type": "text/plain"})
    await publisher.publish(Outbound(reply_subject(T, "translator", 4001), b"done", answered))
    await publisher.publish(Outbound(failure.subject, text, headers))
    router, stop, running = await start_router(publisher, HashingEmbedder())
    try:

        async def seen() -> bool:
            return router.stats.failures_answered == 1

        assert await await_until(seen, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert (router.stats.retried, router.stats.dead_lettered) == (0, 0)
