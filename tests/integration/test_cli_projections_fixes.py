"""``broker dlq`` and ``broker projections`` against a real nats-server, as a user runs them:
a projection's dead letter of a route event is listed and replayed as the projection's,
not the router's; ``-o`` takes table or json only; a NATS without the broker's streams is a
clear error, and ``projections reset`` then leaves the replica as it was; an unusable NATS or
replica URL is one line on stderr, without the password, never a traceback; a NATS or
replica URL that names nothing usable is a usage error (exit 2) before anything is tried."""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from broker.cli import EXIT_UNAVAILABLE, app
from broker.embedded import NatsServer, ServerSpec, free_port
from broker.routing.events import RouteDecided
from broker.settings import Settings
from broker.streams import Stream, provision
from projections.checkpoints import SqlCheckpointStore, create_sql_engine
from projections.replica import MessagesReplica, RoutesReplica
from projections.runtime import ProjectionRunner
from tests._wait import await_until
from tests.integration.conftest import PG, ReplicaDb, replica_db
from tests.unit.test_routing_plumbing import _decision

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def broker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture
def pg() -> Iterator[ReplicaDb]:
    with replica_db("postgresql", "cliproj") as found:
        yield found


async def test_a_projection_dead_letter_of_a_route_event_is_the_projections(
    nats_url: str, pg: ReplicaDb
) -> None:
    """A route event PostgreSQL cannot index (an agent name too long for the btree index on
    replica_routes) is dead-lettered by replica_routes with the event's own Broker-Route
    header. It is listed as replica_routes' (ROUTES, its sequence), and its replay is
    refused: sent to MESSAGES it was routed again, and appended to ROUTES again its agent
    would run it a second time; rebuilding the projection is the way."""
    rnd = random.Random(7)
    agent = "".join(rnd.choices(string.ascii_letters + string.digits, k=3400))
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, Settings())
        message = await js.publish("msg.default.docs", b'{"doc": 1}')
        route = RouteDecided("default", message.seq, "msg.default.docs", _decision(agent=agent))
        headers = route.to_headers({"Content-Type": "application/json"})
        event = await js.publish(route.subject, b'{"doc": 1}', headers=headers)

        replica = RoutesReplica()
        with pg.engine.begin() as tx:
            replica.setup(tx)
        runner = ProjectionRunner(js, replica, SqlCheckpointStore(pg.engine), max_attempts=1)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))

        async def dead_lettered() -> bool:
            return runner.stats.dead_lettered == 1 and runner.stats.last_seq >= event.seq

        try:
            assert await await_until(dead_lettered, timeout=30)
        finally:
            stop.set()
            await task

        listed = await asyncio.to_thread(
            broker, "dlq", "list", "--nats-url", nats_url, "-o", "json"
        )
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert (row["projection"], row["stream"], row["seq"]) == (
            "replica_routes",
            "ROUTES",
            event.seq,
        )
        assert "index row size" in row["error"]

        replayed = await asyncio.to_thread(
            broker, "dlq", "replay", str(row["dlq_seq"]), "--nats-url", nats_url
        )
        assert replayed.returncode == 2, replayed.stdout
        assert "reset replica_routes" in replayed.stderr, replayed.stderr
        assert (await js.stream_info(Stream.MESSAGES)).state.messages == 1  # nothing routed
        assert (await js.stream_info(Stream.ROUTES)).state.last_seq == event.seq  # nor run
    finally:
        await nc.close()


@pytest.mark.parametrize(
    "command", [["projections", "list"], ["projections", "status"], ["dlq", "list"]]
)
def test_an_output_other_than_table_or_json_is_a_usage_error(command: list[str]) -> None:
    """``-o bogus`` is refused before anything is read, not answered with a table."""
    result = CliRunner().invoke(app, [*command, "-o", "bogus"])
    assert result.exit_code == 2, result.output
    assert "table or json" in result.output
    assert "┏" not in result.output  # no table


@pytest.mark.parametrize(
    ("command", "stream"),
    [
        (["projections", "status"], "MESSAGES"),
        (["dlq", "list"], "DLQ"),
        (["dlq", "replay", "5"], "DLQ"),
        (["projections", "reset", "replica_routes", "--yes"], "ROUTES"),
    ],
)
def test_a_nats_without_the_streams_is_a_clear_error(
    nats_url: str, tmp_path: Path, command: list[str], stream: str
) -> None:
    done = broker(*command, "--nats-url", nats_url, *_data_dir(command, tmp_path))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert f"has no stream {stream}" in done.stderr, done.stderr


