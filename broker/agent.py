"""The Python agent SDK: consume your inbox, handle, reply, report your load.

::

    from broker.agent import Agent, Request

    agent = Agent(manifest, nats_url="nats://127.0.0.1:4222")

    @agent.handler
    async def handle(request: Request) -> dict[str, str]:
        return {"summary": summarise(request.text())}

    agent.run_forever()          # or: await agent.run(stop_event)

An :class:`Agent` instance reads ``route.<tenant>.<name>`` (its durable inbox in
``ROUTES``) through the shared durable consumer ``agent-<tenant>~<name>``, so the instances of
one agent split its work, and a message an instance took but did not finish (it crashed) is
delivered again after ``ack_wait`` (the consumer's: an existing one keeps its own, and a
long handler is kept alive on it); its ``max_deliveries``-th delivery is not run but fails
(``RouteFailed``), so a message that kills whatever runs it does not kill every instance for
ever. A process that dies takes every message it had fetched with it, each counted a
delivery; so a redelivered message runs alone (once the instance's other handlers have
finished, and with nothing fetched until it has), and while redeliveries may be on their way
the instance fetches one message at a time (see :meth:`Agent._consume`): the messages
fetched beside a poison message are not given up with it. At most ``concurrency`` handlers
run at once. A NATS outage is waited out however long it lasts, and an inbox consumer that
disappears is made again (after the last message it had delivered); a connection closed for
good, or a consumer that cannot be made again, makes :meth:`Agent.run` raise
:class:`~broker.errors.Unavailable` rather than return as if stopped.

For each message the handler gets a :class:`Request`; what it returns is the reply, sent
to the caller waiting in ``POST /v1/route?wait=true`` (bytes as they are, ``str`` as text,
anything else as JSON, or a :class:`Reply`), then sent to ``ROUTES`` ahead of the message's
ack, where a retry of that request finds it (:mod:`broker.routing.replies`; a reply that
cannot be stored is logged as ``agent_reply_not_stored``, since the caller has it). A
handler that raises, returns what cannot be
serialised, or a reply over the server's ``max_payload``, or runs past the request's deadline
(it is cancelled then), makes the SDK append ``RouteFailed``: the router cools the agent
down and sends the message to the next candidate. A ``CancelledError`` the handler raises
while the agent is not stopping it (a task it awaited was cancelled) is such a failure too.
A ``RouteFailed`` over ``max_payload`` leaves out what the router can do without, never the
payload (see :func:`_failure_headers`).

Every ``heartbeat_interval`` seconds the instance puts its load into KV ``agent_load``
(requests/s, in flight, p50/p99 latency, error rate, and GPU free memory and utilisation
when ``nvidia-smi`` answers); routers stop choosing an instance that stops heartbeating.
An interval over a third of the bucket's TTL (15 s by default) is shortened to that, with a
warning: routers forget an instance whose newest heartbeat is older than the TTL.
On stop it drains: it fetches no more, runs what its last fetch's pull request still
brings until that request expires (then ends its inbox subscription), gives its handlers
what is left of ``drain_timeout`` seconds (one still running then is cancelled and its
message handed back, for another instance, after a second), then deletes its load entry
so routers stop choosing it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

import nats
import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.kv import KeyValue

from broker.auth import valid_tenant
from broker.envelope import CONTENT_TYPE, DEFAULT_CONTENT_TYPE, PAYLOAD_HEADERS
from broker.errors import Unavailable
from broker.natsconn import (
    RECONNECT_FOREVER,
    ConnectOptions,
    LogThrottle,
    cancel_until_done,
    close_within,
    explain_connect_error,
    message_size,
    nats_url_problem,
    open_client,
)
from broker.registry.manifest import AgentManifest, validate_manifest
from broker.routing.events import (
    H_AGENT,
    H_DEADLINE,
    H_INTENT,
    H_MESSAGE_SEQ,
    H_REPLY_TO,
    FailureReason,
    RouteDecided,
    RouteEventUnreadable,
    RouteFailed,
    deadline_of,
    inbox_consumer_names,
    inbox_subject,
)
from broker.routing.load import InstanceLoad, load_key, new_instance_id
from broker.routing.replies import ReplyStore, reply_headers, reply_subject
from broker.streams import AGENT_LOAD_BUCKET, Stream
from broker.telemetry import setup, tracing

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

_STATS_WINDOW = 30.0
_FETCH_TIMEOUT = 1.0
#: Seconds before a message whose failure could not be recorded runs again.
_FAILURE_NOT_RECORDED_DELAY = 1.0
#: Seconds before a message handed back on stop runs again (elsewhere, most likely): never at
#: once, so a message handed back again and again cannot spin.
_HANDED_BACK_DELAY = 1.0
#: What ``RouteFailed`` keeps of its failure's text (``RouteFailed.to_headers`` keeps no more).
_FAILURE_TEXT = 500
#: The routed message's headers that a ``RouteFailed`` too large with all of them keeps: what
#: reads the payload, what routing reads, and who waits for the answer until when.
_FAILURE_KEPT_HEADERS = PAYLOAD_HEADERS | frozenset(
    name.lower() for name in (H_REPLY_TO, H_DEADLINE, H_INTENT)
)
#: Seconds between two log lines of one NATS error text (a permission refused on every
#: message would otherwise log a line per message).
_ERROR_LOG_EVERY = 10.0
#: Seconds a reply's append to ROUTES may take to be acked before it is logged as not stored.
_REPLY_STORE_TIMEOUT = 2.0
#: Tries at making a vanished inbox consumer again, and the pause between them.
_RESUBSCRIBE_TRIES = 3
#: Heartbeats between two reads of the inbox consumer's delivered position.
_POSITION_EVERY_BEATS = 5
_RESUBSCRIBE_PAUSE = 0.5
#: Seconds a stopping agent gives the removal of its heartbeat, then its connection's close.
_LEAVE_SECONDS = 2.0
#: Seconds a fetch's pull request may outlive the fetch on the server: it expires
#: ``_FETCH_TIMEOUT`` after the server read it, later than the fetch's own timer started.
_PULL_REQUEST_GRACE = 0.5


@dataclass(frozen=True, slots=True)
class Request:
    """One routed message, as a handler sees it."""

    payload: bytes
    content_type: str
    headers: Mapping[str, str]
    route: RouteDecided
    deadline: float | None  # unix time in seconds; the handler is cancelled after it

    @property
    def message_seq(self) -> int:
        return self.route.message_seq

    @property
    def attempt(self) -> int:
        return self.route.attempt

    @property
    def mirror(self) -> bool:
        """A shadow copy: the reply is discarded."""
        return self.route.mirror

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.payload)

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply with an explicit content type."""

    payload: bytes
    content_type: str = DEFAULT_CONTENT_TYPE


