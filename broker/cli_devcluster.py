"""``broker dev-cluster``: the clustered topology on this machine, in the foreground.

A 3-node NATS JetStream cluster on loopback (``sync_interval: always``, streams with 3
replicas), the HTTP/2 ingress, projection workers and routers, each a real process
(:mod:`broker.devcluster`). A process or node that exits is started again, after a delay
that grows while it keeps exiting (:class:`broker.devcluster.RestartBackoff`); Ctrl-C or
SIGTERM stops everything, in order. One dev cluster holds a data dir at a time
(``<data-dir>/broker.lock``).
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from broker.devcluster import Topology

DEV_CLUSTER_EPILOG = (
    "Examples:\n\n"
    "  broker dev-cluster                      # ./.broker/dev-cluster, port 8080\n\n"
    "  broker dev-cluster --port 9000 --projection-workers 2 --routers 0\n\n"
    "  broker dev-cluster --nats-base-port 4222   # nodes on 4222-4224\n\n"
    "  broker dev-cluster --sync-interval 2m   # NATS's lazy default fsync\n\n"
    "  kill -9 $(cat .broker/dev-cluster/nats/n1/nats-server.pid)   # crash a node"
)

#: The dev cluster's folder under the broker's data dir (``./.broker``) by default, where the
#: commands run beside it look for its ``nats.url`` (``broker.cli_projections``).
DATA_DIR_NAME = "dev-cluster"
_SYNC_INTERVAL = re.compile(r"^(always|\d+(ms|s|m|h))$")
#: Seconds between checks for exited processes (they are started again once their
#: :class:`~broker.devcluster.RestartBackoff` delay, from 0.5 s, has passed).
_SUPERVISE_EVERY = 0.5


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM behaves as Ctrl-C: the foreground loop (or a start in progress) unwinds and
    the topology is stopped in order."""
    raise KeyboardInterrupt


def dev_cluster(
    data_dir: Annotated[
        Path, typer.Option(help="Where the nodes' stores, the SQLite replica and the logs live.")
    ] = Path(".broker") / DATA_DIR_NAME,
    host: Annotated[
        str, typer.Option(help="IP address the HTTP/2 ingress binds (0.0.0.0: all); not a name.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Ingress port; 0 picks a free one.")
    ] = 8080,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Granian worker processes of the ingress.")
    ] = 1,
    projection_workers: Annotated[
        int, typer.Option(min=0, max=64, help="`broker worker` processes (SQL replica).")
    ] = 1,
    routers: Annotated[int, typer.Option(min=0, max=64, help="`broker router` processes.")] = 1,
    nodes: Annotated[int, typer.Option(min=3, max=5, help="NATS nodes in the cluster.")] = 3,
    replicas: Annotated[
        int, typer.Option(min=1, max=5, help="Replicas of every stream (at most --nodes).")
    ] = 3,
    nats_base_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=60000,
            help="Node i listens on BASE+i, routes on BASE+2000+i, monitoring on "
            "BASE+4000+i; 0 picks free ports.",
        ),
    ] = 0,
    sync_interval: Annotated[
        str,
        typer.Option(
            help="JetStream fsync: `always` (before every ack, as deploy/nats) or an "
            "interval such as `2m`.",
        ),
    ] = "always",
    replica_url: Annotated[
        str | None,
        typer.Option(
            envvar="BROKER_REPLICA_URL",
            help="SQL replica: sqlite:///PATH or postgresql://… (default: SQLite in --data-dir).",
        ),
    ] = None,
) -> None:
    """Run a 3-node NATS JetStream cluster with the broker in front of it, on this machine.

    Starts the nodes on loopback, the HTTP/2 ingress (`broker serve --replicas 3` against
    them), the projection workers and the routers as separate processes, prints the URLs
    and an example curl, and runs until Ctrl-C or SIGTERM, which stop everything. Kill a
    node, the ingress or a worker to see the broker ride it out: whatever exits is
    started again (after a delay from 0.5 s doubling to 30 s while it keeps exiting). One
    dev cluster runs on a --data-dir at a time; a second one exits with code 4. The nodes'
    max_payload follows BROKER_MAX_MESSAGE_BYTES as `broker serve`'s embedded server does.
    """
    from broker.cli import EXIT_STARTUP
    from broker.devcluster import RestartBackoff, Topology, TopologySpec
    from broker.embedded import cluster_ports
    from broker.errors import EmbeddedServerError
    from broker.logs import configure_logging
    from broker.server import announce_nats_url
    from broker.settings import get_settings

    configure_logging()
    if replicas > nodes:
        raise typer.BadParameter(f"{replicas} replicas need at least as many --nodes ({nodes})")
    if not _SYNC_INTERVAL.fullmatch(sync_interval):
        raise typer.BadParameter(
            f"{sync_interval!r}: use `always` or a duration such as 500ms, 1s, 2m",
            param_hint="--sync-interval",
        )
    if nats_base_port and port in cluster_ports(nats_base_port, nodes):
        raise typer.BadParameter(
            f"--port {port} is a port of the NATS nodes (--nats-base-port {nats_base_port}: "
            f"clients on {nats_base_port}+i, routes on +2000+i, monitoring on +4000+i)",
            param_hint="--port",
        )
    max_message_bytes = get_settings().max_message_bytes
    _claim(data_dir, host, port, replica_url if projection_workers else None, max_message_bytes)
    spec = TopologySpec(
        data_dir=data_dir,
        host=host,
        port=port,
        ingress_workers=workers,
        projection_workers=projection_workers,
        routers=routers,
        nodes=nodes,
        replicas=replicas,
        nats_base_port=nats_base_port,
        sync_interval=sync_interval,
        replica_url=replica_url,
        max_message_bytes=max_message_bytes,
    )
    topology = Topology(spec)
    backoff = RestartBackoff()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        topology.start()
        # For the commands run beside it (`broker dlq`, `routes`, …: running_nats_url).
        announce_nats_url(topology.data_dir, topology.nats_url)
        typer.echo(_banner(topology))
        while True:
            time.sleep(_SUPERVISE_EVERY)
            for name in topology.revive(backoff):
                typer.echo(f"{name} exited; started again", err=True)
    except KeyboardInterrupt:
        pass
    except EmbeddedServerError as e:
        typer.echo(f"dev-cluster failed to start: {e.message}", err=True)
        code = EXIT_STARTUP
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the orderly stop short
            signal.signal(sig, signal.SIG_IGN)
        typer.echo("stopping the dev cluster…", err=True)
        announce_nats_url(topology.data_dir, None)
        topology.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo("dev cluster stopped", err=True)
    raise typer.Exit(code)


