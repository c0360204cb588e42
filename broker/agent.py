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
long handler is kept alive on it). At most ``concurrency`` handlers run at once. A NATS outage
is waited out however long it lasts; a connection closed for good makes :meth:`Agent.run`
raise :class:`~broker.errors.Unavailable` rather than return as if stopped.

For each message the handler gets a :class:`Request`; what it returns is the reply, sent
to the caller waiting in ``POST /v1/route?wait=true`` (bytes as they are, ``str`` as text,
anything else as JSON, or a :class:`Reply`). A handler that raises, returns what cannot be
serialised, or a reply over the server's ``max_payload``, or runs past the request's deadline
(it is cancelled then), makes the SDK append ``RouteFailed``: the router cools the agent
down and sends the message to the next candidate.

Every ``heartbeat_interval`` seconds the instance puts its load into KV ``agent_load``
(requests/s, in flight, p50/p99 latency, error rate, and GPU free memory and utilisation
when ``nvidia-smi`` answers); routers stop choosing an instance that stops heartbeating.
On stop it drains: no new messages, in-flight handlers get ``drain_timeout`` seconds (one
still running then is cancelled and its message handed back at once, for another instance),
then its load entry is deleted so routers stop choosing it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats
import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from broker.envelope import CONTENT_TYPE, DEFAULT_CONTENT_TYPE
from broker.errors import Unavailable
from broker.natsconn import (
    RECONNECT_FOREVER,
    ConnectOptions,
    explain_connect_error,
    message_size,
    open_client,
)
from broker.registry.manifest import AgentManifest, validate_manifest
from broker.routing.events import (
    H_AGENT,
    H_MESSAGE_SEQ,
    H_REPLY_TO,
    FailureReason,
    RouteDecided,
    RouteEventUnreadable,
    RouteFailed,
    deadline_of,
    inbox_subject,
)
from broker.routing.load import InstanceLoad, load_key, new_instance_id
from broker.streams import AGENT_LOAD_BUCKET, Stream
from broker.telemetry import setup, tracing

log = structlog.get_logger(__name__)

_STATS_WINDOW = 30.0
_FETCH_TIMEOUT = 1.0
#: Seconds before a message whose failure could not be recorded runs again.
_FAILURE_NOT_RECORDED_DELAY = 1.0


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


def to_reply(result: Any) -> Reply:
    """What a handler returned, as reply bytes and a content type; ``TypeError`` when it
    is none of those and cannot be serialised as JSON (a dict with int keys, say)."""
    if isinstance(result, Reply):
        return result
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


