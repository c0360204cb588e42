"""The Python client against the real server: typed results, errors, safe retries."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from broker.client import BrokerClient, RetryPolicy, SyncBrokerClient
from broker.embedded import NatsServer, ServerSpec
from broker.errors import (
    IncompatibleSchema,
    InvalidSubject,
    NotFound,
    SchemaNotFound,
    SequenceConflict,
    SubjectNotFound,
    Unavailable,
    UnsupportedMediaType,
)
from broker.registry.commands import VersionConflict
from broker.registry.manifest import ManifestInvalid
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e


async def count(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info("MESSAGES", subjects_filter=subject)
    await nc.close()
    return sum((info.state.subjects or {}).values())


async def test_publish_returns_typed_acks_and_errors(broker: BrokerProcess) -> None:
    async with BrokerClient(broker.base_url) as client:
        ack = await client.publish("client.typed", {"hello": "world"})
        assert (ack.stream, ack.duplicate) == ("MESSAGES", False)
        again = await client.publish(
            "client.typed", {"hello": "world"}, key="k-" + uuid.uuid4().hex
        )
        assert again.seq > ack.seq
        with pytest.raises(InvalidSubject):
            await client.publish("bad.*", b"x")
        with pytest.raises(UnsupportedMediaType):
            await client.publish("ok", b"x", content_type="application/x-www-form-urlencoded")
        with pytest.raises(SequenceConflict):
            await client.publish("client.typed", b"x", expected_last_subject_sequence=1)


async def test_batch_results_are_typed(broker: BrokerProcess) -> None:
    async with BrokerClient(broker.base_url) as client:
        results = await client.publish_batch(
            [{"data": 1}, {"subject": "bad.*", "data": 2}, {"data_base64": "AAE="}],
            subject="client.batch",
        )
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, InvalidSubject)


async def test_agents_through_the_client(broker: BrokerProcess) -> None:
    name = f"client-{uuid.uuid4().hex[:6]}"
    manifest = {
        "name": name,
        "version": "1.0.0",
        "description": "Detects objects in images.",
        "capabilities": [{"action": "detect", "content_types": ["image/*"]}],
    }
    async with BrokerClient(broker.base_url) as client:
        created = await client.put_agent(manifest)
        assert created.event == "AgentRegistered"
        assert (await client.get_agent(name))["seq"] == created.seq
        with pytest.raises(VersionConflict):
            await client.put_agent({**manifest, "version": "2.0.0"}, if_match=created.seq - 1)
        with pytest.raises(ManifestInvalid) as invalid:
            await client.put_agent({**manifest, "version": "two"})
        assert invalid.value.error_code == "invalid_manifest"
        assert name in {a["name"] for a in await client.list_agents()}
        await client.delete_agent(name)
        with pytest.raises(NotFound):
            await client.get_agent(name)
        assert [e["type"] for e in await client.agent_history(name)] == [
            "AgentRegistered",
            "AgentDeregistered",
        ]


async def test_schema_registry_through_the_client(broker: BrokerProcess) -> None:
    """Registry answers come back typed, and Confluent's integer codes map to the tree."""
    subject = f"client-{uuid.uuid4().hex[:8]}"
    v1 = '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}'
    v2 = v1.replace("}]}", '}, {"name": "b", "type": "int"}]}')
    async with BrokerClient(broker.base_url) as client:
        schema_id = await client.register_schema(subject, v1)
        assert await client.register_schema(subject, v1) == schema_id
        got = await client.get_schema(schema_id)
        assert (got.schema_id, got.schema_type, got.schema) == (schema_id, "AVRO", v1)
        latest = await client.get_schema_version(subject)
        assert (latest.subject, latest.version) == (subject, 1)
        assert subject in await client.list_subjects()
        assert await client.check_compatibility(subject, v2)  # b has no default
        with pytest.raises(IncompatibleSchema):
            await client.register_schema(subject, v2)
        assert await client.set_compatibility("NONE", subject) == "NONE"
        assert await client.check_compatibility(subject, v2) == []
        with pytest.raises(SchemaNotFound) as missing:
            await client.get_schema(2**31 - 1)
        assert missing.value.status == 404
        with pytest.raises(SubjectNotFound):
            await client.get_schema_version(f"{subject}-none")


