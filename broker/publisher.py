"""The append path: one NATS connection per process and JetStream publishes with acks.

:class:`Publisher` owns the connection (connecting in the background, so a process can start
before NATS is reachable and recover when it returns), appends :class:`~broker.envelope.Outbound`
messages with pipelined acks, and maps every nats-py error to the broker's error tree once.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker.envelope import NATS_EXPECTED_LAST_SUBJECT_SEQ, NATS_MSG_ID, REQUEST_DIGEST, Outbound
from broker.errors import (
    BrokerError,
    IdempotencyKeyReused,
    PayloadTooLarge,
    PublishTimeout,
    SequenceConflict,
    Unavailable,
)
from broker.natsconn import (
    RECONNECT_FOREVER,
    ConnectOptions,
    LogThrottle,
    cancel_until_done,
    close_within,
    explain_connect_error,
    get_stored,
    open_client,
    subscribe_detached,
)
from broker.telemetry import metrics, tracing

log = structlog.get_logger(__name__)

#: JetStream API error codes the broker answers specifically.
_JS_WRONG_LAST_SEQUENCE = 10071
_JS_MESSAGE_TOO_LARGE = 10054
_JS_HEADERS_TOO_LARGE = 10097
#: "duplicate message id is in process": a publish with the same Nats-Msg-Id is still being
#: proposed (a retry overtook its original, e.g. around a leader change). Not a refusal: the
#: original may yet be stored, and a retry with the same key gets its ack.
_JS_DUPLICATE_IN_PROCESS = 10158
_DRAIN_SECONDS = 2.0
#: One ``nats_error`` line per error text this often while NATS is away.
_ERROR_LOG_EVERY = 10.0
_JS_UNAVAILABLE_CODES = frozenset({10008, 10023, 10039, 10077})  # not ready / no leader / resources
#: Storage or memory used up: the account's JetStream limits (10002, answered with status
#: 400), or the server's storage or memory (10047, 10028, status 500). Each passes once
#: limits drop old messages or an operator frees space; until then the write was not
#: stored, and the same request (same key) may be sent again. Not a bug (500) nor a
#: refusal of this message: a router that took it for one dropped routed messages for good.
_JS_FULL_CODES = frozenset({10002, 10028, 10047})


@dataclass(frozen=True, slots=True)
class PublishAck:
    """Where an appended message landed. ``duplicate`` means an earlier publish with the
    same idempotency key already stored it, at ``seq``."""

    stream: str
    seq: int
    duplicate: bool

    def to_dict(self) -> dict[str, object]:
        return {"stream": self.stream, "seq": self.seq, "duplicate": self.duplicate}


#: What a caller told "may be stored" can do: a retry with the key is answered as one.
_RETRY = "retry with the same Idempotency-Key (a request sent without one may be stored twice)"


def jetstream_error(status: int, err_code: int, description: str, subject: str) -> BrokerError:
    """The broker error for a JetStream API error reply (``{"code", "err_code", ...}``)."""
    if err_code == _JS_WRONG_LAST_SEQUENCE:
        return SequenceConflict(
            f"subject {subject} is not at the expected last sequence: {description}"
        )
    if err_code == _JS_MESSAGE_TOO_LARGE:
        return PayloadTooLarge(f"message is larger than the stream allows: {description}")
    if err_code == _JS_HEADERS_TOO_LARGE:
        return PayloadTooLarge(f"the message's headers are larger than NATS allows: {description}")
    if err_code == _JS_DUPLICATE_IN_PROCESS:
        return Unavailable(
            "a publish with the same Idempotency-Key is still being stored: retry with the same key"
        )
    if err_code in _JS_FULL_CODES:
        return Unavailable(f"JetStream storage is full, nothing was stored: {description}")
    if err_code in _JS_UNAVAILABLE_CODES or status == 503:
        return Unavailable(f"JetStream cannot take the write now: {description}")
    return BrokerError(f"JetStream refused the write: {description} (code {err_code})")


def map_nats_error(exc: BaseException, *, subject: str = "") -> BrokerError:
    """The broker error for a failed JetStream publish (the one place nats-py errors map)."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, nats.js.errors.APIError):
        return jetstream_error(exc.code or 0, exc.err_code or 0, exc.description or "", subject)
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return Unavailable(f"no JetStream stream answered for {subject}")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PayloadTooLarge("message is larger than the NATS server's max_payload")
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return PublishTimeout(
            f"no acknowledgement from JetStream in time; the message may be stored: {_RETRY}"
        )
    if isinstance(
        exc,
        nats.errors.ConnectionClosedError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.OutboundBufferLimitError
        | nats.errors.StaleConnectionError
        | nats.js.errors.TooManyStalledMsgsError
        | ConnectionError,
    ):
        return Unavailable(f"NATS connection unavailable: {type(exc).__name__}")
    return BrokerError(f"unexpected publish failure: {type(exc).__name__}")