def _claim(
    data_dir: Path, host: str, port: int, replica_url: str | None, max_message_bytes: int
) -> None:
    """Check what would fail only later (the ingress's address and port, the replica URL of
    the workers, a message limit the nodes cannot carry) and take the data dir's lock, held
    until this process exits, however it exits; exit code 4 with the reason when one of
    them is wrong."""
    from broker.cli import EXIT_STARTUP
    from broker.embedded import max_payload_problem
    from broker.server import host_problem, lock_data_dir, port_problem, replica_problem

    def refuse(problem: str) -> NoReturn:
        typer.echo(problem, err=True)
        raise typer.Exit(EXIT_STARTUP)

    if problem := (
        host_problem(host) or replica_problem(replica_url) or max_payload_problem(max_message_bytes)
    ):
        refuse(problem)
    # A second dev cluster on one data dir used to stop the first one's nodes (their pid
    # files say they are stale) and start its own on their stores. The lock is taken before
    # the port check when the data dir exists, so that a second `broker dev-cluster` hears
    # which one runs there, not only that the port is taken; a new data dir is created only
    # once the port is known to be free.
    lock = lock_data_dir(data_dir) if data_dir.is_dir() else None
    if isinstance(lock, str):
        refuse(lock)
    if port and (problem := port_problem(host, port)):
        refuse(problem)
    if lock is None and isinstance(lock := lock_data_dir(data_dir), str):
        refuse(lock)


def _banner(topology: Topology) -> str:
    from broker.server import banner
    from broker.settings import Settings

    spec = topology.spec
    settings = Settings(
        host=spec.host,
        port=topology.port,
        nats_url=topology.nats_url,
        stream_replicas=spec.replicas,
        routers=spec.routers,
        projection_workers=spec.projection_workers,
        replica_url=topology.replica_url,
    )
    nodes = "\n".join(
        f"  {node.spec.server_name}  {node.url}  monitor {node.monitor_url}/jsz  "
        f"store {node.spec.store_dir}"
        for node in topology.cluster.nodes
    )
    return (
        f"{banner(settings)}"
        f"NATS cluster, JetStream streams with {spec.replicas} replicas, "
        f"sync_interval {spec.sync_interval}:\n{nodes}\n"
        f"NATS URL: {topology.nats_url}\n"
        f"logs: {topology.data_dir / 'logs'}\n"
        "Ctrl-C stops everything."
    )
