"""A broker stream holds more consumers than nats-server's default of 1,000 a stream (2.15
on): every agent's inbox is a consumer of ROUTES; against a real nats-server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import nats
import pytest
import pytest_asyncio
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from broker.errors import StreamConfigConflict
from broker.settings import Settings
from broker.streams import Stream, provision, stream_specs

pytestmark = pytest.mark.integration

#: nats-server's own limit for a stream that sets none (``default_max_consumers``).
SERVER_DEFAULT = 1000


@pytest_asyncio.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def _add_inboxes(js: JetStreamContext, count: int) -> None:
    """``count`` durable consumers on ROUTES, as that many agents' inboxes are."""
    for start in range(0, count, 100):
        await asyncio.gather(
            *(
                js.add_consumer(
                    Stream.ROUTES,
                    ConsumerConfig(
                        durable_name=f"agent-default~a{i}",
                        filter_subject=f"route.default.a{i}",
                        ack_policy=AckPolicy.EXPLICIT,
                    ),
                )
                for i in range(start, min(start + 100, count))
            )
        )


async def test_more_agents_than_the_servers_default_get_an_inbox(js: JetStreamContext) -> None:
    await provision(js, Settings())
    await _add_inboxes(js, SERVER_DEFAULT + 10)
    info = await js.stream_info(Stream.ROUTES)
    assert info.state.consumer_count == SERVER_DEFAULT + 10
    # With a thousand consumers, nats-server takes longer than its fixture waits to stop.
    await js.delete_stream(Stream.ROUTES)


async def test_a_stream_made_without_the_limit_gets_it_at_the_next_start(
    js: JetStreamContext,
) -> None:
    """Streams made by an earlier release set no limit; the next start sets it without
    ``--update-streams`` (it changes nothing else) and reports the stream updated."""
    for spec in stream_specs(Settings()):
        await js.add_stream(dataclasses.replace(spec, max_consumers=-1))
    report = await provision(js, Settings())
    assert sorted(report.updated) == sorted(spec.name for spec in stream_specs(Settings()))
    info = await js.stream_info(Stream.ROUTES)
    assert info.config.max_consumers == Settings().stream_max_consumers
    assert (await provision(js, Settings())).updated == []


async def test_a_limit_the_operator_set_is_still_a_conflict(js: JetStreamContext) -> None:
    (routes,) = [s for s in stream_specs(Settings()) if s.name == Stream.ROUTES]
    await js.add_stream(dataclasses.replace(routes, max_consumers=50))
    with pytest.raises(StreamConfigConflict, match="max_consumers: existing=50"):
        await provision(js, Settings())
