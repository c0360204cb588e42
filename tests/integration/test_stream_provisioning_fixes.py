"""Provisioning finds every stream and bucket difference the broker cannot live with, and
bounds every stream that keeps a copy of a payload; against a real nats-server."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    PersistMode,
    StoreCompression,
    StreamConfig,
    StreamConsumerLimits,
    StreamSource,
    SubjectTransform,
)

from broker.errors import StreamConfigConflict
from broker.settings import Settings
from broker.streams import AGENT_LOAD_BUCKET, Stream, agent_load_spec, provision, stream_specs

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


def _spec(name: str, settings: Settings | None = None) -> StreamConfig:
    return next(spec for spec in stream_specs(settings or Settings()) if spec.name == name)


async def test_per_subject_limit_on_messages_is_a_conflict_not_silent_loss(
    js: JetStreamContext,
) -> None:
    """A MESSAGES stream that keeps one message per subject would answer every publish with
    a new sequence and keep only the newest: provisioning refuses it (exit code 4), and
    ``--update-streams`` lifts the limit in place, keeping what the operator chose in fields
    the broker does not compare (compression here)."""
    drifted = dataclasses.replace(
        _spec(Stream.MESSAGES), max_msgs_per_subject=1, compression=StoreCompression.S2
    )
    await js.add_stream(drifted)
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, Settings())
    assert "stream MESSAGES" in caught.value.message
    assert "max_msgs_per_subject: existing=1 wanted=-1" in caught.value.message
    assert "--update-streams" in caught.value.message

    report = await provision(js, Settings(), update=True)
    assert report.updated == [Stream.MESSAGES]
    config = (await js.stream_info(Stream.MESSAGES)).config
    assert config.max_msgs_per_subject == -1
    assert config.compression == StoreCompression.S2
    for n in range(3):
        await js.publish("msg.default.greetings", str(n).encode())
    assert (await js.stream_info(Stream.MESSAGES)).state.messages == 3
    again = await provision(js, Settings())
    assert Stream.MESSAGES in again.unchanged
    assert again.updated == []


#: A value the broker cannot live with, for each field it leaves at JetStream's default, and
#: whether JetStream lets ``--update-streams`` put the default back.
_DRIFTS: list[tuple[str, dict[str, Any], bool]] = [
    ("max_msgs_per_subject", {"max_msgs_per_subject": 5}, True),
    (
        "discard_new_per_subject",
        {"discard": DiscardPolicy.NEW, "max_msgs_per_subject": 5, "discard_new_per_subject": True},
        True,
    ),
    ("max_consumers", {"max_consumers": 3}, True),
    ("consumer_limits", {"consumer_limits": StreamConsumerLimits(inactive_threshold=30.0)}, True),
    ("no_ack", {"no_ack": True}, True),
    ("sources", {"sources": [StreamSource(name="OTHER")]}, True),
    ("subject_transform", {"subject_transform": SubjectTransform(src="msg.>", dest="x.>")}, True),
    ("subject_delete_marker_ttl", {"allow_msg_ttl": True, "subject_delete_marker_ttl": 60.0}, True),
    ("allow_msg_counter", {"allow_msg_counter": True}, False),
    ("persist_mode", {"persist_mode": PersistMode.ASYNC}, False),
]


@pytest.mark.parametrize(
    ("field", "drift", "updatable"), _DRIFTS, ids=[field for field, _, _ in _DRIFTS]
)
async def test_each_field_the_broker_relies_on_is_compared(
    js: JetStreamContext, field: str, drift: dict[str, Any], updatable: bool
) -> None:
    await js.add_stream(StreamConfig(name="OTHER", subjects=["other.>"]))
    await js.add_stream(dataclasses.replace(_spec(Stream.MESSAGES), **drift))
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, Settings())
    assert f"{field}: existing=" in caught.value.message

    if not updatable:
        with pytest.raises(StreamConfigConflict, match="migrate the stream"):
            await provision(js, Settings(), update=True)
        return
    report = await provision(js, Settings(), update=True)
    assert report.updated == [Stream.MESSAGES]
    again = await provision(js, Settings())
    assert again.updated == []
    assert Stream.MESSAGES in again.unchanged


async def test_a_mirror_is_a_conflict(js: JetStreamContext) -> None:
    """A mirror refuses appends; updated in place it becomes the broker's stream."""
    await js.add_stream(StreamConfig(name="OTHER", subjects=["other.>"]))
    await js.add_stream(StreamConfig(name=Stream.MESSAGES, mirror=StreamSource(name="OTHER")))
    with pytest.raises(StreamConfigConflict, match="mirror: existing="):
        await provision(js, Settings())
    await provision(js, Settings(), update=True)
    config = (await js.stream_info(Stream.MESSAGES)).config
    assert config.mirror is None
    assert config.subjects == ["msg.>"]
    assert (await js.publish("msg.default.a", b"1")).stream == Stream.MESSAGES


async def test_a_sealed_stream_is_a_conflict_that_cannot_be_updated(
    js: JetStreamContext,
) -> None:
    await js.add_stream(_spec(Stream.DLQ))
    await js.update_stream(dataclasses.replace(_spec(Stream.DLQ), sealed=True))
    with pytest.raises(StreamConfigConflict, match="sealed: existing=True") as caught:
        await provision(js, Settings(), update=True)
    assert "migrate the stream" in caught.value.message


async def test_an_update_jetstream_refuses_is_reported_as_a_conflict(
    js: JetStreamContext,
) -> None:
    """JetStream never clears deny_delete: the refusal is a configuration conflict naming
    the field and JetStream's reason (exit code 4 with a clear message), not a raw API
    error."""
    await js.add_stream(dataclasses.replace(_spec(Stream.MESSAGES), deny_delete=True))
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, Settings(), update=True)
    assert "deny_delete: existing=True wanted=False" in caught.value.message
    assert "JetStream refused the update" in caught.value.message


