"""A registry event an agent stored on its own subject with a manifest too deep to serialize,
against a real server: readers skip it as unreadable instead of failing on it, and a put
over it replaces it (it failed with 422 ``manifest cannot be serialized``)."""

from __future__ import annotations

import pytest

from broker.envelope import NATS_EXPECTED_LAST_SUBJECT_SEQ, Tenant
from broker.publisher import Publisher
from broker.registry.commands import IfMatch, agent_history, put_agent, registry_as_of
from broker.registry.events import RegistryEventType
from broker.registry.manifest import canonical_json, validate_manifest
from broker.registry.snapshot import RegistryView
from tests.unit.test_review_registry_events import nested, stored_event

pytestmark = pytest.mark.integration
T = Tenant("t")


def manifest(name: str, description: str = "Renders documents.") -> dict[str, object]:
    return {
        "name": name,
        "version": "1.0.0",
        "description": description,
        "capabilities": [{"action": "render"}],
    }


async def test_a_manifest_too_deep_to_serialize_is_skipped_and_a_put_replaces_it(
    publisher: Publisher,
) -> None:
    neighbour = await put_agent(publisher, T, validate_manifest(manifest("neighbour")))
    first = await put_agent(publisher, T, validate_manifest(manifest("deep")))
    ack = await publisher.js.publish(
        f"reg.{T}.agent.deep",
        stored_event(nested(300), "AgentUpdated"),
        headers={NATS_EXPECTED_LAST_SUBJECT_SEQ: str(first.seq)},
    )

    view = RegistryView()
    await view.start(publisher.js)
    assert view.snapshot.last_seq == ack.seq
    assert view.skipped == 1
    # Every agent of the tenant still serializes, as the agent list answers them.
    agents = view.snapshot.agents(T)
    assert [a.name for a in agents] == ["deep", "neighbour"]
    assert all(canonical_json(a.manifest) for a in agents)
    assert view.snapshot.agent(T, "deep").seq == first.seq  # type: ignore[union-attr]
    assert view.snapshot.agent(T, "neighbour").seq == neighbour.seq  # type: ignore[union-attr]

    assert [e.seq for e in (await agent_history(publisher.js, T, "deep"))[0]] == [first.seq]
    as_of = await registry_as_of(publisher.js, T)
    assert as_of.last_seq == ack.seq
    assert all(canonical_json(a.manifest) for a in as_of.agents(T))

    fixed = validate_manifest(manifest("deep", "Renders documents again."))
    put = await put_agent(publisher, T, fixed, if_match=IfMatch.seq(ack.seq))
    assert put.event is not None
    assert put.event.type is RegistryEventType.UPDATED
    assert await view.wait_for(put.seq, 5.0)
    assert view.snapshot.agent(T, "deep").manifest == fixed  # type: ignore[union-attr]
