"""A cluster on fixed ports (``broker dev-cluster --nats-base-port``) listens where it was
told, or says why it cannot."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

import pytest

from broker.devcluster import Topology, TopologySpec
from broker.embedded import EmbeddedServerError

pytestmark = pytest.mark.integration


def _free_base(nodes: int = 3) -> int:
    """A base port whose clients, routes and monitoring ports (+0, +2000, +4000) are free."""
    for _ in range(200):
        base = random.randrange(10_000, 20_000)
        ports = [base + offset + i for offset in (0, 2000, 4000) for i in range(nodes)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free base port")


def test_a_taken_fixed_route_port_is_an_error_not_routes_somewhere_else(tmp_path: Path) -> None:
    """Node n0's route port (base + 2000) is taken. The cluster used to be started again on
    route ports drawn at random, and ran on ports nobody asked for (the banner and the
    docs say 6222-6224 for --nats-base-port 4222); now it is an error that names the port,
    and no node keeps running."""
    base = _free_base()
    topology = Topology(TopologySpec(data_dir=tmp_path / "dev", port=0, nats_base_port=base))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 2000))
        squatter.listen()
        try:
            with pytest.raises(EmbeddedServerError, match="address already in use"):
                topology.cluster.start(ready_timeout=30)
        finally:
            topology.cluster.stop()
    assert [node.spec.cluster_port for node in topology.cluster.nodes] == [
        base + 2000 + i for i in range(3)
    ]
    assert not any(node.is_running() for node in topology.cluster.nodes)


def test_an_ingress_port_chosen_free_is_none_of_the_nodes_fixed_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--port 0``, the ingress's port was drawn avoiding only the route ports: a
    node's fixed client or monitoring port could be drawn, and the ingress then found it
    taken once the nodes ran."""
    base = _free_base()
    fixed = {base + offset + i for offset in (0, 2000, 4000) for i in range(3)}
    draws = iter([base, base + 4001, base + 2002, 45_678])

    def draw(host: str = "127.0.0.1", *, avoid: frozenset[int] = frozenset()) -> int:
        return next(port for port in draws if port not in avoid)

    monkeypatch.setattr("broker.devcluster.free_port", draw)
    topology = Topology(TopologySpec(data_dir=tmp_path / "dev", port=0, nats_base_port=base))
    assert topology.port == 45_678
    assert topology.port not in fixed


def test_something_else_answering_the_ingress_port_is_not_ready_not_a_crash(
    tmp_path: Path,
) -> None:
    """A NATS node answering on the ingress's port (its ``INFO`` line, not HTTP) raised
    ``BadStatusLine`` out of the readiness check: ``broker dev-cluster`` died with a
    traceback instead of reporting the ingress that could not start."""
    with socket.socket() as nats_like:
        nats_like.bind(("127.0.0.1", 0))
        nats_like.listen()
        port = nats_like.getsockname()[1]
        done = threading.Event()

        def answer() -> None:
            while not done.is_set():
                try:
                    conn, _ = nats_like.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b'INFO {"server_id":"x","port":4222}\r\n')

        threading.Thread(target=answer, daemon=True).start()
        topology = Topology(TopologySpec(data_dir=tmp_path / "dev", port=port))
        try:
            assert topology.ingress_ready() is False
        finally:
            done.set()
