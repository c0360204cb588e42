"""Settings an agent instance cannot work with are refused when it is made (``ValueError``),
not found out by heartbeats that fail, or are thrown away, for as long as it runs."""

from __future__ import annotations

import pytest

from broker.agent import Agent
from broker.routing.load import new_instance_id

pytestmark = pytest.mark.unit

MANIFEST = {
    "name": "sketch",
    "version": "1.0.0",
    "description": "Draws sketches",
    "capabilities": [{"action": "sketch", "description": "sketch", "content_types": []}],
}


@pytest.mark.parametrize("tenant", ["acme.eu", "acme corp", "", "a" * 65, "t>", "routes"])
def test_an_agent_of_a_tenant_that_cannot_be_is_refused(tenant: str) -> None:
    """A tenant that is not one subject token made the instance read a subject no router
    writes to (``route.acme.eu.sketch``, four tokens), and every heartbeat was refused as
    "not a tenant name" by the routers (or as an invalid key by NATS): the instance ran and
    was never given work. A reserved name is no tenant the ingress takes messages for."""
    with pytest.raises(ValueError, match="tenant"):
        Agent(MANIFEST, tenant=tenant)


@pytest.mark.parametrize("instance", ["pod 1", "pod.1", "pod*", "ü", "pod>"])
def test_an_instance_id_that_is_no_heartbeat_key_token_is_refused(instance: str) -> None:
    """The instance id is the last token of the heartbeat's key
    (``<tenant>.<agent>.<instance>``): one with a space failed every heartbeat with
    ``InvalidKeyError`` (logged, the agent ran on unseen by routers), one with a dot is
    outside the ``$KV.agent_load.<tenant>.<name>.*`` an agent's NATS user may write."""
    with pytest.raises(ValueError, match="instance"):
        Agent(MANIFEST, instance=instance)


def test_ids_the_sdk_makes_and_sensible_names_are_taken() -> None:
    assert Agent(MANIFEST, tenant="acme-eu_1", instance="pod-7_a").instance == "pod-7_a"
    assert Agent(MANIFEST, instance=new_instance_id()).tenant == "default"


@pytest.mark.parametrize("url", ["bogus://x", "nats://h:notaport", "", " , ", "nats://a b:4222"])
def test_a_nats_url_that_names_no_server_is_refused(url: str) -> None:
    """With reconnects for ever, such a URL was tried until the process was stopped, and the
    log said only that NATS could not be reached."""
    with pytest.raises(ValueError, match="nats_url"):
        Agent(MANIFEST, nats_url=url)


def test_a_cluster_of_nats_urls_is_taken_with_its_spaces() -> None:
    agent = Agent(MANIFEST, nats_url="nats://a:4222, nats://b:4222 ,c:4223")
    assert agent._servers == ["nats://a:4222", "nats://b:4222", "c:4223"]