async def test_bucket_history_is_compared_and_updated_in_place(js: JetStreamContext) -> None:
    """With more than one value kept per key, old heartbeats look like more instances."""
    await js.create_key_value(dataclasses.replace(agent_load_spec(Settings()), history=10))
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, Settings())
    assert "KV_agent_load" in caught.value.message
    assert "history: existing=10 wanted=1" in caught.value.message

    report = await provision(js, Settings(), update=True)
    assert AGENT_LOAD_BUCKET in report.updated
    status = await (await js.key_value(AGENT_LOAD_BUCKET)).status()
    assert status.history == 1
    assert status.ttl == Settings().agent_load_ttl_seconds
    again = await provision(js, Settings())
    assert AGENT_LOAD_BUCKET in again.unchanged


async def test_bucket_ttl_difference_keeps_its_name(js: JetStreamContext) -> None:
    await js.create_key_value(dataclasses.replace(agent_load_spec(Settings()), ttl=300.0))
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, Settings())
    assert "ttl: existing=300.0 wanted=15.0" in caught.value.message


async def test_messages_limits_bound_every_copy_of_a_payload(js: JetStreamContext) -> None:
    """Capping MESSAGES caps ROUTES and DLQ too (they store routed payloads again), unless
    they have limits of their own; what is stored stays under the cap."""
    cap = 200_000
    settings = Settings(messages_max_bytes=cap, messages_max_age_seconds=3600)
    await provision(js, settings)
    for name in (Stream.MESSAGES, Stream.ROUTES, Stream.DLQ):
        config = (await js.stream_info(name)).config
        assert (config.max_bytes, config.max_age) == (cap, 3600.0), name
    body = b"x" * 60_000
    for n in range(10):
        await js.publish(f"route.default.echo.{n}", body)
        await js.publish(f"dlq.router.default.{n}", body)
    for name in (Stream.ROUTES, Stream.DLQ):
        assert 0 < (await js.stream_info(name)).state.bytes <= cap, name


async def test_routes_and_dlq_limits_of_their_own(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_MESSAGES_MAX_BYTES", "1000000")
    monkeypatch.setenv("BROKER_ROUTES_MAX_BYTES", "-1")
    monkeypatch.setenv("BROKER_ROUTES_MAX_AGE_SECONDS", "600")
    monkeypatch.setenv("BROKER_DLQ_MAX_AGE_SECONDS", "86400")
    monkeypatch.setenv("BROKER_DLQ_MAX_BYTES", "5000000")
    await provision(js, Settings())
    routes = (await js.stream_info(Stream.ROUTES)).config
    dlq = (await js.stream_info(Stream.DLQ)).config
    assert (routes.max_bytes, routes.max_age) == (-1, 600.0)
    assert (dlq.max_bytes, dlq.max_age) == (5_000_000, 86400.0)


async def test_streams_of_an_unbounded_release_are_bounded_with_update_streams(
    js: JetStreamContext,
) -> None:
    """ROUTES and DLQ made unbounded (as before these settings) differ once MESSAGES is
    capped; ``--update-streams`` applies the limits in place."""
    await provision(js, Settings())
    capped = Settings(messages_max_bytes=1_000_000)
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, capped)
    assert "max_bytes: existing=-1 wanted=1000000" in caught.value.message
    report = await provision(js, capped, update=True)
    assert set(report.updated) == {Stream.MESSAGES, Stream.ROUTES, Stream.DLQ}
    assert (await js.stream_info(Stream.DLQ)).config.max_bytes == 1_000_000


async def test_a_dlq_bounded_by_an_upgrade_names_what_the_update_deletes(
    js: JetStreamContext,
) -> None:
    """A release before ROUTES and DLQ followed MESSAGES' limits made DLQ without any (and
    ROUTES without a byte limit). Upgraded with a bounded MESSAGES, the start refuses with a
    message that says ``--update-streams`` deletes the dead letters past the new limit at
    once, and names the setting that keeps them; that setting starts without a DLQ conflict."""
    bounded = Settings(messages_max_age_seconds=3600, messages_max_bytes=1_000_000)
    old_dlq = dataclasses.replace(_spec(Stream.DLQ, bounded), max_age=0.0, max_bytes=-1)
    await js.add_stream(old_dlq)
    await js.publish("dlq.default.route", b"a dead letter waiting for a person")
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, bounded)
    message = caught.value.message
    assert "stream DLQ" in message
    assert "deletes at once the messages of DLQ (1 stored)" in message
    assert "BROKER_DLQ_MAX_AGE_SECONDS=0" in message
    assert "BROKER_DLQ_MAX_BYTES=-1" in message
    assert message.endswith("start with --update-streams to apply the wanted configuration")

    kept = Settings(
        messages_max_age_seconds=3600,
        messages_max_bytes=1_000_000,
        dlq_max_age_seconds=0.0,
        dlq_max_bytes=-1,
    )
    report = await provision(js, kept)
    assert Stream.DLQ in report.unchanged
    assert (await js.stream_info(Stream.DLQ)).state.messages == 1


async def test_an_empty_stream_bounded_by_an_update_gets_no_loss_warning(
    js: JetStreamContext,
) -> None:
    await provision(js, Settings())
    with pytest.raises(StreamConfigConflict) as caught:
        await provision(js, Settings(messages_max_bytes=1_000_000))
    assert "deletes" not in caught.value.message
