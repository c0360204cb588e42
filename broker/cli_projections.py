"""``broker worker``, ``broker projections`` and ``broker dlq``: run and operate projections.

These talk to NATS and the replica database directly (not the HTTP API): a worker is a
peer of the ingress, not a client of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

    from nats.aio.client import Client as NatsClient

    from broker.natsconn import ConnectOptions
    from projections.runtime import Progress


def _fail(message: str, code: int) -> NoReturn:
    """``error: <message>`` on stderr, one line, and exit ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _nats_url(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    """``--nats-url``: URLs that name no server to connect to (``bogus://x``, a port that
    is not a number) are a usage error, one ``error: …`` line and exit 2, before anything
    is connected to, instead of exit 3 "cannot reach NATS". Given neither as an option nor
    as ``BROKER_NATS_URL``: the NATS of the ``broker serve`` running on the data dir
    (``BROKER_DATA_DIR``, ``./.broker``) when there is one, else that of a ``broker
    dev-cluster`` running on ``<data dir>/dev-cluster`` (its default ``--data-dir`` when the
    data dir is ``./.broker``), else the default."""
    from broker.natsconn import nats_url_problem

    source = ctx.get_parameter_source(param.name) if param.name else None
    if source is not None and source.name == "DEFAULT":
        from broker.cli_devcluster import DATA_DIR_NAME
        from broker.server import running_nats_url
        from broker.settings import get_settings

        with contextlib.suppress(Exception):  # settings that do not parse: reported later
            data_dir = get_settings().data_dir
            value = (
                running_nats_url(data_dir) or running_nats_url(data_dir / DATA_DIR_NAME) or value
            )
    if problem := nats_url_problem(value):
        _fail(problem, 2)
    return value


NATS_URL = Annotated[
    str,
    typer.Option(
        envvar="BROKER_NATS_URL",
        help="NATS URL(s), comma-separated. Default: the NATS of the `broker serve` running "
        "on the data dir (BROKER_DATA_DIR, ./.broker) or of a `broker dev-cluster` on its "
        "dev-cluster/ folder, else nats://127.0.0.1:4222.",
        callback=_nats_url,
    ),
]
REPLICA_URL = Annotated[
    str | None,
    typer.Option(
        "--replica-url",
        envvar="BROKER_REPLICA_URL",
        help="Replica database: sqlite:///PATH or postgresql://… (default: SQLite under "
        "--data-dir).",
    ),
]
DATA_DIR = Annotated[
    Path, typer.Option(envvar="BROKER_DATA_DIR", help="Where the default SQLite replica lives.")
]


def _output(value: str) -> str:
    """``--output``: ``table`` or ``json``, anything else a usage error before any work."""
    if value not in {"table", "json"}:
        raise typer.BadParameter("table or json")
    return value


OUTPUT = Annotated[str, typer.Option("--output", "-o", help="table or json.", callback=_output)]
DEFAULT_NATS = "nats://127.0.0.1:4222"
METRICS_PORT = Annotated[
    int,
    typer.Option(
        envvar="BROKER_METRICS_PORT",
        min=0,
        max=65535,
        help="Serve this process's Prometheus /metrics on this port (0: off; under "
        "`broker serve` the ingress's /metrics already includes it).",
    ),
]
METRICS_HOST = Annotated[
    str, typer.Option(envvar="BROKER_METRICS_HOST", help="Address --metrics-port binds.")
]


def start_metrics(host: str, port: int) -> ThreadingHTTPServer | None:
    """Serve /metrics when asked to (the server; ``None`` for port 0); a port that cannot be
    bound is a usage error."""
    if not port:
        return None
    from broker.settings import get_settings
    from broker.telemetry.endpoint import serve_metrics
    from broker.telemetry.tls_expiry import NatsTlsExpiry

    settings = get_settings()
    secret = settings.metrics_token
    try:
        token = secret.get_secret_value() if secret else None
        return serve_metrics(host, port, token, nats_tls=NatsTlsExpiry(settings))
    except OSError as e:
        raise typer.BadParameter(
            f"cannot listen on {host}:{port} ({e.strerror})", param_hint="--metrics-port"
        ) from None


projections_app = typer.Typer(
    name="projections", help="Projection state: list, status (lag), reset.", no_args_is_help=True
)
dlq_app = typer.Typer(name="dlq", help="Dead-lettered events: list, replay.", no_args_is_help=True)

WORKER_EPILOG = (
    "Examples:\n\n"
    "  broker worker --nats-url nats://127.0.0.1:4222          # every replica projection\n\n"
    "  broker worker --replica-url postgresql://postgres@db/replica --changes\n\n"
    "  broker worker --projection replica_messages --worker-id w2   # on another machine\n\n"
    "  broker worker --metrics-port 9101    # its own /metrics when not under broker serve"
)


def _nats_options(nats_url: str, name: str = "broker-cli") -> ConnectOptions:
    """``--nats-url`` plus TLS and credentials from ``BROKER_NATS_*``; settings that cannot
    be used (a file that cannot be read, two kinds of credentials) are a usage error, as for
    ``broker router``."""
    from broker.natsconn import InvalidNatsSettings, connect_options
    from broker.settings import get_settings

    try:
        return connect_options(get_settings(), servers=nats_url, name=name)
    except InvalidNatsSettings as e:
        _fail(e.message, 2)


async def open_nats(nats_url: str, name: str = "broker-cli") -> NatsClient:
    """A one-shot command's connection: a few quick attempts (:data:`~broker.natsconn.ONE_SHOT`)
    without a traceback per attempt; when none succeeds, ``error: cannot reach NATS at …``
    and exit 3, instead of two minutes of retries and a ``NoServersError`` traceback."""
    from broker.cli import EXIT_UNAVAILABLE
    from broker.natsconn import ONE_SHOT, NatsConnectFailed, connect, redact_servers

    async def attempt_failed(error: Exception) -> None:
        """Nothing per attempt: the last one's error is in the message below (and these
        commands leave structlog unconfigured, whose default prints to stdout)."""

    options = _nats_options(nats_url, name)
    try:
        return await connect(options, **ONE_SHOT, error_cb=attempt_failed)
    except NatsConnectFailed as e:
        servers = redact_servers(options["servers"])
        # The plain "NATS at X: <error>" reads as the CLI's other connection errors do;
        # explain_connect_error's own sentences (TLS, credentials, timeout) stay as they are.
        plain = f"NATS at {servers}: "
        if e.message.startswith(plain):
            reason = f"cannot reach NATS at {servers}: {e.message.removeprefix(plain)}"
        else:
            reason = e.message
        typer.echo(f"error: {reason}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None


async def require_streams(nc: NatsClient, nats_url: str, *streams: str) -> None:
    """Each of ``streams`` exists on ``nc``'s NATS (``nats_url``), or ``error: NATS at …
    has no stream …`` and exit 1: a NATS without the broker's streams (not provisioned yet,
    or another NATS than meant), said before anything is read or changed."""
    from broker.cli import EXIT_REFUSED
    from broker.natsconn import redact_servers
    from broker.streams import missing_streams

    if missing := await missing_streams(nc.jetstream(), streams):
        at = redact_servers(nats_url)
        typer.echo(
            f"error: NATS at {at} has no stream {', '.join(missing)} (`broker serve` creates "
            "the broker's streams; is --nats-url the broker's NATS?)",
            err=True,
        )
        raise typer.Exit(EXIT_REFUSED)


def replica_url(url: str | None, data_dir: Path) -> str:
    """``url``, or the default SQLite replica's under ``data_dir`` (made when missing; one
    that cannot be made is a usage error, exit 2)."""
    if url:
        return url
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"--data-dir {data_dir} cannot hold the replica ({e.strerror or e})", 2)
    return f"sqlite:///{(data_dir / 'replica.db').resolve()}"


def _usable_replica(url: str | None, data_dir: Path) -> str:
    """The replica URL of ``broker worker``, ``projections status`` and ``reset``, checked
    before NATS or the database is connected to: one :func:`~broker.server.replica_problem`
    refuses (it does not parse, names no installed driver, or names an in-memory SQLite
    database, which holds no replica) is ``error: …`` and exit 2."""
    from broker.server import replica_problem

    if problem := replica_problem(url):
        _fail(problem, 2)
    return replica_url(url, data_dir)


#: The most characters of a database's error that are shown.
_MAX_REASON = 400


@contextlib.contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """The replica database's errors as one line, ``error: replica database URL: …`` (the
    URL's and the message's password hidden): exit 3 when it cannot be reached or opened (an
    ``OperationalError``: refused, unknown host or database, authentication, a file that
    cannot be opened), exit 1 when it refuses a statement (permissions, say)."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE
    from broker.natsconn import redact_url

    try:
        yield
    except sqlalchemy.exc.DBAPIError as e:
        # The driver's own message: SQLAlchemy's adds the statement and a link. libpq's is
        # several lines (a hint, or one per address of the host).
        reason = " ".join(line.strip() for line in str(e.orig).splitlines() if line.strip())
        if password := make_url(url).password:
            reason = reason.replace(str(password), "***")
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 1] + "…"
        unavailable = isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
        _fail(
            f"replica database {redact_url(url)}: {reason or type(e.orig).__name__}",
            EXIT_UNAVAILABLE if unavailable else EXIT_REFUSED,
        )


def _worker_id(value: str | None) -> str | None:
    from projections.worker import valid_worker_id

    try:
        return None if value is None else valid_worker_id(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _selected(names: list[str] | None, changes: bool) -> list[Any]:
    from projections.replica import replica_projections

    available = replica_projections(changes=changes)
    if not names:
        return available
    by_name = {p.name: p for p in available}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise typer.BadParameter(f"unknown projection(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in names]


def worker(
    nats_url: NATS_URL = DEFAULT_NATS,
    replica: REPLICA_URL = None,
    data_dir: DATA_DIR = Path(".broker"),
    projection: Annotated[
        list[str] | None, typer.Option(help="Run only this projection (repeatable).")
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(
            help="Stable worker name, 1-64 of A-Z a-z 0-9 _ - (default: host-pid), unique "
            "among the workers: it names the worker's leases and, as is, its consumers "
            "(`proj_<projection>_<id>`; w-1 and w_1 are two workers). `reset` is taken by "
            "`broker projections reset`.",
            callback=_worker_id,
        ),
    ] = None,
    changes: Annotated[
        bool, typer.Option(help="Publish every replica change to the CHANGES stream (CDC).")
    ] = False,
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Events per fetch.")] = 1024,
    metrics_port: METRICS_PORT = 0,
    metrics_host: METRICS_HOST = "127.0.0.1",
) -> None:
    """Run projections (SQL replicas) in this process until Ctrl-C / SIGTERM.

    Start more workers with the same NATS and replica URL, here or on other machines: they
    split the partitions between them and take over a stopped or killed one within seconds.
    """
    from broker._process import tune_gc
    from broker.logs import configure_logging
    from broker.settings import get_settings
    from projections.worker import WorkerOptions, default_worker_id, run_worker

    url = _usable_replica(replica, data_dir)  # a usage error, not a traceback at each start
    connect = _nats_options(nats_url, "broker-worker")
    configure_logging()
    start_metrics(metrics_host, metrics_port)
    options = WorkerOptions(
        nats_urls=connect["servers"],
        connect_options=connect,
        replica_url=url,
        projections=_selected(projection, changes),
        worker_id=worker_id or default_worker_id(),
        batch=batch,
        changes=changes,
        stop_deadline=get_settings().stop_deadline_seconds,
    )
    tune_gc()  # a long-running process: see broker._process.tune_gc
    asyncio.run(run_worker(options))


#: A checkpoint past the stream's end: the stream was deleted and made again (or this is
#: another NATS); workers hold the projection until it is reset.
_AHEAD = "checkpoint ahead of stream (recreated?): broker projections reset {name}"
#: Checkpoints recorded in an earlier stream of the same name (a creation time other than
#: the one recorded with them): held as well, also once the new stream is longer.
_REPLACED = "stream made again since its checkpoints: broker projections reset {name}"


async def _status(nats_url: str, url: str) -> list[dict[str, Any]]:
    from projections.checkpoints import SqlCheckpointReader, create_sql_engine
    from projections.runtime import progress

    # Reads only: no DDL, no write lock, so a read-only role (or file) is enough.
    store = SqlCheckpointReader(create_sql_engine(url, read_only=True))
    nc = await open_nats(nats_url)
    try:
        js = nc.jetstream()
        selected = _selected(None, False)
        await require_streams(nc, nats_url, *dict.fromkeys(p.stream for p in selected))
        rows = []
        for p in selected:
            done = await progress(js, p, store)
            rows.append(
                {
                    "projection": p.name,
                    "stream": p.stream,
                    "partitions": p.partitions,
                    "applied_seq": done.applied_seq,
                    "lag": done.lag,
                    "problem": _problem(done).format(name=p.name),
                }
            )
        return rows
    finally:
        await nc.close()
        await store.close()


def _problem(done: Progress) -> str:
    """The ``problem`` column of a projection's :class:`~projections.runtime.Progress`."""
    if done.stream_replaced:
        return _REPLACED
    return _AHEAD if done.ahead_of_stream else ""


@projections_app.command(
    "status",
    epilog=(
        "Examples:\n\n"
        "  broker projections status\n\n"
        "  broker projections status --replica-url postgresql://postgres@db/replica -o json"
    ),
)
def status(
    nats_url: NATS_URL = DEFAULT_NATS,
    replica: REPLICA_URL = None,
    data_dir: DATA_DIR = Path(".broker"),
    output: OUTPUT = "table",
) -> None:
    """Each projection's applied sequence and lag (stream last seq minus applied).

    A negative lag, with a `problem`, means the checkpoints belong to an earlier stream of
    that name (it was deleted and made again: a checkpoint is past its last sequence, or
    its creation time is not the one recorded with them): reset that projection. Reads
    only: a read-only database role is enough.
    """
    url = _usable_replica(replica, data_dir)
    with _database_errors(url):
        rows = asyncio.run(_status(nats_url, url))
    _print(rows, output)


@projections_app.command(
    "list",
    epilog="Examples:\n\n  broker projections list -o json",
)
def list_projections(output: OUTPUT = "table") -> None:
    """The projections a worker can run."""
    rows = [
        {"projection": p.name, "stream": p.stream, "partitions": p.partitions}
        for p in _selected(None, False)
    ]
    _print(rows, output)


async def _rebuilt(js: Any, runner: Any, total: int) -> bool:
    """Whether the rebuild has applied the stream up to ``total``, or its consumer has
    nothing left (the last messages aged out, or are not the projection's)."""
    import nats.js.errors

    if runner.stats.last_seq >= total:
        return True
    try:
        info = await js.consumer_info(runner.projection.stream, runner.consumer_name)
    except nats.js.errors.NotFoundError:  # not made yet, or being made again
        return False
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


@dataclass(frozen=True)
class _Rebuild:
    """How a reset ended: the events applied, and, when it was interrupted, how far."""

    applied: int
    interrupted: bool = False
    last_seq: int = 0
    total: int = 0


async def _reset(nats_url: str, url: str, name: str) -> _Rebuild:
    """Drop a projection's state and checkpoints, then replay it from the start with a bar.

    Interrupted (Ctrl-C) while it replays, it stops the replay at a batch boundary, removes
    its consumer and says how far it got: the checkpoints moved with every batch, so the
    projection's workers go on from there, or another reset starts over."""
    import nats.js.errors
    from rich.markup import escape
    from rich.progress import Progress

    from projections.checkpoints import SqlCheckpointStore, create_sql_engine
    from projections.runtime import RESET_WORKER, ProjectionRunner

    (projection,) = _selected([name], False)
    nc = await open_nats(nats_url)
    store: SqlCheckpointStore | None = None
    try:
        # First: a wrong --nats-url must not wipe a replica it cannot rebuild.
        await require_streams(nc, nats_url, projection.stream)
        engine = create_sql_engine(url)
        store = SqlCheckpointStore(engine)
        js = nc.jetstream()
        await store.reset(projection.name, projection.reset)
        await asyncio.to_thread(_setup, engine, projection)
        total = (await js.stream_info(projection.stream)).state.last_seq
        runner = ProjectionRunner(js, projection, store, worker=RESET_WORKER, batch=1024)
        with contextlib.suppress(nats.js.errors.NotFoundError):  # an earlier reset's, caught up
            await js.delete_consumer(projection.stream, runner.consumer_name)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        interrupted = False
        with Progress(transient=False) as progress:
            bar = progress.add_task(f"rebuilding {escape(projection.name)}", total=total or 1)
            try:
                while not task.done() and not await _rebuilt(js, runner, total):
                    progress.update(bar, completed=runner.stats.last_seq)
                    await asyncio.sleep(0.1)
                progress.update(bar, completed=total or 1)
            except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task
                if (current := asyncio.current_task()) is not None:
                    current.uncancel()  # handled here: asyncio.run then returns
                interrupted = True
        stop.set()
        await task  # the batch in hand is committed (or not) whole, with its checkpoint
        # None when the stream was empty: the rebuild was done before the runner made one.
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(projection.stream, runner.consumer_name)
        return _Rebuild(runner.stats.applied, interrupted, runner.stats.last_seq, total)
    finally:
        await nc.close()
        if store is not None:
            await store.close()


def _setup(engine: Any, projection: Any) -> None:
    with engine.begin() as tx:
        projection.setup(tx)


@projections_app.command(
    "reset",
    epilog=(
        "Examples:\n\n  broker projections reset replica_messages --yes   # rebuild from the stream"
    ),
)
def reset(
    name: Annotated[str, typer.Argument(help="Projection name (see `broker projections list`).")],
    nats_url: NATS_URL = DEFAULT_NATS,
    replica: REPLICA_URL = None,
    data_dir: DATA_DIR = Path(".broker"),
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Drop a projection's tables and checkpoint and rebuild it from its stream's start.

    Stop the workers that run it first, or they will race the rebuild: a commit they have
    in flight as the reset begins is waited for and dropped with the rest, and later ones
    fail their checkpoint checks and re-read from the new position. Ctrl-C stops the
    rebuild after the batch in hand and says how far it got (exit code 130): the workers go
    on from there, or another reset starts over. A NATS without the projection's stream is
    an error (exit 1) before anything is dropped.

    A reset publishes no change events (CDC, `broker worker --changes`): none for the rows
    it drops, none for the rows it rebuilds. Consumers of CHANGES read the rebuilt tables
    again from the replica.
    """
    _selected([name], False)  # an unknown name is a usage error before the question
    url = _usable_replica(replica, data_dir)
    if not yes:
        typer.confirm(f"Drop and rebuild {name}?", abort=True)
    with _database_errors(url):
        done = asyncio.run(_reset(nats_url, url, name))
    if done.interrupted:
        typer.echo(
            f"{name}: interrupted after {done.applied} events, at seq {done.last_seq} of"
            f" {done.total}. What it holds is consistent: its workers go on from there when"
            " started, or `broker projections reset` starts over.",
            err=True,
        )
        raise typer.Exit(130)
    typer.echo(f"{name}: rebuilt from {done.applied} events")


#: The header that makes a DLQ entry a projection's (``projections.runtime``'s dead letter).
H_DLQ_PROJECTION = "Broker-Dlq-Projection"


async def _dlq(nats_url: str, limit: int) -> list[dict[str, Any]]:
    from broker.reader import read_messages
    from broker.streams import Stream

    nc = await open_nats(nats_url)
    try:
        await require_streams(nc, nats_url, Stream.DLQ)
        rows = []
        async for m in read_messages(nc.jetstream(), Stream.DLQ):
            h = m.headers or {}
            row = {
                "dlq_seq": m.metadata.sequence.stream,
                "projection": h.get(H_DLQ_PROJECTION),
                "stream": h.get("Broker-Dlq-Stream"),
                "seq": _seq(h.get("Broker-Dlq-Seq")),
                "error": h.get("Broker-Dlq-Error"),
            }
            # The router's (a message no agent qualified for, or every agent tried failed):
            # its decision, no projection. A dead letter of a projection of ROUTES carries
            # the route event's Broker-Route too: it is the projection's.
            if H_DLQ_PROJECTION not in h and "Broker-Route" in h:
                route = _decision(h["Broker-Route"])
                row.update(
                    projection="router",
                    stream=Stream.MESSAGES,
                    seq=_seq(route.get("message_seq")),
                    error=(
                        f"{route.get('reason')}: {route.get('detail', '')}"
                        if route
                        else "unreadable decision (Broker-Route)"
                    ),
                )
            rows.append(row)
            if len(rows) >= limit:
                break
        return rows
    finally:
        await nc.close()


def _seq(value: object) -> int:
    """A sequence of a DLQ entry's headers or decision; 0 when there is none, or none that
    reads as one (a dead letter's headers may be anyone's: one must not hide the others)."""
    from broker.envelope import read_number

    return read_number(value) or 0


def _decision(header: str) -> dict[str, Any]:
    """A routing dead letter's decision (``Broker-Route``); empty when it is not a JSON
    object."""
    try:
        decision = json.loads(header)
    except ValueError:
        return {}
    return decision if isinstance(decision, dict) else {}


@dlq_app.command(
    "list",
    epilog=("Examples:\n\n  broker dlq list --limit 20\n\n  broker dlq list -o json"),
)
def dlq_list(
    nats_url: NATS_URL = DEFAULT_NATS,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    output: OUTPUT = "table",
) -> None:
    """Dead-lettered events, oldest first: projection, source stream/seq, error."""
    _print(asyncio.run(_dlq(nats_url, limit)), output)


async def _dlq_replay(nats_url: str, dlq_seq: int) -> tuple[int, bool]:
    """Publish a dead-lettered event again as a new message: a projection's of ``MESSAGES``
    back to its source subject, a routed message's back to ``MESSAGES`` for a router to
    decide again. A projection's of another stream is refused (a usage error saying to
    rebuild the projection instead).

    The sequence it is stored at, and whether JetStream took it for a duplicate of an
    earlier replay of the same entry (``Nats-Msg-Id: dlq-replay:<dlq seq>``, inside the
    stream's duplicate window): then that earlier message is the one it names."""
    import nats.js.errors

    from broker.envelope import NATS_MSG_ID
    from broker.natsconn import get_stored
    from broker.routing.events import H_ROUTE
    from broker.streams import Stream

    nc = await open_nats(nats_url)
    try:
        js = nc.jetstream()
        await require_streams(nc, nats_url, Stream.DLQ)
        try:
            raw = await get_stored(js, Stream.DLQ, dlq_seq)
        except nats.js.errors.NotFoundError:
            raise typer.BadParameter(f"no DLQ message {dlq_seq}") from None
        except nats.js.errors.BadRequestError as e:
            raise typer.BadParameter(
                f"cannot read DLQ message {dlq_seq}: {e.description}"
            ) from None
        headers = dict(raw.headers or {})
        # The router's: nobody qualified, or every agent tried failed. A projection's dead
        # letter of a route event carries its Broker-Route too, and goes back where it was.
        if H_DLQ_PROJECTION not in headers and H_ROUTE in headers:
            subject, keep = _routed_again(dlq_seq, headers)
        else:
            subject = headers.get("Broker-Dlq-Subject", "")
            source = headers.get("Broker-Dlq-Stream", "")
            if source != Stream.MESSAGES:
                # Appended again, a route event is a decision its agent runs a second time,
                # and a registry event the agent's latest state: only the projection needs
                # it again, and a rebuild gives it that.
                projection = headers.get(H_DLQ_PROJECTION, "?")
                raise typer.BadParameter(
                    f"DLQ message {dlq_seq} is a dead letter of projection {projection}, of "
                    f"{source} seq {headers.get('Broker-Dlq-Seq')}: appended to {source} "
                    "again it would act again (an agent handed the message twice, a "
                    "registry change made anew). Fix the cause, then `broker projections "
                    f"reset {projection}`"
                )
            if "Broker-Dlq-Stub" in headers:  # the event could not be dead-lettered whole
                raise typer.BadParameter(
                    f"DLQ message {dlq_seq} holds no event ({headers['Broker-Dlq-Stub']}); "
                    f"it is {headers.get('Broker-Dlq-Stream')} seq {headers.get('Broker-Dlq-Seq')}"
                )
            if not subject:
                raise typer.BadParameter(f"DLQ message {dlq_seq} has no source subject")
            keep = {k: v for k, v in headers.items() if not k.startswith(("Broker-Dlq-", "Nats-"))}
        keep["Broker-Replayed-From-Dlq"] = str(dlq_seq)
        # The replay's own id (the event's Nats-* headers are not kept): a rerun, or a
        # second operator, stores nothing new while the stream's duplicate window lasts.
        keep[NATS_MSG_ID] = f"dlq-replay:{dlq_seq}"
        ack = await js.publish(subject, raw.data or b"", headers=keep)
        return ack.seq, bool(ack.duplicate)
    finally:
        await nc.close()


def _routed_again(dlq_seq: int, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Where and with which headers a router's dead letter goes back to ``MESSAGES``.

    The router's DLQ entry holds the routed message's payload and headers as stored, plus
    its decision (``Broker-Route``, which names the message's subject). The copy is a new
    message marked for routing again; nobody waits for its answer any more, so it carries
    neither the caller's reply address nor its deadline."""
    from broker.routing.events import (
        H_DEADLINE,
        H_REPLY_TO,
        H_ROUTE_MODE,
        ROUTE_MODE_AUTO,
        RouteDecided,
        RouteEventUnreadable,
        original_headers,
    )
    from broker.streams import SUBJECT_PREFIX, Stream

    try:
        route = RouteDecided.from_headers(headers)
    except RouteEventUnreadable as e:
        raise typer.BadParameter(f"DLQ message {dlq_seq}: {e.message}") from None
    subject = route.message_subject
    if not subject.startswith(f"{SUBJECT_PREFIX[Stream.MESSAGES]}."):
        raise typer.BadParameter(f"DLQ message {dlq_seq} names no message subject ({subject!r})")
    dropped = {H_REPLY_TO.lower(), H_DEADLINE.lower()}
    keep = {
        k: v
        for k, v in original_headers(headers).items()
        if k.lower() not in dropped and not k.startswith("Broker-Dlq-")
    }
    keep[H_ROUTE_MODE] = ROUTE_MODE_AUTO
    return subject, keep


@dlq_app.command(
    "replay",
    epilog=(
        "Examples:\n\n  broker dlq replay 17   # once the cause of event 17 is fixed\n\n"
        "  broker dlq replay 18   # a message no agent took: route it again"
    ),
)
def dlq_replay(
    dlq_seq: Annotated[
        int, typer.Argument(min=1, help="The DLQ sequence (see `broker dlq list`).")
    ],
    nats_url: NATS_URL = DEFAULT_NATS,
) -> None:
    """Append a dead-lettered event again once its cause is fixed: a projection's of
    MESSAGES to its source subject, a routed message's to MESSAGES, where a router decides
    it again. A projection's of another stream (a route or registry event, which would act
    again) is refused: rebuild that projection with `broker projections reset` instead.

    The copy is a new message: every consumer of that stream sees it (every projection
    reading it applies it again). It carries `Nats-Msg-Id: dlq-replay:DLQ_SEQ`, so running
    this again within the stream's duplicate window (BROKER_DUPLICATE_WINDOW_SECONDS, 120 s)
    stores nothing and prints `already replayed as seq N` (exit 0); after the window it
    cannot tell, and appends another copy.
    """
    seq, duplicate = asyncio.run(_dlq_replay(nats_url, dlq_seq))
    typer.echo(f"already replayed as seq {seq}" if duplicate else f"replayed as seq {seq}")


def _print(rows: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for column in rows[0] if rows else ["(none)"]:
        table.add_column(column)
    for row in rows:  # data, never markup: an error may quote a "text/x-[/x]"
        table.add_row(*(Text(str(v)) for v in row.values()))
    Console().print(table)