Handler = Callable[[Request], Awaitable[Any]]
#: An instance id: one token of its heartbeat's key, as :func:`new_instance_id` makes them.
_INSTANCE = re.compile(r"[A-Za-z0-9_-]+")
#: A header value NATS stores as given: visible ASCII and inner spaces, 1 to 255 characters.
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")


def _describe(value: object, limit: int = 300) -> str:
    """``repr(value)``, cut to ``limit``; the type's name when its ``__repr__`` raises (an
    ORM object whose session is closed, say): a failure must be recorded whatever it holds."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} that cannot be shown>"
    return text[:limit]


def to_reply(result: Any) -> Reply:
    """What a handler returned, as reply bytes and a content type; ``TypeError`` when it
    is none of those and cannot be serialised as JSON (a dict with int keys, say), or a
    :class:`Reply` whose payload is not bytes or whose content type is not a header value."""
    if isinstance(result, Reply):
        payload, content_type = result.payload, result.content_type
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(
                f"a Reply's payload must be bytes, not {type(payload).__name__} "
                "(return a str for text/plain, or encode it)"
            )
        if not isinstance(content_type, str) or not _HEADER_VALUE.fullmatch(content_type):
            raise TypeError(
                f"a Reply's content_type must be a media type, not {_describe(content_type)}"
            )
        return result if isinstance(payload, bytes) else Reply(bytes(payload), content_type)
    if isinstance(result, bytes):
        return Reply(result)
    if isinstance(result, str):
        return Reply(result.encode(), "text/plain; charset=utf-8")
    try:
        return Reply(orjson.dumps(result), "application/json")
    except orjson.JSONEncodeError as e:
        raise TypeError(f"the handler's result cannot be serialised as JSON: {e}") from None


class LoadSource(Protocol):
    """Where an instance reads its GPU's free memory (MiB) and utilisation (0..1)."""

    def gpu(self) -> tuple[float | None, float | None]: ...