def test_sync_client(broker: BrokerProcess) -> None:
    with SyncBrokerClient(broker.base_url) as client:
        assert client.publish("client.sync", "text").stream == "MESSAGES"


async def test_retries_through_an_outage_store_exactly_once(tmp_path: Path) -> None:
    """NATS goes down: the ingress answers 503; the client retries with the same key until
    NATS is back. The stream holds each message once."""
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats")).start()
    broker = start_broker(tmp_path / "b", nats_url=server.url)
    subject = f"client.retry.{uuid.uuid4().hex[:6]}"
    try:
        async with BrokerClient(
            broker.base_url, retry=RetryPolicy(attempts=60, base_delay=0.1, max_delay=0.5)
        ) as client:
            await client.publish(subject, {"n": 0})
            server.stop()
            restart = threading.Timer(2.0, server.restart)
            restart.start()
            acks = await asyncio.gather(*(client.publish(subject, {"n": n}) for n in range(1, 6)))
            restart.join()
        assert len({a.seq for a in acks}) == 5
        assert await count(server.url, f"msg.default.{subject}") == 6
    finally:
        broker.stop()
        server.stop()


async def test_streaming_publish_yields_acks_while_sending(
    broker: BrokerProcess, module_nats: NatsServer
) -> None:
    """Record i+1 is only produced after record i's ack came back: this completes only
    if acks stream back while the request body is still open."""
    subject = f"client.stream.{uuid.uuid4().hex[:6]}"
    ack_seen = asyncio.Event()
    ack_seen.set()

    async def records() -> AsyncIterator[dict[str, object]]:
        for i in range(25):
            await asyncio.wait_for(ack_seen.wait(), 10)
            ack_seen.clear()
            yield {"data": {"i": i}} if i != 10 else {"subject": "bad.*", "data": i}

    results = []
    async with BrokerClient(broker.base_url) as client:
        async for result in client.publish_stream(records(), subject=subject):
            results.append(result)
            ack_seen.set()
    assert len(results) == 25
    assert [r.ok for r in results].count(False) == 1
    assert isinstance(results[10].error, InvalidSubject)
    seqs = [r.ack.seq for r in results if r.ack]
    assert seqs == sorted(seqs)
    assert await count(module_nats.url, f"msg.default.{subject}") == 24


async def test_a_failing_record_source_ends_the_stream_with_its_error(
    broker: BrokerProcess,
) -> None:
    """The source raising (or yielding a non-mapping) used to leave the broker waiting for
    more body and the caller waiting forever."""

    async def failing() -> AsyncIterator[dict[str, object]]:
        yield {"data": 1}
        raise RuntimeError("the source broke")

    async def not_mappings() -> AsyncIterator[Any]:
        yield {"data": 1}
        yield [1, 2]

    subject = f"client.fail.{uuid.uuid4().hex[:6]}"
    async with BrokerClient(broker.base_url, timeout=5) as client:
        for source, error in ((failing, RuntimeError), (not_mappings, TypeError)):
            with pytest.raises(error):
                await asyncio.wait_for(_drain(client.publish_stream(source(), subject=subject)), 10)


async def test_a_stream_cut_off_raises_with_what_was_acked(tmp_path: Path) -> None:
    """A connection that closes (the ingress killed) or never answers is Unavailable,
    never a stream that ends normally with fewer results than records."""

    async def close_at_once(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def say_nothing(reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
        await reader.read()  # holds the connection open, answers nothing

    async def records() -> AsyncIterator[dict[str, object]]:
        for i in range(3):
            yield {"data": i}

    for handler in (close_at_once, say_nothing):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with BrokerClient(f"http://127.0.0.1:{port}", timeout=1) as client:
                with pytest.raises(Unavailable, match=r"0 of the \d records sent were acked"):
                    await asyncio.wait_for(
                        _drain(client.publish_stream(records(), subject="s")), 10
                    )
        finally:
            server.close()


async def _drain(results: AsyncIterator[Any]) -> list[Any]:
    return [result async for result in results]