def _data_dir(command: list[str], tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data")] if command[0] == "projections" else []


async def test_a_reset_against_a_nats_without_the_stream_leaves_the_replica(
    nats_url: str, tmp_path: Path
) -> None:
    """A wrong --nats-url (a NATS without MESSAGES) must not wipe a replica it then
    cannot rebuild: the rows and checkpoints stay."""
    url = f"sqlite:///{tmp_path / 'replica.db'}"
    engine = create_sql_engine(url)
    replica = MessagesReplica()
    with engine.begin() as tx:
        replica.setup(tx)
    store = SqlCheckpointStore(engine)

    def one_row(tx: sa.Connection) -> None:
        tx.execute(
            sa.text(
                "INSERT INTO replica_messages (seq, stream, tenant, subject, size) "
                "VALUES (1, 'MESSAGES', 'default', 'kept', 2)"
            )
        )

    await store.commit(replica.name, {0: (0, 1)}, one_row)
    await store.close()

    done = await asyncio.to_thread(
        broker, "projections", "reset", replica.name, "--yes", "--nats-url", nats_url,
        "--replica-url", url,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "has no stream MESSAGES" in done.stderr

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT subject FROM replica_messages")).scalars().all()
        checkpoints = conn.execute(sa.text("SELECT seq FROM broker_checkpoints")).scalars().all()
    engine.dispose()
    assert rows == ["kept"]
    assert checkpoints == [1]


#: A password in the URLs below: it must never be printed.
SECRET = "s3cr3t-pw"
#: Replica URLs no worker can use, each with what the error says about it.
UNUSABLE_REPLICAS = [
    (f"postgresql://u:{SECRET}@h:notaport/db", "its port is not a number"),
    ("bogus://x", "bogus"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
]
#: Each command as it runs against a replica: the reset asks nothing.
COMMANDS = {"status": ["projections", "status"], "reset": ["projections", "reset",
            "replica_messages", "--yes"]}  # fmt: skip


@pytest.fixture
def closed() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture(scope="module")
def streams_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server with the broker's streams: the replica is reached only past NATS."""
    server = NatsServer(ServerSpec(store_dir=tmp_path_factory.mktemp("nats"))).start()

    async def provisioned() -> None:
        nc = await nats.connect(server.url)
        try:
            await provision(nc.jetstream(), Settings())
        finally:
            await nc.close()

    asyncio.run(provisioned())
    yield server.url
    server.stop()


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command wrote to stderr (and that it wrote nothing else)."""
    assert "Traceback" not in done.stderr, done.stderr
    assert SECRET not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    assert done.stdout == "", done.stdout
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(("url", "said"), UNUSABLE_REPLICAS)
def test_a_replica_url_that_cannot_be_used_is_a_usage_error(
    streams_nats: str, command: str, url: str, said: str
) -> None:
    """A URL that does not parse or names no driver was a traceback (exit 1); an in-memory
    SQLite database, which holds no replica, showed a status of nothing applied."""
    done = broker(*COMMANDS[command], "--nats-url", streams_nats, "--replica-url", url)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done)
    assert "--replica-url" in line
    assert said in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("url", "said"),
    [
        (f"postgresql://postgres:{SECRET}@127.0.0.1:{{closed}}/test", "Connection refused"),
        (PG.replace("postgres@", f"postgres:{SECRET}@").replace("/test", "/no_such_db_x"),
         'database "no_such_db_x" does not exist'),
        ("sqlite:////no/such/directory/replica.db", "unable to open database file"),
    ],
)  # fmt: skip
def test_a_replica_database_that_cannot_be_reached_is_one_line_and_exit_3(
    streams_nats: str, closed: int, command: str, url: str, said: str
) -> None:
    """The database's error was a traceback of some 500 lines (exit 1)."""
    url = url.format(closed=closed)
    done = broker(*COMMANDS[command], "--nats-url", streams_nats, "--replica-url", url)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    line = one_error_line(done)
    assert line.startswith("error: replica database "), line
    assert said in line


@pytest.mark.parametrize(("url", "said"), UNUSABLE_REPLICAS)
def test_a_worker_with_an_unusable_replica_url_is_a_usage_error(
    url: str, said: str, tmp_path: Path
) -> None:
    """As for ``projections status``: one line and exit 2. A URL that does not parse was
    typer's boxed usage panel, and an in-memory SQLite database was taken, each worker
    then applying the streams to a database of its own that vanished when it stopped."""
    done = broker(
        *("worker", "--replica-url", url, "--nats-url", "nats://127.0.0.1:1"),
        *("--data-dir", str(tmp_path)),
        timeout=20,  # an in-memory replica was taken: the worker then ran until stopped
    )
    assert done.returncode == 2, done.stderr
    line = one_error_line(done)
    assert "--replica-url" in line
    assert said in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_data_dir_that_is_a_file_is_a_usage_error(
    streams_nats: str, command: str, tmp_path: Path
) -> None:
    """Making the default SQLite replica's directory raised FileExistsError (a traceback)."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    done = broker(*COMMANDS[command], "--nats-url", streams_nats, "--data-dir", str(taken))
    assert done.returncode == 2, done.stderr
    assert "--data-dir" in one_error_line(done)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "nats_url",
    [
        "nats://127.0.0.1:{closed}",
        f"nats://u:{SECRET}@127.0.0.1:{{closed}}",
        f" nats://u:{SECRET}@127.0.0.1:{{closed}}, 127.0.0.1:{{closed}},",  # a list, spaced
    ],
)
def test_a_nats_that_cannot_be_reached_is_one_line_and_exit_3(
    closed: int, command: str, nats_url: str, tmp_path: Path
) -> None:
    """URLs that read as servers, but none answers: exit 3, as unavailable."""
    nats_url = nats_url.format(closed=closed)
    done = broker(*COMMANDS[command], "--nats-url", nats_url, "--data-dir", str(tmp_path))
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert one_error_line(done).startswith("error: cannot reach NATS at ")


#: Every command given a ``--nats-url``; ``{tmp}`` is the test's directory.
NATS_COMMANDS = [
    ["projections", "status", "--data-dir", "{tmp}"],
    ["projections", "reset", "replica_messages", "--yes", "--data-dir", "{tmp}"],
    ["dlq", "list"],
    ["dlq", "replay", "1"],
    ["worker", "--data-dir", "{tmp}"],
    ["router"],
    ["routes", "simulate", "--policy", "{tmp}/policy.yaml"],
]


@pytest.mark.parametrize("command", NATS_COMMANDS, ids=lambda command: " ".join(command[:2]))
@pytest.mark.parametrize(
    ("nats_url", "said"),
    [
        ("nats://127.0.0.1:notaport", "its port is not a number"),
        (f"nats://u:{SECRET}@127.0.0.1:notaport", "its port is not a number"),
        ("bogus://127.0.0.1:1", "its scheme is not nats"),
        ("nats://", "it names no host"),
        ("nats://127.0.0.1 :1", "its host or port holds a space"),
        ("nats://127.0.0.1:1,nats://127.0.0.1:99999", "its port is not a number"),
    ],
)
def test_a_nats_url_that_names_no_server_is_a_usage_error(
    command: list[str], nats_url: str, said: str, tmp_path: Path
) -> None:
    """A URL nats-py cannot read, or reads as another host than meant (``bogus://x`` as the
    host ``bogus``), was "cannot reach NATS" and exit 3, as if the server were down; the
    worker and the router tried it again for ever. Now a usage error naming the option,
    before anything is connected to."""
    (tmp_path / "policy.yaml").write_text("version: bad-nats-url-1\n")
    args = [arg.format(tmp=tmp_path) for arg in command]
    done = broker(*args, "--nats-url", nats_url, timeout=20)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done)
    assert line.startswith("error: --nats-url"), line
    assert said in line


def test_a_replica_database_that_refuses_the_reset_is_one_line_and_exit_1(
    streams_nats: str,
) -> None:
    """A database that takes the connection but not the statements (here every transaction
    read-only; a role without the rights alike) refuses the reset: exit 1, as a refusal."""
    url = f"{PG}?options=-cdefault_transaction_read_only%3Don"
    done = broker(*COMMANDS["reset"], "--nats-url", streams_nats, "--replica-url", url)
    assert done.returncode == 1, done.stderr
    assert "in a read-only transaction" in one_error_line(done)


async def test_a_dlq_entry_with_unreadable_headers_is_listed_with_the_others(
    nats_url: str,
) -> None:
    """One entry whose sequence is not a number, or whose decision is not JSON, made
    ``broker dlq list`` a traceback, listing none of the entries."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, Settings())
        projection = {"Broker-Dlq-Projection": "replica_messages", "Broker-Dlq-Stream": "MESSAGES"}
        await js.publish("dlq.MESSAGES.x", b"", headers={**projection, "Broker-Dlq-Seq": "12abc"})
        await js.publish("dlq.default.route", b"", headers={"Broker-Route": "{not json"})
        await js.publish("dlq.default.route", b"", headers={"Broker-Route": '["a list"]'})
        await js.publish("dlq.MESSAGES.x", b"", headers={**projection, "Broker-Dlq-Seq": "7"})
    finally:
        await nc.close()

    listed = await asyncio.to_thread(broker, "dlq", "list", "--nats-url", nats_url, "-o", "json")

    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["projection"], r["seq"]) for r in rows] == [
        ("replica_messages", 0),
        ("router", 0),
        ("router", 0),
        ("replica_messages", 7),
    ]
    assert rows[1]["error"] == rows[2]["error"] == "unreadable decision (Broker-Route)"


@pytest.mark.parametrize(
    "command",
    [*COMMANDS.values(), ["dlq", "list"], ["dlq", "replay", "1"], ["worker"]],
    ids=" ".join,
)
def test_nats_settings_that_cannot_be_used_are_a_usage_error(
    command: list[str], tmp_path: Path
) -> None:
    """``BROKER_NATS_CREDS`` (or a TLS file) that cannot be read was a traceback (exit 1),
    where ``broker router`` says so in a line and exits 2."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", *command, "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "BROKER_NATS_CREDS": str(tmp_path / "missing.creds")},
    )
    assert done.returncode == 2, done.stderr
    assert "BROKER_NATS_CREDS" in one_error_line(done)