class Publisher:
    """A process's NATS connection and JetStream append path."""

    def __init__(
        self,
        servers: list[str],
        *,
        name: str = "broker",
        publish_timeout: float = 5.0,
        connect_timeout: float | None = None,
        max_pending: int = 100_000,
        connect_options: ConnectOptions | None = None,
    ) -> None:
        """``connect_options`` (from :func:`broker.natsconn.connect_options`) adds TLS and
        credentials; ``servers``, ``name`` and ``connect_timeout`` given here take precedence
        (the timeout defaults to the options' or 5 s)."""
        self._servers = servers
        self._connect_options = ConnectOptions(connect_timeout=5.0)
        self._connect_options.update(connect_options or {})
        self._connect_options["servers"] = servers
        self._connect_options["name"] = name
        if connect_timeout is not None:
            self._connect_options["connect_timeout"] = connect_timeout
        self._name = name
        self._publish_timeout = publish_timeout
        self._max_pending = max_pending
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._connector: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._reply_prefix: str | None = None
        self._reply_lock = asyncio.Lock()  # one reply subscription, however many first submits
        self._pending: dict[str, _Pending] = {}
        self._counter = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._on_connected: list[Callable[[], Awaitable[None]]] = []
        self._closing = False  # close() was called: a disconnect now is the plan, not news
        self._error_log = LogThrottle(_ERROR_LOG_EVERY)
        self._hook_retries: set[asyncio.Task[None]] = set()
        self._on_reconnected_hooks: list[Callable[[], Awaitable[None]]] = []

    # --- connection lifecycle ------------------------------------------------------

    def on_connected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the first connection is made (register before :meth:`start`)."""
        self._on_connected.append(callback)

    def on_reconnected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after every reconnection (to the same or another server)."""
        self._on_reconnected_hooks.append(callback)

    def start(self) -> None:
        """Start connecting in the background; :meth:`wait_connected` waits for it."""
        if self._connector is None:
            self._connector = asyncio.create_task(self._connect_loop(), name="nats-connect")

    async def _connect_loop(self) -> None:
        delay = 0.1
        while True:
            try:
                nc = await open_client(
                    **self._connect_options,
                    **RECONNECT_FOREVER,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )
            except Exception as e:  # every connect failure is retried: NATS may come later
                error = explain_connect_error(e, self._connect_options)
                log.warning("nats_connect_failed", servers=self._servers, error=error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._nc = nc
            self._js = nc.jetstream(timeout=self._publish_timeout)
            self._connected.set()
            log.info(
                "nats_connected",
                server=str(nc.connected_url.netloc if nc.connected_url else ""),
                server_version=self.server_version,
            )
            for callback in self._on_connected:
                try:
                    await callback()
                except Exception:  # a failing hook must not stop the others or the publisher
                    log.exception("on_connected_hook_failed")
                    retry = asyncio.create_task(self._retry_hook(callback))
                    self._hook_retries.add(retry)
                    retry.add_done_callback(self._hook_retries.discard)
            return

    async def _retry_hook(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run a hook that failed (JetStream without quorum at connect, say) again, with a
        delay doubling to 30 s, until it succeeds or the publisher closes: run once, its
        failure left the process unready for good."""
        delay = 1.0
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await callback()
            except Exception as e:
                log.warning("on_connected_hook_failed_again", error=repr(e)[:200], retry_s=delay)
                delay = min(delay * 2, 30.0)
            else:
                log.info("on_connected_hook_succeeded", hook=getattr(callback, "__name__", "?"))
                return

    async def _on_disconnected(self) -> None:
        if self._closing:
            log.debug("nats_disconnected", closing=True)
        else:
            log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        log.info("nats_reconnected", server_version=self.server_version)
        for callback in self._on_reconnected_hooks:
            try:
                await callback()
            except Exception:
                log.exception("on_reconnected_hook_failed")

    async def _on_error(self, e: Exception) -> None:
        # Each failed attempt while NATS is away (every 0.25 s): one line per error text
        # every 10 s, with how many were held back.
        error = explain_connect_error(e, self._connect_options)
        if (repeated := self._error_log.admit(error)) is not None:
            log.warning("nats_error", error=error, repeated=repeated)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the first connection is made; ``False`` on timeout."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Flush what is pending and close; stop trying to connect.

        New submits are refused from the start. Publishes already sent get their acks for
        up to :data:`_DRAIN_SECONDS`; any still without one then fails with
        :class:`PublishTimeout` (it may be stored: retry with the same key), never left
        waiting for good. The connection is then closed, its socket cut if the server does
        not let it close within seconds (:func:`~broker.natsconn.close_within`)."""
        self._closing = True
        for task in (self._connector, *self._hook_retries):
            await _cancelled(task)
        nc = self._nc
        if nc is not None and nc.is_connected and self._pending:
            waiting = {pending.future for pending in self._pending.values()}
            await asyncio.wait(waiting, timeout=_DRAIN_SECONDS)
        await _cancelled(self._sweeper)
        if nc is not None and not nc.is_closed:
            await close_within(nc)
        self._give_up_pending()

    def _give_up_pending(self) -> None:
        """Fail every publish still awaiting its ack: nothing will answer it now."""
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(
                    PublishTimeout(
                        "the broker closed before JetStream acknowledged the message; it may "
                        f"be stored: {_RETRY}"
                    )
                )

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context; :class:`Unavailable` until connected."""
        if self._js is None:
            raise Unavailable("not connected to NATS yet")
        return self._js

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise Unavailable("not connected to NATS yet")
        return self._nc

    @property
    def server_version(self) -> str | None:
        """Version of the connected NATS server, from its INFO."""
        if self._nc is None or not self._nc.is_connected:
            return None
        version = self._nc._server_info.get("version")
        return str(version) if version else None

    @property
    def max_payload(self) -> int:
        return self._nc.max_payload if self._nc is not None else 0

    # --- the append path -------------------------------------------------------------
    #
    # Acks are matched to publishes through one wildcard reply subscription and a dict of
    # pending futures keyed by a counter, with one sweeper enforcing the ack timeout: no
    # timer, task or random token per message (nats-py's publish_async makes all three, and
    # they were a third of the ingress worker's profile).

    async def _ensure_reply_subscription(self, nc: NatsClient) -> str:
        async with self._reply_lock:
            if self._reply_prefix is None:
                prefix = f"{nc.new_inbox()}."
                # Both live as long as the connection: not in the context (the trace) of
                # the request that happens to publish first.
                await subscribe_detached(nc, f"{prefix}*", self._on_ack)
                self._reply_prefix = prefix
                self._sweeper = asyncio.create_task(
                    self._sweep(), name="publish-ack-sweeper", context=contextvars.Context()
                )
            return self._reply_prefix

    async def submit(
        self, out: Outbound, span: tracing.Timing | None = None
    ) -> asyncio.Future[PublishAck]:
        """Send one message and return a future of its ack, without waiting for it.

        Many submits in a row share the connection's round trips (pipelined acks). The
        future fails with a :class:`BrokerError` (e.g. :class:`PublishTimeout`). The stored
        message continues the trace of ``span`` (the ``append`` span), else of the span
        running now.
        """
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise Unavailable("NATS is not connected")
        if self._closing:
            raise Unavailable("the broker is shutting down")
        if len(self._pending) >= self._max_pending:
            raise Unavailable(f"{len(self._pending)} publishes already await their ack")
        prefix = self._reply_prefix or await self._ensure_reply_subscription(nc)
        tracing.inject(out.headers, span)  # the stored message continues this trace
        self._counter += 1
        token = str(self._counter)
        # The connect task runs on this loop, where the client lives; asking it costs no
        # getpid() system call, which asyncio.get_running_loop() makes on Python 3.11.
        connector = self._connector
        loop = connector.get_loop() if connector is not None else asyncio.get_running_loop()
        future: asyncio.Future[PublishAck] = loop.create_future()
        self._pending[token] = _Pending(
            future, time.monotonic() + self._publish_timeout, out.subject, len(out.payload)
        )
        try:
            await nc.publish(out.subject, out.payload, reply=prefix + token, headers=out.headers)
        except Exception as e:
            self._pending.pop(token, None)
            raise map_nats_error(e, subject=out.subject) from e
        return future

    async def _on_ack(self, msg: Msg) -> None:
        assert self._reply_prefix is not None
        pending = self._pending.pop(msg.subject[len(self._reply_prefix) :], None)
        if pending is None or pending.future.done():
            return
        seconds = time.monotonic() - pending.deadline + self._publish_timeout
        metrics.observe_ack(seconds, _settle(pending, msg), pending.size)

    async def _sweep(self) -> None:
        """Fail publishes whose ack did not come within the publish timeout.

        Each one is observed in the ack histogram at the time it was given up, and counted
        as a timeout: its ack, if it ever comes, finds nothing pending and is dropped, so
        without that the slowest appends (all of them, while JetStream stalls) would be
        missing from the latency the alerts read. Also when the caller has gone: JetStream
        was just as slow."""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            # Insertion order is deadline order: every publish gets the same timeout.
            while self._pending:
                token, pending = next(iter(self._pending.items()))
                if pending.deadline > now:
                    break
                del self._pending[token]
                metrics.ack_timed_out(now - pending.deadline + self._publish_timeout)
                if not pending.future.done():
                    pending.future.set_exception(
                        PublishTimeout(
                            "no acknowledgement from JetStream in time; the message may be "
                            f"stored: {_RETRY}"
                        )
                    )

    async def publish(self, out: Outbound) -> PublishAck:
        """Append one message and wait for its ack (in an ``append`` span when tracing)."""
        # Not made current: only the stored message's headers continue it, and two
        # context-variable writes fewer are about a tenth of a sampled publish's recording.
        timing = tracing.child_timing("append", tracing.SpanKind.PRODUCER, current=False)
        if timing is None:  # tracing off, or this request is not sampled
            return await self._append(out)
        try:
            ack = await self._append(out, timing)
        except BaseException as e:
            tracing.end_timing(timing, error=e)
            raise
        tracing.end_timing(
            timing,
            (
                "messaging.system",
                "nats",
                "messaging.destination.name",
                out.subject,
                "messaging.nats.stream",
                ack.stream,
                "messaging.nats.stream_sequence",
                ack.seq,
                "messaging.nats.duplicate",
                ack.duplicate,
            ),
        )
        return ack

    async def _append(self, out: Outbound, span: tracing.Timing | None = None) -> PublishAck:
        return await self.settle(out, await self.submit(out, span))

    async def settle(
        self, out: Outbound, pending: Awaitable[PublishAck], *, verify: bool = True
    ) -> PublishAck:
        """The ack of a :meth:`submit`; a sequence conflict with ``out`` itself (see
        :meth:`stored_already`) answers the stored copy, as :meth:`publish` does. A duplicate
        is checked to be this request (:meth:`same_request`) unless ``verify`` is false
        (the caller checks many at once)."""
        try:
            ack = await pending
        except SequenceConflict:
            stored = await self.stored_already(out)
            if stored is None:
                raise
            ack = stored
        return await self.same_request(out, ack) if ack.duplicate and verify else ack

    async def same_request(self, out: Outbound, ack: PublishAck) -> PublishAck:
        """``ack``, a duplicate's, once the message stored under the key is known to be
        ``out`` again: :class:`IdempotencyKeyReused` when its request digest differs. A
        message stored without one (by an older broker, or straight through NATS), or gone
        since (limits, a purge), cannot be told apart and is taken for the retry it most
        likely is. One more request to JetStream, on duplicates only."""
        digest = out.headers.get(REQUEST_DIGEST)
        if digest is None or self._js is None:
            return ack
        try:
            stored = await get_stored(self._js, ack.stream, ack.seq)
        except nats.js.errors.NotFoundError:
            return ack
        except Exception as e:
            raise Unavailable(
                f"the message stored under this Idempotency-Key (seq {ack.seq}) could not be "
                f"read to compare it with this one ({type(e).__name__}): retry with the same key"
            ) from e
        earlier = (stored.headers or {}).get(REQUEST_DIGEST)
        if earlier is not None and earlier != digest:
            raise IdempotencyKeyReused(
                f"this Idempotency-Key already stored a different request (seq {ack.seq} of "
                f"{ack.stream}: another subject, Content-Type, schema id or body); nothing was "
                "stored: a new request needs a new key"
            )
        return ack

    async def stored_already(self, out: Outbound) -> PublishAck | None:
        """After a sequence conflict: ``out`` itself, if it is the subject's first message
        after the expected sequence (same ``Nats-Msg-Id``), where the condition put it.
        JetStream checks the expected sequence before duplicates, so a conditional publish
        retried after its answer was lost (stored, the ack gone) conflicted with itself; it
        is its own duplicate, even when later records of its batch followed it."""
        msg_id = out.headers.get(NATS_MSG_ID)
        expected = out.headers.get(NATS_EXPECTED_LAST_SUBJECT_SEQ)
        if not msg_id or expected is None or self._js is None:
            return None
        try:
            stream = await self._js.find_stream_name_by_subject(out.subject)
            # the leader's answer: the subject's first message after the expected sequence
            first = await get_stored(
                self._js, stream, int(expected) + 1, subject=out.subject, following=True
            )
        except Exception:
            return None
        if (first.headers or {}).get(NATS_MSG_ID) != msg_id or first.seq is None:
            return None
        return PublishAck(stream, first.seq, True)


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has stopped (again and again: see
    :func:`~broker.natsconn.cancel_until_done`); a task that failed rather than stopped
    raises its error."""
    if task is None:
        return
    await cancel_until_done(task)
    if not task.cancelled():
        task.result()


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[PublishAck]
    deadline: float
    subject: str
    size: int


def read_ack(msg: Msg, subject: str) -> PublishAck | BrokerError:
    """JetStream's answer to a publish on ``subject``: its ack, or the error it stands for
    (no stream answered, an API error, an answer that cannot be read)."""
    if msg.headers and msg.headers.get("Status") == "503":
        return Unavailable(f"no JetStream stream answered for {subject}")
    try:
        reply = orjson.loads(msg.data)
        if "error" in reply:
            error = reply["error"]
            return jetstream_error(
                int(error.get("code", 0)),
                int(error.get("err_code", 0)),
                str(error.get("description", "")),
                subject,
            )
        return PublishAck(reply["stream"], reply["seq"], reply.get("duplicate", False))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        return BrokerError(f"unreadable JetStream ack: {e!r}")


def _settle(pending: _Pending, msg: Msg) -> str | None:
    """Resolve ``pending``'s future from JetStream's answer; the stream when the answer says
    a message was appended (not for a duplicate or an error)."""
    answer = read_ack(msg, pending.subject)
    if isinstance(answer, BrokerError):
        pending.future.set_exception(answer)
        return None
    pending.future.set_result(answer)
    return None if answer.duplicate else answer.stream
