"""Streams and the agent_load bucket are provisioned idempotently against a real server."""

from __future__ import annotations

import nats
import pytest
from nats.js.api import StreamConfig

from broker.errors import StreamConfigConflict
from broker.settings import Settings
from broker.streams import (
    AGENT_LOAD_BUCKET,
    ATTEMPTS_BUCKET,
    KEYS_BUCKET,
    Stream,
    missing_streams,
    provision,
)

pytestmark = pytest.mark.integration


async def test_provisioning_twice_changes_nothing(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        first = await provision(js, Settings())
        assert sorted(first.created) == sorted(
            [*Stream, AGENT_LOAD_BUCKET, KEYS_BUCKET, ATTEMPTS_BUCKET]
        )
        before = {name: (await js.stream_info(name)).config for name in Stream}
        second = await provision(js, Settings())
        assert second.created == []
        assert second.updated == []
        assert sorted(second.unchanged) == sorted(
            [*Stream, AGENT_LOAD_BUCKET, KEYS_BUCKET, ATTEMPTS_BUCKET]
        )
        after = {name: (await js.stream_info(name)).config for name in Stream}
        assert before == after
        assert await missing_streams(js) == []
    finally:
        await nc.close()


async def test_conflicting_stream_is_reported_with_its_fields(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await js.add_stream(
            StreamConfig(name="MESSAGES", subjects=["msg.>"], duplicate_window=10.0)
        )
        with pytest.raises(StreamConfigConflict) as caught:
            await provision(js, Settings())
        assert "MESSAGES" in caught.value.message
        assert "duplicate_window" in caught.value.message
        # Asked to update, the broker applies the change JetStream allows in place.
        report = await provision(js, Settings(), update=True)
        assert "MESSAGES" in report.updated
        info = await js.stream_info("MESSAGES")
        assert info.config.duplicate_window == Settings().duplicate_window_seconds
    finally:
        await nc.close()


async def test_immutable_difference_is_never_updated(nats_url: str) -> None:
    from nats.js.api import StorageType

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await js.add_stream(
            StreamConfig(name="DLQ", subjects=["dlq.>"], storage=StorageType.MEMORY)
        )
        with pytest.raises(StreamConfigConflict, match="storage"):
            await provision(js, Settings(), update=True)
    finally:
        await nc.close()