@dataclass
class _Window:
    """Completions of the last ``_STATS_WINDOW`` seconds: (monotonic time, ms, ok)."""

    done: deque[tuple[float, float, bool]] = field(default_factory=deque)

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
        return self.summarize(self.snapshot())

    @staticmethod
    def summarize(done: list[tuple[float, float, bool]]) -> tuple[float, float, float, float]:
        """(qps, p50 ms, p99 ms, error rate) of a :meth:`snapshot` (any thread)."""
        if not done:
            return 0.0, 0.0, 0.0, 0.0
        latencies = sorted(ms for _, ms, _ in done)
        n = len(latencies)
        errors = sum(1 for _, _, ok in done if not ok)
        return (
            n / _STATS_WINDOW,
            latencies[(n - 1) // 2],
            latencies[min(n - 1, round(0.99 * (n - 1)))],
            errors / n,
        )


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
        instance: str | None = None,
        register: bool = False,
        load_source: LoadSource | None = None,
        connect_options: ConnectOptions | None = None,
    ) -> None:
        """``connect_options`` adds NATS TLS and credentials, e.g.
        ``connect_options(Settings(), name="my-agent")`` from :mod:`broker.natsconn` reads
        ``BROKER_NATS_TLS_*``, ``BROKER_NATS_USER`` … ; ``nats_url`` still names the servers."""
        self.manifest = (
            manifest if isinstance(manifest, AgentManifest) else validate_manifest(dict(manifest))
        )
        self.name = self.manifest.name
        self.nats_url = nats_url
        self.tenant = tenant
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.ack_wait = ack_wait
        self.drain_timeout = drain_timeout
        self.instance = instance or new_instance_id()
        self.register = register
        self.load_source = load_source or NvidiaSmi()
        self.connect_options = connect_options
        self._handler: Handler | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._closing = False  # our own close: a disconnect then is the plan, not news
        # The inbox consumer's own ack_wait, which the keep-alive is timed on: an existing
        # consumer keeps the one it was made with, whatever ``ack_wait`` this instance asks.
        self._consumer_ack_wait = ack_wait
        self._free = concurrency  # handler slots not in use
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._window = _Window()
        self.handled = 0
        self.failed = 0

    def handler(self, fn: Handler) -> Handler:
        """Decorator: the async function that handles each request."""
        self._handler = fn
        return fn

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def consumer_name(self) -> str:
        """The durable consumer this agent's instances share. ``~`` is in neither a tenant's
        nor an agent's name, so two tenants' agents of one name never share it."""
        return f"agent-{self.tenant}~{self.name}"

    async def _inbox_consumer(self, js: JetStreamContext, inbox: str) -> str:
        """The consumer to bind: :attr:`consumer_name`, or the ``agent-<name>`` an earlier
        version named without the tenant when it reads this same inbox (a new consumer would
        deliver the inbox's whole history again). A consumer of that name on another inbox
        is refused rather than shared."""
        for name in (self.consumer_name, f"agent-{self.name}"):
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

        NATS going away is waited out, however long; :class:`~broker.errors.Unavailable`
        when the connection closes for good before ``stop`` is set (after draining)."""
        if self._handler is None:
            raise RuntimeError("no handler: decorate an async function with @agent.handler")
        setup("agent")
        await self._connect()
        assert self._js is not None
        subject = inbox_subject(self.tenant, self.name)
        try:
            durable = await self._inbox_consumer(self._js, subject)
            sub = await self._js.pull_subscribe(
                subject,
                durable=durable,
                stream=Stream.ROUTES,
                config=ConsumerConfig(
                    durable_name=durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait,
                    deliver_policy=DeliverPolicy.ALL,
                    filter_subject=subject,
                    max_ack_pending=max(1000, self.concurrency * 16),
                ),
            )
            await self._read_ack_wait(sub, durable)
        except BaseException:
            self._closing = True
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
            raise
        await self._heartbeat()
        beat = asyncio.create_task(self._heartbeat_loop(stop), name="agent-heartbeat")
        log.info("agent_started", agent=self.name, instance=self.instance, tenant=self.tenant)
        try:
            await self._consume(sub, stop)
        finally:
            await self._drain()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await self._leave()
            log.info("agent_stopped", agent=self.name, handled=self.handled, failed=self.failed)

    async def _read_ack_wait(self, sub: Any, durable: str) -> None:
        """Time the keep-alive on the bound consumer's ack_wait: nats-py binds to an existing
        consumer as it is, so a new ``ack_wait`` does not reach it. It is not updated either:
        the instances sharing it would each keep it alive on a different clock."""
        info = await sub.consumer_info()
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

    async def _connect(self) -> None:
        options = ConnectOptions(**(self.connect_options or {}))
        options["servers"] = self.nats_url.split(",")
        options["name"] = f"agent-{self.name}-{self.instance}"

        async def on_error(e: Exception) -> None:
            error = explain_connect_error(e, options)
            if self._nc is not None and self._nc.is_reconnecting:  # each failed attempt
                log.debug("agent_nats_reconnect_failed", error=error)
            else:
                log.warning("agent_nats_error", error=error)

        self._nc = await open_client(
            **options,
            **RECONNECT_FOREVER,  # wait out an outage of any length, as the broker does
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=on_error,
        )
        self._js = self._nc.jetstream(timeout=10.0)
        self._kv = await self._js.key_value(AGENT_LOAD_BUCKET)
        if self.register:
            from broker.envelope import Tenant
            from broker.errors import Conflict
            from broker.publisher import Publisher
            from broker.registry.commands import put_agent

            publisher = Publisher(
                self.nats_url.split(","),
                name=f"agent-{self.name}-register",
                connect_options=self.connect_options,
            )
            publisher.start()
            try:
                await publisher.wait_connected(10.0)
                for attempt in range(3):  # instances starting together race; the loser re-reads
                    try:
                        await put_agent(publisher, Tenant(self.tenant), self.manifest)
                        break
                    except Conflict:
                        if attempt == 2:
                            raise
            finally:
                await publisher.close()

    async def _consume(self, sub: Any, stop: asyncio.Event) -> None:
        """Fetch and start handlers until ``stop`` is set. A connection that closed (it
        never gives up reconnecting, so something closed it for good) raises: returning
        would look like a clean stop to whoever supervises the agent."""
        while not stop.is_set():
            if self._nc is None or self._nc.is_closed:
                raise Unavailable(
                    "the NATS connection closed while the agent was running; "
                    "it stopped consuming its inbox"
                )
            if self._free == 0:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_FETCH_TIMEOUT):
                        await self._slot_freed.wait()
                continue
            try:
                batch: list[Msg] = await sub.fetch(self._free, timeout=_FETCH_TIMEOUT)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                await asyncio.sleep(0.1)  # closing: the check above raises once it closed
                continue
            except Exception as e:  # a NATS hiccup: try again shortly
                log.warning("agent_fetch_failed", error=repr(e)[:200])
                await asyncio.sleep(0.5)
                continue
            for message in batch:
                self._free -= 1
                task = asyncio.create_task(self._handle(message))
                self._tasks.add(task)
                task.add_done_callback(self._done)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("agent_nats_disconnected", agent=self.name, instance=self.instance)

    async def _on_reconnected(self) -> None:
        log.info("agent_nats_reconnected", agent=self.name, instance=self.instance)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._free += 1
        self._slot_freed.set()

    async def _handle(self, message: Msg) -> None:
        try:
            await self._handle_one(message)
        except asyncio.CancelledError:
            # Stopped while it ran (past drain_timeout): handed back now, for another
            # instance to run, rather than after the consumer's ack_wait.
            with contextlib.suppress(Exception):
                await message.nak()
            raise

    async def _handle_one(self, message: Msg) -> None:
        headers = dict(message.headers or {})
        try:
            route = RouteDecided.from_headers(headers)
        except RouteEventUnreadable as e:
            log.warning("agent_message_unreadable", error=e.message)
            await message.term()
            return
        deadline = deadline_of(headers)
        request = Request(
            message.data,
            headers.get(CONTENT_TYPE, DEFAULT_CONTENT_TYPE),
            headers,
            route,
            deadline,
        )
        if deadline is not None and time.time() >= deadline:
            recorded = await self._failed(
                request, FailureReason.EXPIRED, "the deadline passed before it ran"
            )
            await self._settle(message, recorded)
            return
        assert self._handler is not None
        started = time.monotonic()
        keepalive = asyncio.create_task(self._keep_alive(message))
        span = tracing.span(
            f"agent {self.name}", parent_headers=headers, kind=tracing.SpanKind.CONSUMER
        )
        recorded = True
        with span:  # the reply (or the failure) is a child of the handler's span
            deadline_timer = asyncio.timeout(request.time_left())
            try:
                async with deadline_timer:
                    result = await self._handler(request)
                reply = to_reply(result)  # a result that cannot be serialised fails the same
            except Exception as e:  # the handler's own failure: report it, keep serving
                self._window.add((time.monotonic() - started) * 1000, False)
                if isinstance(e, TimeoutError) and deadline_timer.expired():
                    reason, why = FailureReason.TIMEOUT, "cancelled at the deadline"
                else:  # a handler's own TimeoutError (a call of its own timed out) included
                    log.warning("agent_handler_failed", agent=self.name, error=repr(e)[:300])
                    reason, why = FailureReason.ERROR, repr(e)
                recorded = await self._failed(request, reason, why)
            else:
                latency_ms = (time.monotonic() - started) * 1000
                unsent = await self._reply(request, reply)
                if unsent is None:
                    self._window.add(latency_ms, True)
                    self.handled += 1
                else:  # the caller would wait in vain: the router retries or dead-letters it
                    self._window.add(latency_ms, False)
                    log.warning("agent_reply_not_sent", agent=self.name, error=unsent)
                    recorded = await self._failed(request, FailureReason.ERROR, unsent)
            finally:
                keepalive.cancel()
        await self._settle(message, recorded)

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

    async def _reply(self, request: Request, reply: Reply) -> str | None:
        """Send the reply to the waiting caller; why it cannot be sent (it is over the
        server's ``max_payload``), or ``None``: sent, or nobody waits for it."""
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
        return None

    async def _failed(self, request: Request, reason: FailureReason, message: str) -> bool:
        """Record the failure in ``ROUTES`` for the routers; ``False`` when that failed."""
        self.failed += 1
        if request.mirror or self._js is None:
            return True
        failure = RouteFailed(request.route, reason, message, self.instance)
        headers = failure.to_headers(request.headers)
        tracing.inject(headers)
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
        qps, p50, p99, error_rate = _Window.summarize(completed)
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

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
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

    async def _drain(self) -> None:
        if self._tasks:
            log.info("agent_draining", in_flight=len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_timeout)
            for task in pending:
                task.cancel()
            if pending:  # each hands its message back (a nak) before the connection closes
                await asyncio.wait(pending, timeout=2.0)

    async def _leave(self) -> None:
        self._closing = True
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(load_key(self.tenant, self.name, self.instance))
        if self._nc is not None:  # handlers are done; nothing left to flush but the delete
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()
