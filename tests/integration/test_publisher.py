"""The Publisher against a real server: its one reply subscription for every pending ack."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.envelope import (
    NATS_EXPECTED_LAST_SUBJECT_SEQ,
    NATS_MSG_ID,
    Outbound,
    PublishRequest,
    Tenant,
)
from broker.errors import IdempotencyKeyReused, SequenceConflict
from broker.publisher import Publisher


async def test_first_submits_at_once_share_one_reply_subscription(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many publishes before the reply subscription exists: one subscription, one sweeper,
    every ack delivered, even when subscribing lets other tasks run in between (nats-py
    yields there when its flush queue is full)."""
    nc = publisher.nc
    subscribe = nc.subscribe

    async def subscribe_after_a_yield(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await subscribe(*args, **kwargs)

    monkeypatch.setattr(nc, "subscribe", subscribe_after_a_yield)
    subscriptions_before = len(nc._subs)
    tasks_before = {t.get_name() for t in asyncio.all_tasks()}

    acks = await asyncio.gather(
        *(publisher.publish(Outbound(f"msg.default.first.{i}", b"{}", {})) for i in range(20))
    )

    assert sorted(a.seq for a in acks) == list(range(1, 21))
    assert len(nc._subs) == subscriptions_before + 1
    sweepers = [t for t in asyncio.all_tasks() if t.get_name() == "publish-ack-sweeper"]
    assert len(sweepers) == 1
    assert "publish-ack-sweeper" not in tasks_before


_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)


async def test_the_reply_subscription_and_sweeper_keep_no_requests_context(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made by the first publish, they live as long as the connection: they must not keep
    the context of the request that happened to publish first (its trace would parent every
    span, and its ids mark every log line, of the ack callbacks ever after)."""
    seen: list[tuple[str, str | None]] = []
    on_ack, sweep = publisher._on_ack, publisher._sweep

    async def watched_ack(msg: Any) -> None:
        seen.append(("ack", _REQUEST.get()))
        await on_ack(msg)

    async def watched_sweep() -> None:
        seen.append(("sweeper", _REQUEST.get()))
        await sweep()

    monkeypatch.setattr(publisher, "_on_ack", watched_ack)
    monkeypatch.setattr(publisher, "_sweep", watched_sweep)

    async def request(name: str) -> None:
        _REQUEST.set(name)
        await publisher.publish(Outbound(f"msg.default.context.{name}", b"{}", {}))

    for name in ("first", "second"):
        await asyncio.create_task(request(name))
    assert [who for who, _ in seen].count("ack") == 2
    assert "sweeper" in [who for who, _ in seen]
    assert {value for _, value in seen} == {None}


async def test_closing_is_not_reported_as_losing_the_server(nats_url: str) -> None:
    """A disconnect during ``close()`` is the plan (debug); losing the server is a warning."""
    pub = Publisher([nats_url])
    pub.start()
    assert await pub.wait_connected(5)
    with capture_logs() as logs:
        await pub.close()
    disconnects = [e for e in logs if e["event"] == "nats_disconnected"]
    assert disconnects
    assert all(e["log_level"] == "debug" for e in disconnects)


async def test_a_connect_hook_that_fails_runs_again_until_it_succeeds(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingress's registry starts in such a hook: JetStream without quorum at connect
    used to leave that worker unready for as long as it lived."""
    monkeypatch.setattr(asyncio, "sleep", _fast(asyncio.sleep))
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TimeoutError("nats: timeout")

    publisher = Publisher([nats_url])
    publisher.on_connected(flaky)
    publisher.start()
    try:
        for _ in range(200):
            if calls >= 3:
                break
            await _real_sleep(0.01)
        assert calls == 3
        await _real_sleep(0.1)
        assert calls == 3  # not after it succeeded
    finally:
        await publisher.close()


_real_sleep = asyncio.sleep


def _fast(sleep: Any) -> Any:
    async def shortened(delay: float, *args: Any) -> Any:
        return await sleep(min(delay, 0.01), *args)

    return shortened


async def test_a_conditional_publish_sent_again_is_its_own_duplicate_not_a_conflict(
    publisher: Publisher,
) -> None:
    """Stored, its answer lost, the retry (same key, same expected sequence) used to get a
    sequence conflict: JetStream checks the expected sequence before duplicates."""

    def conditional(key: str) -> Outbound:
        headers = {NATS_MSG_ID: key, NATS_EXPECTED_LAST_SUBJECT_SEQ: "0"}
        return Outbound("msg.default.ledger", b"credit 5", headers)

    first = await publisher.publish(conditional("default:credit-1"))
    again = await publisher.publish(conditional("default:credit-1"))
    assert (again.seq, again.duplicate) == (first.seq, True)
    with pytest.raises(SequenceConflict):  # someone else's write still conflicts
        await publisher.publish(conditional("default:credit-2"))


def _keyed(body: bytes, *, subject: str = "orders", expected: int | None = None) -> Outbound:
    request = PublishRequest(
        subject,
        body,
        "application/json",
        idempotency_key="order-7",
        expected_last_subject_sequence=expected,
    )
    return request.to_outbound(Tenant("default"))


async def _stored(publisher: Publisher, subject: str) -> int:
    info = await publisher.nc.jetstream().stream_info("MESSAGES", subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_a_key_used_again_for_another_request_is_refused_not_a_duplicate(
    publisher: Publisher,
) -> None:
    """JetStream deduplicates by the key alone: a client that reused a key for a new body got
    the first message's ack with ``duplicate: true``, and its new message was lost."""
    first = await publisher.publish(_keyed(b'{"qty": 1}'))
    retry = await publisher.publish(_keyed(b'{"qty": 1}'))
    assert (retry.seq, retry.duplicate) == (first.seq, True)
    with pytest.raises(IdempotencyKeyReused, match=f"seq {first.seq} of MESSAGES"):
        await publisher.publish(_keyed(b'{"qty": 2}'))
    with pytest.raises(IdempotencyKeyReused):  # another subject of the same stream
        await publisher.publish(_keyed(b'{"qty": 1}', subject="orders.eu"))
    # The same through submit + settle (batches, streams).
    out = _keyed(b'{"qty": 3}')
    with pytest.raises(IdempotencyKeyReused):
        await publisher.settle(out, await publisher.submit(out))
    assert await _stored(publisher, "msg.default.orders") == 1
    assert await _stored(publisher, "msg.default.orders.eu") == 0


async def test_a_conditional_retry_with_another_body_is_refused(publisher: Publisher) -> None:
    """The sequence conflict with its own earlier copy (``stored_already``) is checked too."""
    first = await publisher.publish(_keyed(b'{"qty": 1}', expected=0))
    again = await publisher.publish(_keyed(b'{"qty": 1}', expected=0))
    assert (again.seq, again.duplicate) == (first.seq, True)
    with pytest.raises(IdempotencyKeyReused):
        await publisher.publish(_keyed(b'{"qty": 2}', expected=0))


async def test_a_message_stored_without_a_digest_answers_as_a_duplicate(
    publisher: Publisher,
) -> None:
    """Stored by an older broker or straight through NATS: nothing to compare with, so the
    publish is taken for the retry it most likely is, as before."""
    js = publisher.nc.jetstream()
    plain = await js.publish("msg.default.orders", b"old", headers={NATS_MSG_ID: "default:order-7"})
    ack = await publisher.publish(_keyed(b'{"qty": 9}'))
    assert (ack.seq, ack.duplicate) == (plain.seq, True)
