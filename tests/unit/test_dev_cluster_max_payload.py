"""The dev cluster's nodes carry the broker's largest message: their ``max_payload`` follows
the message limit the broker processes get, by the embedded server's rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.devcluster import Topology, TopologySpec
from broker.embedded import DEFAULT_MAX_PAYLOAD, HEADER_ROOM, LARGEST_MAX_PAYLOAD

pytestmark = pytest.mark.unit

MIB = 1024 * 1024


def test_nodes_and_broker_processes_share_one_message_limit(tmp_path: Path) -> None:
    """The nodes were started at 8 MiB whatever the limit: a 10 MiB message under a 12 MiB
    limit was taken by the ingress and refused by NATS. The limit in the spec wins over one
    in the children's environment, so the two cannot disagree."""
    spec = TopologySpec(
        data_dir=tmp_path,
        max_message_bytes=12 * MIB,
        projection_workers=1,
        routers=1,
        env={"BROKER_MAX_MESSAGE_BYTES": str(MIB)},
    )
    topology = Topology(spec)
    assert [node.spec.max_payload for node in topology.cluster.nodes] == [
        12 * MIB + HEADER_ROOM
    ] * 3
    topology._make_children()
    for child in topology.children:
        assert child.env["BROKER_MAX_MESSAGE_BYTES"] == str(12 * MIB), child.name


def test_nodes_keep_the_nats_default_under_the_default_limit(tmp_path: Path) -> None:
    topology = Topology(TopologySpec(data_dir=tmp_path))
    assert {node.spec.max_payload for node in topology.cluster.nodes} == {DEFAULT_MAX_PAYLOAD}


def test_a_limit_nats_cannot_carry_is_refused(tmp_path: Path) -> None:
    too_large = LARGEST_MAX_PAYLOAD - HEADER_ROOM + 1
    with pytest.raises(ValueError, match="over the 67108864 bytes NATS takes as max_payload"):
        Topology(TopologySpec(data_dir=tmp_path, max_message_bytes=too_large))
    Topology(TopologySpec(data_dir=tmp_path, max_message_bytes=too_large - 1))