class NvidiaSmi:
    """GPU numbers from ``nvidia-smi`` (the first GPU); ``(None, None)`` without one."""

    def __init__(self) -> None:
        self.binary = shutil.which("nvidia-smi")

    def gpu(self) -> tuple[float | None, float | None]:
        if self.binary is None:
            return None, None
        try:
            out = subprocess.run(
                [
                    self.binary,
                    "--query-gpu=memory.free,utilization.gpu",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            free, util = out.splitlines()[0].split(",")
            return float(free), float(util) / 100.0
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None, None


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[_T]) -> _T | None:
    """What ``work`` returns (or raises), or ``None`` as soon as ``stop`` is set first:
    ``work`` is then cancelled, and waited for (whatever it raises while it unwinds is
    dropped; a cancellation of the caller still goes through)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await cancel_until_done(task)  # never raises what the task raised
    if task.cancelled():
        return None
    if task.exception() is not None and stop.is_set():
        return None  # failed while it was being stopped: the stop is what counts
    return task.result()


@dataclass
class _Window:
    """Completions of the last ``_STATS_WINDOW`` seconds: (monotonic time, ms, ok)."""

    done: deque[tuple[float, float, bool]] = field(default_factory=deque)
    started: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        """What the window spans now: ``_STATS_WINDOW``, or less while the instance is
        younger (a second at least), so a fresh instance's qps is not a fraction of it."""
        return min(_STATS_WINDOW, max(time.monotonic() - self.started, 1.0))

    def add(self, latency_ms: float, ok: bool) -> None:
        self.done.append((time.monotonic(), latency_ms, ok))

    def snapshot(self) -> list[tuple[float, float, bool]]:
        """Drop what left the window and copy the rest. Call it where completions are added
        (the event loop): a deque iterated on one thread while another appends raises."""
        cutoff = time.monotonic() - _STATS_WINDOW
        done = self.done
        while done and done[0][0] < cutoff:
            done.popleft()
        return list(done)

    def summary(self) -> tuple[float, float, float, float]:
        """(qps, p50 ms, p99 ms, error rate) over the window."""
        return self.summarize(self.snapshot(), self.seconds())

    @staticmethod
    def summarize(
        done: list[tuple[float, float, bool]], seconds: float = _STATS_WINDOW
    ) -> tuple[float, float, float, float]:
        """(qps, p50 ms, p99 ms, error rate) of a :meth:`snapshot` (any thread) that spans
        ``seconds`` (:meth:`seconds`)."""
        if not done:
            return 0.0, 0.0, 0.0, 0.0
        latencies = sorted(ms for _, ms, _ in done)
        n = len(latencies)
        errors = sum(1 for _, _, ok in done if not ok)
        return (
            n / seconds,
            latencies[(n - 1) // 2],
            latencies[min(n - 1, round(0.99 * (n - 1)))],
            errors / n,
        )


def _check_options(
    *,
    concurrency: int,
    heartbeat_interval: float,
    ack_wait: float,
    drain_timeout: float,
    max_deliveries: int,
    tenant: str,
    instance: str | None,
    nats_url: str,
) -> None:
    """Refuse settings an instance cannot run with, when it is made: a ``concurrency`` of 0
    never fetches, and nothing would say why; a ``nats_url`` that names no server (``bogus://x``,
    ``nats://h:notaport``, nothing) was tried for ever, reconnecting, with "cannot reach NATS"
    in the log. Nor would a ``tenant`` or ``instance`` that is
    not one subject token: its inbox subject is no inbox, and its heartbeats (key
    ``<tenant>.<agent>.<instance>`` in ``agent_load``) are refused by NATS or by the
    routers, so it would run and never be given work."""
    if not isinstance(nats_url, str):
        raise ValueError(f"nats_url must be NATS URLs, comma-separated, not {nats_url!r}")
    if problem := nats_url_problem(nats_url, option="nats_url"):
        raise ValueError(problem)
    if not isinstance(tenant, str):
        raise ValueError(f"tenant must be a tenant's name, not {tenant!r}")
    valid_tenant(tenant)
    if instance and not (isinstance(instance, str) and _INSTANCE.fullmatch(instance)):
        raise ValueError(f"instance {instance!r} must be A-Z a-z 0-9 _ - (one key token)")
    counts = {"concurrency": (concurrency, 1), "max_deliveries": (max_deliveries, 2)}
    for name, (count, least) in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, not {count!r}")
    seconds = {"heartbeat_interval": heartbeat_interval, "ack_wait": ack_wait}
    for name, value in seconds.items():
        if not _finite(value) or value <= 0:
            raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")
    if not _finite(drain_timeout) or drain_timeout < 0:
        raise ValueError(
            f"drain_timeout must be a number of seconds, 0 or more, not {drain_timeout!r}"
        )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _with_trace(failure: RouteFailed, original: Mapping[str, str]) -> dict[str, str]:
    headers = failure.to_headers(original)
    tracing.inject(headers)
    return headers


def _failure_headers(failure: RouteFailed, request: Request, limit: int) -> dict[str, str] | None:
    """The headers that store ``failure`` with the routed payload within the server's
    ``max_payload`` (over it, the server would close the connection). Routers retry the
    decision stored in ``ROUTES`` (the failure's ``Broker-Route-Seq``); the payload stays
    for routers older than that, which send the failure's own on to the next candidate,
    and these give way in turn: the decision's ranked candidates and detail (the
    ``RouteDecided`` in ``ROUTES`` keeps them), the failure's text, and the message's own
    headers other than those that read the payload, route it, and answer the caller.
    ``None`` when even that is too large."""
    route = failure.route
    lean = replace(route, decision=replace(route.decision, candidates=(), detail=""))
    kept = {k: v for k, v in request.headers.items() if k.lower() in _FAILURE_KEPT_HEADERS}
    forms = (
        ((), route, request.headers),
        (("candidates", "detail"), lean, request.headers),
        (("candidates", "detail", "headers"), lean, kept),
    )
    for dropped, kept_route, original in forms:
        left_out = list(dropped)
        text = failure.message[:_FAILURE_TEXT]
        headers = _with_trace(replace(failure, route=kept_route, message=text), original)
        over = message_size(request.payload, headers) - limit
        if 0 < over <= len(text) and left_out:  # a char is a byte or more of the header
            text = text[: len(text) - over]
            headers = _with_trace(replace(failure, route=kept_route, message=text), original)
            over = message_size(request.payload, headers) - limit
            left_out.append("text")
        if over <= 0:
            if left_out:
                log.warning(
                    "route_failure_trimmed",
                    message_seq=request.message_seq,
                    left_out=",".join(left_out),
                )
            return headers
    return None


async def _hand_back(message: Msg) -> None:
    """Hand ``message`` back to the inbox consumer for another instance (a nak, 1 s); not
    when it could not be (the connection gone: it comes back after the ack_wait)."""
    with contextlib.suppress(Exception):
        await message.nak(delay=_HANDED_BACK_DELAY)


def _deliveries(message: Msg) -> int:
    """How many times JetStream delivered ``message``, this time included (1 when the
    message carries no JetStream metadata)."""
    try:
        return message.metadata.num_delivered or 1
    except Exception:
        return 1


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (the agent stopping it), rather
    than a ``CancelledError`` coming up from something it awaited (a task a library
    cancelled): only the first is a stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Agent:
    """One running instance of an agent."""

    def __init__(
        self,
        manifest: AgentManifest | Mapping[str, Any],
        *,
        nats_url: str = "nats://127.0.0.1:4222",
        tenant: str = "default",
        concurrency: int = 8,
        heartbeat_interval: float = 2.0,
        ack_wait: float = 60.0,
        drain_timeout: float = 30.0,
        max_deliveries: int = 5,
        instance: str | None = None,
        register: bool = False,
        load_source: LoadSource | None = None,
        connect_options: ConnectOptions | None = None,
        store_replies: bool = True,
    ) -> None:
        """``connect_options`` adds NATS TLS and credentials, e.g.
        ``connect_options(Settings(), name="my-agent")`` from :mod:`broker.natsconn` reads
        ``BROKER_NATS_TLS_*``, ``BROKER_NATS_USER`` … ; ``nats_url`` still names the servers.

        ``register``: put the manifest into the registry at start, unless the registered one
        is of a newer version (Semantic Versioning precedence): an old instance restarted
        during a rolling upgrade leaves the new manifest in place.

        ``max_deliveries``: the delivery of a message that reaches this count is not run but
        recorded as ``RouteFailed`` (the deliveries before it all ended unsettled: the
        process died or was stopped while it ran), so the handler runs a message at most
        ``max_deliveries - 1`` times. ``ValueError`` for a value that cannot work (a
        ``concurrency`` under 1 would never fetch).

        ``store_replies``: append each reply to ``ROUTES`` too (one JetStream append per
        reply), where a caller retrying a request after losing its connection finds it.
        ``False`` sends replies to the waiting caller only: such a retry then waits in vain
        until the request's deadline."""
        _check_options(
            concurrency=concurrency,
            heartbeat_interval=heartbeat_interval,
            ack_wait=ack_wait,
            drain_timeout=drain_timeout,
            max_deliveries=max_deliveries,
            tenant=tenant,
            instance=instance,
            nats_url=nats_url,
        )
        self.manifest = (
            manifest if isinstance(manifest, AgentManifest) else validate_manifest(dict(manifest))
        )
        self.name = self.manifest.name
        self.nats_url = nats_url
        self._servers = [url.strip() for url in nats_url.split(",") if url.strip()]
        self.tenant = tenant
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.ack_wait = ack_wait
        self.drain_timeout = drain_timeout
        self.max_deliveries = max_deliveries
        self.instance = instance or new_instance_id()
        self.register = register
        self.load_source = load_source or NvidiaSmi()
        self.connect_options = connect_options
        self.store_replies = store_replies
        self._handler: Handler | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._closing = False  # our own close: a disconnect then is the plan, not news
        # The inbox consumer's own ack_wait, which the keep-alive is timed on: an existing
        # consumer keeps the one it was made with, whatever ``ack_wait`` this instance asks.
        self._consumer_ack_wait = ack_wait
        self._durable = self.consumer_name  # the consumer bound: this, or an earlier name
        # Where a consumer made again resumes: the first inbox sequence not yet delivered, as
        # far as this instance knows, by the consumer created at ``_consumer_created``.
        self._next_seq = 1
        self._consumer_created: datetime | None = None
        self._last_fetch = 0.0  # monotonic time the last fetch started
        self._free = concurrency  # handler slots not in use
        self._slot_freed = asyncio.Event()
        # Cautious mode (see _consume): one message a fetch until this monotonic time.
        self._cautious_until = 0.0
        self._suspects = 0  # redelivered messages taken and not finished: no fetch meanwhile
        self._others = 0  # the other messages taken and not finished
        self._others_done = asyncio.Event()  # set while _others is 0
        self._others_done.set()
        self._alone = asyncio.Lock()  # held by the redelivered message that runs alone
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None  # the inbox subscription being consumed
        self._window = _Window()
        self.handled = 0
        self.failed = 0
        self._reply_store: ReplyStore | None = None  # made with the connection
        self._error_log = LogThrottle(_ERROR_LOG_EVERY)

    def handler(self, fn: Handler) -> Handler:
        """Decorator: the async function that handles each request."""
        self._handler = fn
        return fn

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def consumer_name(self) -> str:
        """The durable consumer this agent's instances share (:func:`inbox_consumer_names`)."""
        return inbox_consumer_names(self.tenant, self.name)[0]

    async def _inbox_consumer(self, js: JetStreamContext, inbox: str) -> str:
        """The consumer to bind: :attr:`consumer_name`, or the ``agent-<name>`` an earlier
        version named without the tenant when it reads this same inbox (a new consumer would
        deliver the inbox's whole history again). A consumer of that name on another inbox
        is refused rather than shared."""
        for name in inbox_consumer_names(self.tenant, self.name):
            try:
                info = await js.consumer_info(Stream.ROUTES, name)
            except nats.js.errors.NotFoundError:
                continue
            reads = info.config.filter_subject
            if reads == inbox:
                return name
            if name == self.consumer_name:
                raise RuntimeError(f"consumer {name} reads {reads}, not this agent's {inbox}")
        return self.consumer_name

    # --- running ---------------------------------------------------------------------

    def run_forever(self) -> None:
        """Run until SIGINT/SIGTERM, then drain; for a ``main()``."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.run(stop)

        asyncio.run(main())

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, handle and heartbeat until ``stop`` is set; then drain and return.

        NATS going away is waited out, however long, and an inbox consumer that vanished
        is made again; :class:`~broker.errors.Unavailable` when the connection closes for
        good before ``stop`` is set, or the consumer cannot be made again (after draining),
        and when a JetStream request of the start goes unanswered (JetStream off, or a NATS
        user without the permissions docs/tenants.md lists)."""
        if self._handler is None:
            raise RuntimeError("no handler: decorate an async function with @agent.handler")
        setup("agent")
        try:
            sub = await _unless_stopped(stop, self._start())
        except BaseException as e:
            self._closing = True
            closed = self._nc is not None and self._nc.is_closed  # by someone else
            if self._nc is not None:
                await close_within(self._nc, _LEAVE_SECONDS)
            if closed and isinstance(e, Exception):
                raise Unavailable(
                    "the NATS connection closed while the agent was starting; "
                    "it never consumed its inbox"
                ) from e
            if isinstance(e, TimeoutError):  # nats-py's own TimeoutError is one too
                raise Unavailable(
                    "NATS did not answer a JetStream request of the agent's start in time: "
                    "is JetStream enabled, and may this NATS user make it? A request the "
                    "user may not make goes unanswered (see `agent_nats_error` in the log, "
                    "and docs/tenants.md for the permissions an agent needs)"
                ) from e
            raise
        if sub is None:  # stopped before it could start: NATS unreachable, say
            self._closing = True
            if self._nc is not None:
                await close_within(self._nc, _LEAVE_SECONDS)
            log.info("agent_stopped_before_starting", agent=self.name, instance=self.instance)
            return
        # From here on the connection is closed however run() ends: cancelled during its
        # first heartbeat (a GPU probe can take seconds) or its drain included.
        beat: asyncio.Task[None] | None = None
        try:
            await self._heartbeat()
            beat = asyncio.create_task(self._heartbeat_loop(stop), name="agent-heartbeat")
            log.info("agent_started", agent=self.name, instance=self.instance, tenant=self.tenant)
            await self._consume(sub, stop)
        finally:
            try:
                await self._drain()
            finally:
                if beat is not None:
                    beat.cancel()
                    await asyncio.wait({beat})  # never raises what the task raised
                await self._leave()
                log.info("agent_stopped", agent=self.name, handled=self.handled, failed=self.failed)

    async def _start(self) -> Any:
        """Connect and bind the inbox consumer: the subscription."""
        await self._connect()
        return await self._subscribe()

    async def _subscribe(self, resume_at: int | None = None) -> Any:
        """Bind the inbox consumer, creating it when it does not exist: from the inbox's
        first message, or from ``resume_at`` (a stream sequence) when it is made again."""
        assert self._js is not None
        subject = inbox_subject(self.tenant, self.name)
        durable = await self._inbox_consumer(self._js, subject)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._consumer_ack_wait,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subject,
            max_ack_pending=max(1000, self.concurrency * 16),
        )
        if resume_at is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = resume_at
        sub = await self._js.pull_subscribe(
            subject, durable=durable, stream=Stream.ROUTES, config=config
        )
        info = await sub.consumer_info()
        self._durable = durable
        self._note_position(info)
        self._read_ack_wait(info, durable)
        self._note_pending(info, starting=True)
        return sub

    def _note_position(self, info: ConsumerInfo) -> None:
        """Keep up with what the instances sharing the consumer were delivered (read on
        every few heartbeats), so that one made again does not deliver it again."""
        delivered = 0 if info.delivered is None else info.delivered.stream_seq
        if info.created != self._consumer_created:  # another consumer: its own sequences
            self._consumer_created, self._next_seq = info.created, delivered + 1
        else:
            self._next_seq = max(self._next_seq, delivered + 1)

    def _note_pending(self, info: ConsumerInfo, *, starting: bool = False) -> None:
        """Be cautious (:meth:`_be_cautious`) while the consumer holds a message delivered
        more than once and not settled (read on every few heartbeats): a process may have
        died with it, on any instance, and it may be running one at a time through a crash
        loop. On ``starting``, while the consumer holds any message not settled: it may be
        one the process before this one died with, on its way back."""
        held = info.num_ack_pending if starting else info.num_redelivered
        if held:
            self._be_cautious()

    def _read_ack_wait(self, info: ConsumerInfo, durable: str) -> None:
        """Time the keep-alive on the bound consumer's ack_wait: nats-py binds to an existing
        consumer as it is, so a new ``ack_wait`` does not reach it. It is not updated either:
        the instances sharing it would each keep it alive on a different clock."""
        actual = info.config.ack_wait
        if actual is None or actual <= 0:
            return
        self._consumer_ack_wait = actual
        if abs(actual - self.ack_wait) > 0.001:
            log.warning(
                "agent_ack_wait_differs",
                consumer=durable,
                ack_wait=self.ack_wait,
                consumer_ack_wait=actual,
                hint="the consumer's ack_wait applies; edit the consumer to change it",
            )

    async def _inbox_gone(self) -> bool:
        """Whether the inbox consumer no longer exists (deleted, or ROUTES made again): a
        fetch then gets no answer (503) or 404. Anything else (NATS busy, or away for a
        moment) is no proof, and the fetch is tried again."""
        assert self._js is not None
        try:
            await self._js.consumer_info(Stream.ROUTES, self._durable)
        except nats.js.errors.NotFoundError:  # the consumer, or the whole stream
            return True
        except Exception:
            return False
        return False

    async def _remake_if_gone(self, sub: Any) -> Any | None:
        """The inbox consumer made again and bound when it is gone (:meth:`_resubscribe`),
        else ``None``."""
        return await self._resubscribe(sub) if await self._inbox_gone() else None

    async def _resubscribe(self, old: Any) -> Any:
        """Make the inbox consumer again and bind it. Made from the inbox's first message
        when ROUTES is a new stream; otherwise from the first message this instance knows
        was not delivered yet, so the history is not run again (a message another instance
        took just before may be). :class:`~broker.errors.Unavailable` when it cannot be made
        (ROUTES is gone): the instance stops, and its load entry with it, rather than
        heartbeating while it consumes nothing."""
        log.warning("agent_inbox_consumer_gone", agent=self.name, consumer=self._durable)
        with contextlib.suppress(Exception):
            await old.unsubscribe()
        error: Exception | None = None
        for _ in range(_RESUBSCRIBE_TRIES):  # instances racing: the losers bind the winner's
            try:
                sub = await self._subscribe(await self._resume_point())
            except Exception as e:
                error = e
                await asyncio.sleep(_RESUBSCRIBE_PAUSE)
                continue
            log.info("agent_inbox_consumer_made_again", agent=self.name, consumer=self._durable)
            return sub
        why = f"the inbox consumer {self._durable} is gone and could not be made again"
        raise Unavailable(f"{why}: {error!r}"[:500])

    async def _resume_point(self) -> int | None:
        """Where a consumer made again starts: ``None`` (the whole inbox) when ROUTES is a new
        stream (made after the consumer that was lost: made again, or NATS restarted on an
        empty store), otherwise the first sequence not known to have been delivered.
        ``NotFoundError`` when ROUTES is gone."""
        assert self._js is not None
        info = await self._js.stream_info(Stream.ROUTES)
        known = self._consumer_created
        newer = known is None or info.created is None or info.created > known
        if newer or info.state.last_seq < self._next_seq - 1:
            return None
        return self._next_seq

    async def _connect(self) -> None:
        options = ConnectOptions(**(self.connect_options or {}))
        options["servers"] = self._servers
        options["name"] = f"agent-{self.name}-{self.instance}"

        async def on_error(e: Exception) -> None:
            if self._reply_store is not None:  # a permission violation of its appends
                self._reply_store.connection_error(str(e))
            error = explain_connect_error(e, options)
            if self._nc is not None and self._nc.is_reconnecting:  # each failed attempt
                log.debug("agent_nats_reconnect_failed", error=error)
            elif (repeated := self._error_log.admit(error)) is not None:
                log.warning("agent_nats_error", error=error, repeated=repeated)

        self._nc = await open_client(
            **options,
            **RECONNECT_FOREVER,  # wait out an outage of any length, as the broker does
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=on_error,
        )
        self._js = self._nc.jetstream(timeout=10.0)
        self._reply_store = ReplyStore(self._nc, self.name, timeout=_REPLY_STORE_TIMEOUT)
        if self.store_replies:
            await self._reply_store.start()
        self._kv = await self._js.key_value(AGENT_LOAD_BUCKET)
        await self._fit_heartbeat_to_ttl(self._kv)
        if self.register:
            from broker.envelope import Tenant
            from broker.errors import Conflict
            from broker.publisher import Publisher
            from broker.registry.commands import put_agent

            publisher = Publisher(
                self._servers,
                name=f"agent-{self.name}-register",
                connect_options=self.connect_options,
            )
            publisher.start()
            try:
                await publisher.wait_connected(10.0)
                for attempt in range(3):  # instances starting together race; the loser re-reads
                    try:
                        if await self._newer_registered(publisher) is None:
                            await put_agent(publisher, Tenant(self.tenant), self.manifest)
                        break
                    except Conflict:
                        if attempt == 2:
                            raise
            finally:
                await publisher.close()

    async def _newer_registered(self, publisher: Any) -> str | None:
        """The version of the registered manifest when it is newer than this instance's, or
        ``None``. During a rolling upgrade an instance of the version going out that starts
        again (it crashed, it was rescheduled) would otherwise put its older manifest back
        over the new one, and the registry would flap with every such restart. The instance
        still runs: it serves its inbox until it is replaced."""
        from broker.envelope import Tenant
        from broker.registry.commands import last_event
        from broker.registry.events import UnreadableEvent
        from broker.registry.manifest import version_order

        try:
            current = await last_event(publisher.js, Tenant(self.tenant), self.name)
        except UnreadableEvent:  # written by a newer release, perhaps; ours replaces it
            return None
        if current is None or current.manifest is None:
            return None
        registered = current.manifest.version
        if version_order(registered) <= version_order(self.manifest.version):
            return None
        log.warning(
            "agent_registration_skipped",
            agent=self.name,
            registered=registered,
            ours=self.manifest.version,
            why="the registered manifest is of a newer version",
        )
        return registered

    async def _consume(self, sub: Any, stop: asyncio.Event) -> None:
        """Fetch and start handlers until ``stop`` is set. A connection that closed (it
        never gives up reconnecting, so something closed it for good) raises: returning
        would look like a clean stop to whoever supervises the agent. So does an inbox
        consumer that vanished and cannot be made again (:meth:`_resubscribe`).

        A process that dies running one message (a segfault, the OOM killer) dies with every
        message it had fetched, and JetStream counts a delivery for each. So that the
        messages fetched beside a poison message do not reach ``max_deliveries`` with it, a
        redelivered message runs alone (:meth:`_turn`), and nothing is fetched while one
        waits for its turn or runs. A batch could still bring several redeliveries at once
        (JetStream hands them out before any new message), held together while they wait:
        so the instance is cautious, and fetches one message at a time, while redeliveries
        may be on their way (:meth:`_be_cautious`)."""
        self._sub = sub
        while not stop.is_set():
            if self._nc is None or self._nc.is_closed:
                raise Unavailable(
                    "the NATS connection closed while the agent was running; "
                    "it stopped consuming its inbox"
                )
            # nats-py's fetch hands over every message its subscription queued (one that came
            # after an earlier fetch timed out), however few were asked for: slots may be
            # overdrawn, and a fetch of 0 or fewer raises "invalid batch size".
            if self._free <= 0 or self._suspects:  # or a redelivered message runs alone
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_FETCH_TIMEOUT):
                        await self._slot_freed.wait()
                continue
            size = 1 if time.monotonic() < self._cautious_until else self._free
            self._last_fetch = time.monotonic()
            try:
                batch: list[Msg] = await sub.fetch(size, timeout=_FETCH_TIMEOUT)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                await asyncio.sleep(0.1)  # closing: the check above raises once it closed
                continue
            except Exception as e:  # a NATS hiccup (try again shortly), or the consumer gone
                gone = isinstance(
                    e, nats.js.errors.ServiceUnavailableError | nats.js.errors.NotFoundError
                )
                if gone:
                    # Up to a JetStream timeout per try: a stop meanwhile ends it at once.
                    remade = await _unless_stopped(stop, self._remake_if_gone(sub))
                    if stop.is_set():
                        if remade is not None:  # made just as the stop came
                            with contextlib.suppress(Exception):
                                await remade.unsubscribe()
                        return
                    if remade is not None:
                        sub = self._sub = remade
                        continue
                log.warning("agent_fetch_failed", error=repr(e)[:200])
                await asyncio.sleep(0.5)
                continue
            self._start_handlers(batch)

    def _start_handlers(self, batch: list[Msg]) -> None:
        """Start a handler for each message of ``batch``. First deliveries start at once;
        redelivered ones run after them, one at a time, the least delivered first (a
        poison has been delivered the most)."""
        for message in sorted(batch, key=_deliveries):
            with contextlib.suppress(Exception):  # not a JetStream message: no position
                seq = message.metadata.sequence.stream
                self._next_seq = max(self._next_seq, seq + 1)
            alone = _deliveries(message) > 1
            self._free -= 1
            if alone:
                self._suspects += 1
                self._be_cautious()
            else:
                self._others += 1
                self._others_done.clear()
            task = asyncio.create_task(self._handle(message, alone))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, alone))

    def _be_cautious(self) -> None:
        """Fetch one message at a time for the consumer's ack_wait from now. Called when a
        redelivered message is fetched, while the consumer holds one not settled
        (:meth:`_note_pending`), and on starting while the consumer has messages unacked
        (some may be those the process before this one died with). The messages a dead
        process held come back within an ack_wait of its death, each its own ack_wait after
        it was last fetched or kept alive; fetched one at a time, each runs alone and no
        crash counts a delivery for another. First deliveries still run side by side,
        ``concurrency`` at a time."""
        until = time.monotonic() + self._consumer_ack_wait
        self._cautious_until = max(self._cautious_until, until)

    @contextlib.asynccontextmanager
    async def _turn(self, alone: bool) -> AsyncIterator[None]:
        """Wait until a message may run: at once, or, ``alone`` (a redelivered message),
        after every other message this instance took has finished and what they sent (the
        replies, the acks) has reached the server, one such message at a time. The consume
        loop fetches nothing meanwhile, so a crash while it runs counts a delivery for it
        and for nothing else."""
        if not alone:
            yield
            return
        async with self._alone:
            await self._others_done.wait()
            if self._nc is not None:
                with contextlib.suppress(Exception):  # NATS away: its acks are lost anyway
                    await self._nc.flush(timeout=2)
            yield

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("agent_nats_disconnected", agent=self.name, instance=self.instance)

    async def _on_reconnected(self) -> None:
        log.info("agent_nats_reconnected", agent=self.name, instance=self.instance)

    def _done(self, alone: bool, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._free += 1
        if alone:
            self._suspects -= 1
        else:
            self._others -= 1
            if self._others == 0:
                self._others_done.set()
        self._slot_freed.set()

    async def _handle(self, message: Msg, alone: bool) -> None:
        try:
            await self._handle_one(message, alone)
        except asyncio.CancelledError:
            # Stopped while it ran (past drain_timeout): handed back for another instance to
            # run in a second, rather than after the consumer's ack_wait.
            await _hand_back(message)
            raise
        except Exception as e:  # the SDK's own failure, not the handler's: never unsettled
            log.error(
                "agent_message_not_settled",
                agent=self.name,
                error=_describe(e),
                exc_info=True,
            )
            with contextlib.suppress(Exception):
                await message.nak(delay=_FAILURE_NOT_RECORDED_DELAY)

    async def _handle_one(self, message: Msg, alone: bool) -> None:
        headers = dict(message.headers or {})
        try:
            route = RouteDecided.from_headers(headers)
        except RouteEventUnreadable as e:
            log.warning("agent_message_unreadable", error=e.message)
            await message.term()
            return
        request = Request(
            message.data,
            headers.get(CONTENT_TYPE, DEFAULT_CONTENT_TYPE),
            headers,
            route,
            deadline_of(headers),
        )
        if await self._expired(message, request):
            return
        delivered = _deliveries(message)
        if delivered >= self.max_deliveries:  # it killed (or outlived) every instance it ran on
            await self._give_up(message, request, delivered)
            return
        keepalive = asyncio.create_task(self._keep_alive(message))  # while it waits, too
        try:
            async with self._turn(alone):
                if alone and await self._expired(message, request):  # while it waited
                    return
                await self._run(message, request)
        finally:
            keepalive.cancel()

    async def _expired(self, message: Msg, request: Request) -> bool:
        """Whether the request's deadline passed before it ran; then it is failed."""
        if request.deadline is None or time.time() < request.deadline:
            return False
        recorded = await self._failed(
            message, request, FailureReason.EXPIRED, "the deadline passed before it ran"
        )
        await self._settle(message, recorded)
        return True

    async def _run(self, message: Msg, request: Request) -> None:
        """Run the handler, send its reply or record its failure, and settle the message."""
        assert self._handler is not None
        started = time.monotonic()
        span = tracing.span(
            f"agent {self.name}", parent_headers=request.headers, kind=tracing.SpanKind.CONSUMER
        )
        recorded = True
        with span:  # the reply (or the failure) is a child of the handler's span
            deadline_timer = asyncio.timeout(request.time_left())
            try:
                async with deadline_timer:
                    result = await self._handler(request)
                reply = to_reply(result)  # a result that cannot be serialised fails the same
            except (Exception, asyncio.CancelledError) as e:  # the handler's own failure
                if isinstance(e, asyncio.CancelledError) and _being_cancelled():
                    raise  # the agent stops it (drain): _handle hands the message back
                self._window.add((time.monotonic() - started) * 1000, False)
                if isinstance(e, TimeoutError) and deadline_timer.expired():
                    reason, why = FailureReason.TIMEOUT, "cancelled at the deadline"
                else:  # a handler's own TimeoutError or CancelledError (from a call or task
                    # of its own) included: reported, not taken for a stop and run again
                    why = _describe(e, 4096)
                    log.warning("agent_handler_failed", agent=self.name, error=why[:300])
                    reason = FailureReason.ERROR
                recorded = await self._failed(message, request, reason, why)
            else:
                latency_ms = (time.monotonic() - started) * 1000
                unsent = await self._reply(request, reply, message.metadata.sequence.stream)
                if unsent is None:
                    self._window.add(latency_ms, True)
                    self.handled += 1
                else:  # the caller would wait in vain: the router retries or dead-letters it
                    self._window.add(latency_ms, False)
                    log.warning("agent_reply_not_sent", agent=self.name, error=unsent)
                    recorded = await self._failed(message, request, FailureReason.ERROR, unsent)
        await self._settle(message, recorded)

    async def _give_up(self, message: Msg, request: Request, delivered: int) -> None:
        """Record a message delivered ``max_deliveries`` times as failed, without running it,
        and terminate it: every delivery before ended unsettled, most likely because running
        it killed the process (a segfault, the OOM killer), and each run would kill the next
        instance. The router then sends it to the next candidate or to the DLQ."""
        log.warning(
            "agent_message_not_run",
            agent=self.name,
            message_seq=request.message_seq,
            delivered=delivered,
        )
        why = (
            f"delivered {delivered} times without being settled: not run again (each "
            "instance that ran it died or stopped before it finished)"
        )
        if await self._failed(message, request, FailureReason.ERROR, why):
            await message.term()
        else:
            await self._settle(message, False)

    async def _settle(self, message: Msg, failure_recorded: bool) -> None:
        """Ack the message, unless its failure could not be recorded: then hand it back, so
        it runs again (and its failure reaches the router, which retries or dead-letters
        it) rather than vanishing with neither a retry nor an answer."""
        if failure_recorded:
            await message.ack()
            return
        with contextlib.suppress(Exception):  # gone with the connection: redelivered anyway
            await message.nak(delay=_FAILURE_NOT_RECORDED_DELAY)

    async def _keep_alive(self, message: Msg) -> None:
        """Tell JetStream a long handler is still working, so it is not redelivered."""
        while True:
            await asyncio.sleep(self._consumer_ack_wait / 2)
            with contextlib.suppress(Exception):
                await message.in_progress()

    async def _reply(self, request: Request, reply: Reply, route_seq: int) -> str | None:
        """Send the reply to the waiting caller, then store it for a retry of the request
        (the decision it answers is at ``route_seq`` in ``ROUTES``); why it cannot be sent
        (it is over the server's ``max_payload``), or ``None``: sent, or nobody waits."""
        to = request.headers.get(H_REPLY_TO)
        if not to or request.mirror or self._nc is None:
            return None
        headers = {
            CONTENT_TYPE: reply.content_type,
            H_AGENT: self.name,
            H_MESSAGE_SEQ: str(request.message_seq),
        }
        with tracing.span("reply", kind=tracing.SpanKind.PRODUCER):
            tracing.inject(headers)
            size, limit = message_size(reply.payload, headers), self._nc.max_payload
            if size > limit:  # nats-py would refuse it, or the server drop the connection
                return f"the reply is {size} bytes, over the NATS server's max_payload of {limit}"
            with contextlib.suppress(Exception):  # the caller may have gone; nothing to undo
                await self._nc.publish(to, reply.payload, headers=headers)
            await self._store_reply(request, reply.payload, headers, route_seq)
        return None

    async def _store_reply(
        self, request: Request, payload: bytes, headers: dict[str, str], route_seq: int
    ) -> None:
        """Append the reply to ``ROUTES`` (:mod:`broker.routing.replies`), where a caller that
        lost its connection and asks again finds it; sent before the message's ack, its own
        ack not waited for (:class:`ReplyStore`). The caller has the reply already, so one
        that cannot be stored is logged, not run again; one too large to store with the
        stored form's headers is not sent (the server would close the connection)."""
        if not self.store_replies or self._reply_store is None or self._nc is None:
            return
        route = request.route
        stored = reply_headers(route_seq, headers)
        size, limit = message_size(payload, stored), self._nc.max_payload
        if size > limit:
            log.warning(
                "agent_reply_not_stored",
                agent=self.name,
                message_seq=route.message_seq,
                error=f"{size} bytes stored, over the NATS server's max_payload of {limit}",
            )
            return
        subject = reply_subject(route.tenant, self.name, route.message_seq)
        await self._reply_store.append(subject, payload, stored, route.message_seq)

    async def _failed(
        self, delivered: Msg, request: Request, reason: FailureReason, message: str
    ) -> bool:
        """Record the failure of ``request`` (``delivered`` from the inbox) in ``ROUTES``
        for the routers, naming where the decision is stored there (routers retry that
        decision: :meth:`broker.routing.router.Router.retry`); ``False`` when that failed
        (it is handed back, and recorded when it runs again). One that cannot be stored in
        any form (see :func:`_failure_headers`) is only logged: trying again would fail
        alike."""
        self.failed += 1
        if request.mirror or self._js is None or self._nc is None:
            return True
        route_seq = delivered.metadata.sequence.stream
        failure = RouteFailed(request.route, reason, message, self.instance, route_seq)
        headers = _failure_headers(failure, request, self._nc.max_payload)
        if headers is None:
            log.error(
                "route_failure_not_storable",
                message_seq=request.message_seq,
                payload_bytes=len(request.payload),
                max_payload=self._nc.max_payload,
            )
            return True
        try:
            await self._js.publish(failure.subject, request.payload, headers=headers)
        except Exception as e:  # handed back: it runs again and the failure is recorded then
            log.error(
                "route_failure_not_recorded", message_seq=request.message_seq, error=str(e)[:200]
            )
            return False
        return True

    # --- load ------------------------------------------------------------------------

    def current_load(
        self, completed: list[tuple[float, float, bool]] | None = None
    ) -> InstanceLoad:
        """This instance's load now; ``completed``: a window snapshot taken on the loop."""
        if completed is None:
            completed = self._window.snapshot()
        qps, p50, p99, error_rate = _Window.summarize(completed, self._window.seconds())
        try:
            gpu_free, gpu_util = self.load_source.gpu()
        except Exception as e:  # a broken probe costs the GPU numbers, not the heartbeat
            log.warning("agent_load_source_failed", error=repr(e)[:200])
            gpu_free, gpu_util = None, None
        return InstanceLoad(
            tenant=self.tenant,
            agent=self.name,
            instance=self.instance,
            qps=qps,
            in_flight=self.in_flight,
            p50_ms=p50,
            p99_ms=p99,
            error_rate=error_rate,
            gpu_free_mb=gpu_free,
            gpu_util=gpu_util,
            at=time.time(),
        )

    async def _heartbeat(self) -> None:
        if self._kv is None:
            return
        # The window is copied here, on the loop that adds to it; the summary and the GPU
        # probe (a subprocess) run on a thread.
        load = await asyncio.to_thread(self.current_load, self._window.snapshot())
        try:
            await self._kv.put(load.key, load.to_json())
        except Exception as e:  # NATS away for a moment: the next beat tries again
            log.warning("agent_heartbeat_failed", error=str(e)[:200])

    async def _fit_heartbeat_to_ttl(self, kv: KeyValue) -> None:
        """Beat at least three times per the bucket's TTL: routers forget an instance whose
        newest heartbeat is older than the TTL, so a slower interval would take a healthy
        instance out of routing for part of every beat (at 20 s against 15, a quarter of the
        time). A slower one asked for is shortened, and said so."""
        with contextlib.suppress(Exception):  # the bucket's settings unread: keep the asked
            ttl = (await kv.status()).ttl
            if ttl and self.heartbeat_interval > ttl / 3:
                log.warning(
                    "agent_heartbeat_interval_shortened",
                    asked=self.heartbeat_interval,
                    used=ttl / 3,
                    bucket_ttl=ttl,
                )
                self.heartbeat_interval = ttl / 3

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        beats = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await stop.wait()
            if stop.is_set():
                break
            try:
                await self._heartbeat()
            except Exception:  # never end the loop: without beats every router drops us
                log.exception("agent_heartbeat_failed")
            beats += 1
            if self._reply_store is not None:  # appends that were never acked get logged
                self._reply_store.sweep()
            # One consumer_info per instance every few beats (a thousand instances would
            # otherwise ask JetStream 500 times a second): a consumer made again may then
            # deliver once more what the others took in the last few beats. The same read
            # tells whether the consumer holds a redelivered message (cautious mode).
            if self._js is not None and beats % _POSITION_EVERY_BEATS == 0:
                with contextlib.suppress(Exception):  # gone, or NATS away: the fetch tells
                    info = await self._js.consumer_info(Stream.ROUTES, self._durable, timeout=2.0)
                    self._note_position(info)
                    self._note_pending(info)

    async def _drain(self) -> None:
        """Run what the server still delivers to this instance until its last fetch's pull
        request has expired, then end the subscription; give the handlers what is left of
        ``drain_timeout``: those still running then are cancelled, each handing its message
        back (a nak, 1 s) before the connection closes."""
        started = time.monotonic()
        late = await self._run_late_deliveries()
        if late:
            log.info("agent_delivered_at_stop", agent=self.name, count=late)
        if self._tasks:
            log.info("agent_draining", in_flight=len(self._tasks))
            left = max(0.0, self.drain_timeout - (time.monotonic() - started))
            _, pending = await asyncio.wait(set(self._tasks), timeout=left)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)

    async def _run_late_deliveries(self) -> int:
        """Run, as this instance's own, the messages that reach its inbox subscription after
        it stopped fetching; how many.

        A fetch's pull request lives on the server until it expires (a moment past a fetch
        that timed out here), and the server goes on delivering for it: no fetch would take
        those from nats-py's queue any more, and each waited out the consumer's ack_wait (a
        minute) before another instance got it. Handed back instead (a nak), each reached
        the others as a redelivery, run alone there as a possible poison message, holding up
        their other work. Run here, they are first deliveries run once. Once the request
        has expired the subscription ends: its unsubscribe is sent, then a round trip (a
        flush) brings in whatever the server sent before it, which runs here too; the
        server delivers nothing to a request whose subject has no interest. (Ending it
        first would not do in a cluster: the consumer's leader may be another server,
        which hears of the unsubscribe later and meanwhile delivers into the void.) Reads
        nats-py's subscription under the pull subscription (``_sub``); without it, none are
        run (they come back after the ack_wait)."""
        inner = getattr(self._sub, "_sub", None)
        queue = getattr(inner, "_pending_queue", None)
        sid = getattr(inner, "_id", None)
        nc = self._nc
        if inner is None or queue is None or sid is None or nc is None:
            return 0
        late = 0
        until = self._last_fetch + _FETCH_TIMEOUT + _PULL_REQUEST_GRACE
        while (remaining := until - time.monotonic()) > 0:
            try:
                message = await inner.next_msg(timeout=min(remaining, 0.25))
            except nats.errors.TimeoutError:
                continue
            except Exception:  # the connection or the subscription closed
                break
            late += self._run_delivered([message])
        with contextlib.suppress(Exception):  # NATS away: what it holds comes back later
            await nc._send_unsubscribe(sid)
            await nc.flush(timeout=2)
        queued = []
        while not queue.empty():
            queued.append(queue.get_nowait())
        late += self._run_delivered(queued)
        with contextlib.suppress(Exception):
            await inner.unsubscribe()
        return late

    def _run_delivered(self, messages: list[Msg]) -> int:
        """Start handlers for the JetStream messages among ``messages`` (not a pull
        request's status); how many."""
        delivered = [m for m in messages if m.reply and m.reply.startswith("$JS.ACK.")]
        self._start_handlers(delivered)
        return len(delivered)

    async def _leave(self) -> None:
        """Take this instance's heartbeat out of routing and close the connection, in a few
        seconds whatever NATS does: a hung server held a stopping agent 12 s (the delete's
        JetStream timeout, a flush, a close waiting on the socket)."""
        self._closing = True
        if self._kv is not None:  # else routers drop it after the bucket's TTL
            with contextlib.suppress(Exception):
                key = load_key(self.tenant, self.name, self.instance)
                await asyncio.wait_for(self._kv.delete(key), _LEAVE_SECONDS)
        if self._nc is not None:  # handlers are done, and the delete was acknowledged
            await close_within(self._nc, _LEAVE_SECONDS)
