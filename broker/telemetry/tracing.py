"""W3C trace context across every hop, exported with the OpenTelemetry SDK's exporters.

One trace follows a message: the ingress continues the client's ``traceparent`` (or starts
a trace), the append stores the context in the message's NATS headers, and every later hop
(router, projections, agent handler, reply) continues it from those headers. The API is
three calls, safe to use anywhere, and free when nothing is recorded::

    from broker.telemetry import tracing

    with tracing.span("route", parent_headers=msg.headers, kind=SpanKind.CONSUMER,
                      attributes={"messaging.message.id": seq}) as s:
        headers = {...}
        tracing.inject(headers)          # the next hop's parent is this span
        s.set_attribute("broker.route.agent", agent)

``extract(headers)`` returns the :class:`TraceContext` a message carries (or ``None``).

**Off by default.** Until :func:`configure` turns tracing on, :func:`span` returns one shared
do-nothing context manager and :func:`inject` returns at once (a module flag is the only
thing they read); the same holds whenever there is nothing to record.
:func:`configure_from_env` turns it on when ``OTEL_TRACES_EXPORTER`` names an exporter
(``otlp``, ``console``) or ``BROKER_TRACING=true`` (then ``otlp``);
``OTEL_SDK_DISABLED=true`` wins. The OTLP exporter (HTTP/protobuf) reads the standard
``OTEL_EXPORTER_OTLP_*`` variables, the batching (:mod:`broker.telemetry._export`)
``OTEL_BSP_*``.

**Traces start at the edge, and sampling happens before the SDK.** Only the HTTP ingress
starts traces (``start_trace=True``); every other span continues the trace of its message
or of the span running around it, and does nothing without one. ``OTEL_TRACES_SAMPLER``
(default ``parentbased_always_on``) and ``OTEL_TRACES_SAMPLER_ARG`` are applied here, before
any SDK object exists: a request that is not sampled creates nothing and sets nothing (a
random number and a comparison), its messages carry no trace context of the broker's (a
client's own ``traceparent`` is still passed through), and so no later hop records
anything for it either. Root decisions use the trace id's low 64 bits, like the SDK's
``TraceIdRatioBased``; a parent's decision is kept (``parentbased_*``).

**A sampled span is cheap too.** It is a :class:`~broker.telemetry._spans.RecordedSpan`
(a few slots, not the SDK's span with its lock, sampler run and processors); when it ends
it is queued, and the export thread encodes whole batches to OTLP itself
(:mod:`broker.telemetry._otlp`), several times faster than the exporter's own encoder.
Span processors and other exporters get the SDK's ``ReadableSpan``. In agents and workers
it is also made current in OpenTelemetry's own context, so a handler or projection that uses
the OpenTelemetry API directly nests its spans under the broker's; the ingress and routers
run only the broker's code and skip that.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from broker.codecs._accelerator import accelerator
from broker.telemetry._spans import RecordedSpan, exception_event
from broker.telemetry.w3c import TRACEPARENT_FORMAT, bounded_tracestate, parse_traceparent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter

    from broker.telemetry._export import SpanPipeline

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "UNRECORDED",
    "HeaderSource",
    "SpanKind",
    "Status",
    "StatusCode",
    "Timing",
    "TraceContext",
    "batch_spans",
    "child_timing",
    "configure",
    "configure_from_env",
    "current",
    "disable",
    "edge_timing",
    "enabled",
    "end_timing",
    "extract",
    "force_flush",
    "inject",
    "span",
]

log = structlog.get_logger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The W3C trace context's headers, as the broker stores them in NATS.
W3C_HEADERS = frozenset({TRACEPARENT, TRACESTATE})
#: Where a traceparent may be found, in order, each with its tracestate: W3C (HTTP, NATS as
#: the broker stores it), CloudEvents (binary mode, or a structured event's attribute as the
#: broker stores it), a NATS header another client wrote with a capital letter. The first
#: valid one is followed: one that is invalid counts as absent (W3C), with its tracestate.
_KEYS = (
    (TRACEPARENT, TRACESTATE),
    ("ce-traceparent", "ce-tracestate"),
    ("Traceparent", "Tracestate"),
)
Attributes = Mapping[str, AttributeValue]
_SamplerName = Literal["always_on", "always_off", "traceidratio"]


class HeaderSource(Protocol):
    """Headers to read a trace context from: a dict, NATS message headers, RSGI headers."""

    def get(self, key: str, /) -> Any: ...


class TraceContext(NamedTuple):
    """A position in a trace: what a ``traceparent`` header says, plus what records the span
    when this process does (a :class:`Span`, or a :class:`Timing`); ``None`` for a parent
    from another process. (A tuple: the unsampled path makes one per span.)"""

    trace_id: int
    span_id: int
    sampled: bool
    tracestate: str | None = None
    span: Span | Timing | None = None

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        return f"{self.span_id:016x}"

    @property
    def traceparent(self) -> str:
        return _TRACEPARENT % (self.trace_id, self.span_id, "01" if self.sampled else "00")


#: ``%``-formatting: about a third faster than the f-string with format specs (in a tight
#: loop), and a sampled publish writes one per message.
_TRACEPARENT = TRACEPARENT_FORMAT


@dataclass
class _Config:
    enabled: bool = False
    pipeline: SpanPipeline | None = None
    parent_based: bool = True
    bound: int = 2**64  # a root is sampled when its trace id's low 64 bits are below this
    component: str = ""
    otel_context: bool = True  # recorded spans are current in OpenTelemetry's context too


#: Processes that run no one else's code inside a span: their spans are not made current in
#: OpenTelemetry's own context (a context copy and two context-variable writes per span,
#: ~15 % of a sampled span's recording). Agents and workers run handlers and projections,
#: which may use the OpenTelemetry API or its instrumentations.
_OWN_CODE_ONLY = frozenset({"ingress", "router"})


_config = _Config()
_LOW_64 = 2**64 - 1
_getrandbits = random.getrandbits
_time_ns = time.time_ns
_tuple_new = tuple.__new__
_current: ContextVar[TraceContext | None] = ContextVar("broker_trace_context", default=None)


# --- the API -----------------------------------------------------------------------------


def enabled() -> bool:
    """Whether this process records traces (:func:`configure` was called)."""
    return _config.enabled


def current() -> TraceContext | None:
    """The context of the recorded span running now, if any."""
    return _current.get() if _config.enabled else None


def extract(headers: HeaderSource | None) -> TraceContext | None:
    """The trace context in ``traceparent``/``tracestate`` (HTTP, NATS or CloudEvents
    headers), or ``None`` when there is none that is valid. A ``traceparent`` that is
    malformed, or a request's sent more than once (the stored message leaves both out), is
    ignored as if absent, with its ``tracestate`` (W3C): a binary-mode CloudEvent's
    ``ce-traceparent`` beside it is then followed, as the later hops reading the stored
    message follow it, else the trace restarts."""
    if not headers:
        return None
    for traceparent, tracestate in _KEYS:
        value = headers.get(traceparent)
        if not value:
            continue
        get_all = getattr(headers, "get_all", None)  # granian's headers; a dict has none
        if get_all is not None and len(get_all(traceparent)) != 1:
            continue
        parsed = parse_traceparent(value)
        if parsed is None:
            continue
        # A request's header sent more than once is one list (granian's headers read them all).
        state = get_all(tracestate) if get_all is not None else headers.get(tracestate)
        trace_id, span_id, sampled = parsed
        return TraceContext(
            trace_id, span_id, sampled, bounded_tracestate(state) if state else None
        )
    return None


def _inject(headers: MutableMapping[str, str], span: Timing | None = None) -> None:
    """Write the ``traceparent`` (and ``tracestate``) of ``span``, a :class:`Timing` (one
    started with ``current=False``), or else of the span running now into ``headers``, so
    the next hop continues this trace. A ``tracestate`` already in ``headers`` is replaced,
    or removed when this context has none: W3C pairs a ``tracestate`` with its
    ``traceparent``. Does nothing when tracing is off or no span is running (headers already
    there, e.g. passed through from a client, are then left alone)."""
    if not _config.enabled:
        return
    if span is not None:
        if not isinstance(span, Timing) and not (_CTiming and isinstance(span, _CTiming)):
            raise TypeError("inject's span must be a Timing or None")
        ctx: TraceContext | None = TraceContext(span.trace_id, span.span_id, True, span.tracestate)
    else:
        ctx = _current.get()
    if ctx is None:
        return
    # TraceContext.traceparent written out: the property is a Python frame more.
    headers[TRACEPARENT] = _TRACEPARENT % (ctx[0], ctx[1], "01" if ctx[2] else "00")
    if ctx[3]:
        headers[TRACESTATE] = ctx[3]
    elif TRACESTATE in headers:  # another context's (headers copied from a request or message)
        del headers[TRACESTATE]


def span(
    name: str,
    *,
    parent_headers: HeaderSource | None = None,
    attributes: Attributes | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    start_trace: bool = False,
) -> contextlib.AbstractContextManager[Span]:
    """A span around a block, continuing the trace in ``parent_headers`` (a message's or a
    request's headers) or else the span running now. Yields the SDK span (a do-nothing one
    when nothing is recorded); an exception leaving the block marks the span failed.

    Spans continue traces; only an edge starts one: with ``start_trace=True`` (the HTTP
    ingress) a block with no trace to continue starts a new one when the sampler says so.
    Whenever nothing is to be recorded (tracing off, no trace to continue, not sampled)
    this returns one shared no-op object and leaves the context alone, so ``inject`` then
    writes nothing and the block costs a few hundred nanoseconds.
    """
    if not _config.enabled:
        return _NOOP
    parent = extract(parent_headers) if parent_headers is not None else None
    if parent is None:
        parent = _current.get()  # only recorded (sampled) spans are ever current
        if parent is None:
            if not start_trace:
                return _NOOP
            low = _getrandbits(64)  # a root's sampling decision: its trace id's low bits
            if low >= _config.bound:
                return _NOOP
            return _SpanScope(name, None, (_getrandbits(64) << 64 | low) or 1, attributes, kind)
    elif not _sampled(parent):
        return _NOOP
    return _SpanScope(name, parent, parent.trace_id, attributes, kind)


def edge_timing(route: str, headers: HeaderSource) -> Timing | None:
    """The server span of a request to ``route`` at the edge (HTTP headers, case-insensitive
    names), started now as a :class:`Timing` named ``route`` (:func:`end_timing` may rename
    it), or ``None`` when nothing is to be recorded: tracing off, or not sampled. It
    continues the request's valid ``traceparent`` (else a binary-mode CloudEvent's
    ``ce-traceparent``, as :func:`extract` reads them) or starts a trace, as ``span(...,
    start_trace=True)`` decides. The ingress runs this on every request: the common cases (no
    trace context in the request; sampled or not) take a handful of operations and, when
    sampled, one Python frame."""
    if not _config.enabled:
        return None
    if not (headers.get(TRACEPARENT) or headers.get("ce-traceparent")) and _current.get() is None:
        low = _getrandbits(64)  # a root's sampling decision: its trace id's low bits
        if low >= _config.bound:
            return None
        trace_id = (_getrandbits(64) << 64 | low) or 1
        return _new_timing(route, _SERVER, None, trace_id, _config.pipeline)
    scope = span(route, parent_headers=headers, start_trace=True)
    if not isinstance(scope, _SpanScope):
        return None
    return _new_timing(route, _SERVER, scope._parent, scope._trace_id, _config.pipeline)


class Timing:
    """A sampled span kept as its ids and start time only, for a block whose name and
    attributes its caller knows when it ends: the ingress's server span and a publish's
    ``append`` span, two of every sampled publish. No span object, no attribute dict, no
    OpenTelemetry context (no code but the broker's runs inside): in a tight loop the spans of
    a sampled publish cost about a third of what two :class:`RecordedSpan` do, and what
    :func:`end_timing` queues is the same finished span."""

    __slots__ = (
        "ended",
        "kind",
        "name",
        "parent_id",
        "parent_remote",
        "pipeline",
        "span_id",
        "start",
        "token",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        name: str,
        kind: int,
        parent: TraceContext | None,
        trace_id: int,
        pipeline: SpanPipeline | None,
        /,
        *,
        current: bool = True,
    ) -> None:
        self.name = name
        self.ended = False
        self.kind = kind  # the SpanKind's value
        self.trace_id = trace_id
        self.span_id = span_id = _getrandbits(64) or 1  # _new_id(64), without its frame
        if parent is None:
            self.parent_id, self.parent_remote, self.tracestate = 0, False, None
        else:
            self.parent_id = parent.span_id
            self.parent_remote = parent.span is None
            self.tracestate = parent.tracestate
        self.pipeline = pipeline
        self.token: Token[TraceContext | None] | None = None
        if current:
            # tuple.__new__ directly: the named tuple's own __new__ is a Python frame.
            context = _tuple_new(TraceContext, (trace_id, span_id, True, self.tracestate, self))
            self.token = _current.set(context)
        self.start = _time_ns()


def _child_timing(name: str, kind: SpanKind, /, current: bool = True) -> Timing | None:
    """A :class:`Timing` child of the recorded span running now; ``None`` when none is (tracing
    off, or this request is not sampled): then the block records nothing.

    With ``current=False`` it is not made current (two context-variable writes fewer, about a
    tenth of a sampled publish's recording): code inside the block still sees its parent as
    the span running now, and only ``inject(headers, timing)`` hands its context on."""
    if not _config.enabled:
        return None
    parent = _current.get()
    if parent is None:
        return None
    return _new_timing(
        name, kind._value_, parent, parent.trace_id, _config.pipeline, current=current
    )


_ERROR = StatusCode.ERROR._value_
_UNSET = StatusCode.UNSET._value_
_SERVER = SpanKind.SERVER._value_


_BAD_END_TIMING = "end_timing takes a tuple of attributes and a str name (or None)"


def _end_timing(
    timing: Timing,
    attributes: tuple[Any, ...] = (),
    *,
    error: BaseException | None = None,
    failed: bool = False,
    name: str | None = None,
) -> None:
    """End ``timing`` and queue its span: ``attributes`` as ``(key, value, key, value, ...)``
    of plain values (str, bool, int, float); an ``error`` that is an :class:`Exception` marks
    it failed with an ``exception`` event (as leaving a :func:`span` block with one does),
    ``failed`` without one; ``name`` replaces the name it started with. The trace context
    before it is current again."""
    end = _time_ns()
    if timing.ended:
        raise RuntimeError("this timing has ended already")
    if timing.token is not None:
        try:  # noqa: SIM105 (contextlib.suppress: a context manager costs more than the reset)
            _current.reset(timing.token)
        except ValueError:  # ended in another context than it started in: nothing to restore
            pass
    timing.ended = True
    # Checked after ending, as the C end_timing does: a bad call drops the span.
    if not isinstance(attributes, tuple) or not (name is None or isinstance(name, str)):
        raise TypeError(_BAD_END_TIMING)
    pipeline = timing.pipeline
    if pipeline is None:
        return
    events: tuple[Any, ...] | None = None
    status = _ERROR if failed else _UNSET
    description: str | None = None
    if isinstance(error, Exception):
        events = (exception_event(error, timestamp=end),)
        status, description = _ERROR, type(error).__name__
    pipeline.ended(
        (
            timing.name if name is None else name,
            timing.trace_id,
            timing.span_id,
            timing.parent_id,
            timing.parent_remote,
            timing.tracestate,
            timing.kind,
            timing.start,
            end,
            0,
            events,
            status,
            description,
            *attributes,
        )
    )


class NewTiming(Protocol):
    """:class:`Timing`'s constructor (or the accelerator's ``start_timing``)."""

    def __call__(
        self,
        name: str,
        kind: int,
        parent: TraceContext | None,
        trace_id: int,
        pipeline: SpanPipeline | None,
        /,
        *,
        current: bool = True,
    ) -> Timing: ...


class EndTiming(Protocol):
    """:func:`end_timing`'s signature (:func:`_end_timing`, or its C version)."""

    def __call__(
        self,
        timing: Timing,
        attributes: tuple[Any, ...] = (),
        /,
        *,
        error: BaseException | None = None,
        failed: bool = False,
        name: str | None = None,
    ) -> None: ...


class Inject(Protocol):
    """:func:`inject`'s signature (:func:`_inject`, or its C version)."""

    def __call__(
        self, headers: MutableMapping[str, str], span: Timing | None = None, /
    ) -> None: ...


class ChildTiming(Protocol):
    """:func:`child_timing`'s signature (:func:`_child_timing`, or its C version)."""

    def __call__(self, name: str, kind: SpanKind, /, current: bool = True) -> Timing | None: ...


def _timing_code() -> tuple[NewTiming, EndTiming, type | None, Inject, ChildTiming]:
    """:class:`Timing`, :func:`child_timing`, :func:`inject` and :func:`end_timing` in C when
    the codecs' accelerator is there (``broker/codecs/_lazy.c``: the same objects and text
    made without a Python frame, a timing that failed or raised ended by the Python
    function; a sampled request's code then touches less memory, and most of what it costs
    at a low sampling ratio is fetching its code and data back into the caches); else the
    Python class and functions, and ``None`` for the C type."""
    module = _lazy_module
    if module is None:
        return Timing, _end_timing, None, _inject, _child_timing
    module.timing_bind(_current, TraceContext, _getrandbits, _end_timing)
    return module.start_timing, module.end_timing, module.Timing, module.inject, module.child_timing


_lazy_module = accelerator()
if _lazy_module is not None and not hasattr(_lazy_module, "child_timing"):
    _lazy_module = None  # a module built from an older source: the Python class
_new_timing, end_timing, _CTiming, inject, child_timing = _timing_code()


@contextlib.contextmanager
def batch_spans(
    name: str,
    headers: Iterable[HeaderSource],
    *,
    attributes: Iterable[Attributes | None] | None = None,
    kind: SpanKind = SpanKind.CONSUMER,
) -> Iterator[None]:
    """One span per message of a batch, each a child of that message's own trace context,
    all open for the block (e.g. a projection applying and committing a batch). Messages
    without a sampled trace context get no span: a batch consumer continues traces, it does
    not start one per message. Free when tracing is off."""
    pipeline = _config.pipeline
    if not _config.enabled or pipeline is None:
        yield
        return
    started: list[Span] = []
    for index, (message_headers, extra) in enumerate(
        zip(headers, attributes or _nones(), strict=False)
    ):
        parent = extract(message_headers)
        if parent is None or not _sampled(parent):
            continue
        attrs = {"messaging.batch.index": index, **(extra or {})}
        started.append(_child(name, parent, kind, attrs, pipeline))
    error: BaseException | None = None
    try:
        yield
    except Exception as e:
        error = e
        raise
    finally:
        for s in started:
            if error is not None:
                s.set_status(Status(StatusCode.ERROR, type(error).__name__))
            s.end()


def _nones() -> Iterator[None]:
    while True:
        yield None


# --- configuration -----------------------------------------------------------------------


def configure(
    component: str,
    *,
    exporters: Iterable[SpanExporter] = (),
    processors: Iterable[SpanProcessor] = (),
    sampler: str = "parentbased_always_on",
    sampler_arg: float | None = None,
    resource_attributes: Mapping[str, AttributeValue] | None = None,
) -> None:
    """Turn tracing on in this process (again: the previous pipeline is shut down).

    The exporters get the spans in batches from the export thread
    (:class:`~broker.telemetry._export.SpanPipeline`, ``OTEL_BSP_*``); each of
    ``processors`` gets every span as it ends, as the SDK's ``ReadableSpan`` (its
    ``on_end``; a test passes ``SimpleSpanProcessor(InMemorySpanExporter())``).
    ``sampler`` is an ``OTEL_TRACES_SAMPLER`` name.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    import broker
    from broker.telemetry._export import SpanPipeline

    disable()
    base, parent_based = _parse_sampler(sampler)
    ratio = {"always_on": 1.0, "always_off": 0.0}.get(base)
    if ratio is None:  # traceidratio: the argument, 1.0 when absent (as the SDK does)
        ratio = 1.0 if sampler_arg is None else min(1.0, max(0.0, sampler_arg))
    attributes: dict[str, AttributeValue] = {
        "service.version": broker.__version__,
        "broker.component": component,
        "process.pid": os.getpid(),
    }
    if not _service_name_from_env():
        attributes["service.name"] = f"broker-{component}"
    attributes.update(resource_attributes or {})
    _config.pipeline = SpanPipeline(
        Resource.create(attributes),
        InstrumentationScope("broker", broker.__version__),
        exporters=exporters,
        processors=processors,
    )
    _config.parent_based = parent_based
    _config.bound = int(ratio * 2**64)
    _config.component = component
    _config.otel_context = component not in _OWN_CODE_ONLY
    _config.enabled = True
    if _lazy_module is not None:
        _lazy_module.tracing_switch(_config.pipeline)


#: Above this share of new traces sampled, :func:`configure_from_env` says what it costs: the
#: ingress's CPU per publish rose 8-15 % at 10 % and 22-29 % at every request (BENCHMARKS.md,
#: "Observability", 2026-11-28), against a target of 10 %.
BUSY_SAMPLING_RATIO = 0.1
BUSY_SAMPLING_HINT = (
    "sampling more than a tenth of new traces adds over 10 % CPU per publish on a busy "
    "ingress (every request: about a quarter); OTEL_TRACES_SAMPLER=parentbased_traceidratio "
    "with OTEL_TRACES_SAMPLER_ARG=0.01 samples 1 % and still follows every sampled "
    "traceparent a client sends (docs/observability.md)"
)


def configure_from_env(component: str, *, broker_tracing: bool = False) -> bool:
    """Configure tracing from the standard ``OTEL_*`` variables (and ``BROKER_TRACING``);
    returns whether tracing is now on."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if names == ["none"] or (not names and not broker_tracing):
        return False
    exporters = [e for n in (names or ["otlp"]) if (e := _exporter(n)) is not None]
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    try:
        sampler_arg = float(arg) if arg else None
    except ValueError:
        log.warning("otel_sampler_arg_invalid", value=arg[:40] if arg else arg)
        sampler_arg = None
    configure(component, exporters=exporters, sampler=sampler, sampler_arg=sampler_arg)
    atexit.register(disable)
    ratio = _config.bound / 2**64  # the share of new traces sampled, as configure settled it
    hint = {} if ratio <= BUSY_SAMPLING_RATIO else {"hint": BUSY_SAMPLING_HINT}
    log.info("tracing_enabled", exporters=names or ["otlp"], sampler=sampler, ratio=ratio, **hint)
    return True


def force_flush(timeout_ms: int = 5000) -> None:
    """Export every ended span now (before a process exits, or in a test)."""
    if _config.pipeline is not None:
        _config.pipeline.force_flush(timeout_ms)


def disable() -> None:
    """Flush and stop recording; :func:`span` is a no-op again."""
    pipeline = _config.pipeline
    _config.enabled = False
    if _lazy_module is not None:
        _lazy_module.tracing_switch(None)
    _config.pipeline = None
    if pipeline is not None:
        with contextlib.suppress(Exception):
            pipeline.shutdown()


def _exporter(name: str) -> SpanExporter | None:
    if name == "otlp":
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        )
        if protocol and protocol != "http/protobuf":
            log.warning("otlp_protocol_unsupported", protocol=protocol, using="http/protobuf")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)
    log.warning("otel_exporter_unknown", exporter=name[:40], known=["otlp", "console", "none"])
    return None


def _service_name_from_env() -> bool:
    if os.environ.get("OTEL_SERVICE_NAME"):
        return True
    return "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")


def _parse_sampler(name: str) -> tuple[_SamplerName, bool]:
    name = name.strip().lower()
    parent_based = name.startswith("parentbased_")
    base = name.removeprefix("parentbased_")
    if base not in {"always_on", "always_off", "traceidratio"}:
        log.warning("otel_sampler_unknown", sampler=name[:40], using="parentbased_always_on")
        return "always_on", True
    return base, parent_based  # type: ignore[return-value]


# --- internals ---------------------------------------------------------------------------


def _sampled(parent: TraceContext) -> bool:
    if _config.parent_based:
        return parent.sampled
    return (parent.trace_id & _LOW_64) < _config.bound


def _new_id(bits: int) -> int:
    return _getrandbits(bits) or 1


def _child(
    name: str,
    parent: TraceContext,
    kind: SpanKind,
    attributes: Attributes | None,
    pipeline: SpanPipeline,
) -> RecordedSpan:
    """A recorded span under ``parent``: a span of this process, or one from headers."""
    return RecordedSpan(
        name,
        parent.trace_id,
        _new_id(64),
        parent_id=parent.span_id,
        parent_remote=parent.span is None,
        tracestate=parent.tracestate,
        kind=kind,
        attributes=attributes,
        sink=pipeline,
    )


class _NoopScope:
    """What :func:`span` returns when tracing is off: shared, stateless, free."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


_NOOP = _NoopScope()
#: What :func:`span` returns when it records nothing (compare with ``is`` to skip a block's
#: span work on the hot path).
UNRECORDED: contextlib.AbstractContextManager[Span] = _NOOP


class _SpanScope:
    """A recorded span: current in both our context and OpenTelemetry's while it runs."""

    __slots__ = (
        "_attributes",
        "_kind",
        "_name",
        "_otel_token",
        "_parent",
        "_span",
        "_token",
        "_trace_id",
    )

    def __init__(
        self,
        name: str,
        parent: TraceContext | None,
        trace_id: int,
        attributes: Attributes | None,
        kind: SpanKind,
    ) -> None:
        self._name = name
        self._parent = parent
        self._attributes = attributes
        self._kind = kind
        self._trace_id = trace_id  # a root's: the sampler chose it
        self._span: RecordedSpan | None = None
        self._otel_token: Token[otel_context.Context] | None = None

    def __enter__(self) -> Span:
        pipeline = _config.pipeline
        if pipeline is None:  # tracing was switched off in between
            return INVALID_SPAN
        parent = self._parent
        if parent is None:
            recorded = RecordedSpan(
                self._name,
                self._trace_id,
                _new_id(64),
                parent_id=0,
                parent_remote=False,
                tracestate=None,
                kind=self._kind,
                attributes=self._attributes,
                sink=pipeline,
            )
        else:
            recorded = _child(self._name, parent, self._kind, self._attributes, pipeline)
        self._span = recorded
        self._token = _current.set(
            TraceContext(recorded.trace_id, recorded.span_id, True, recorded.tracestate, recorded)
        )
        if _config.otel_context:
            self._otel_token = otel_context.attach(trace.set_span_in_context(recorded))
        return recorded

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        recorded = self._span
        if recorded is None:
            return
        # The context before the span is current again first, whatever ending it raises: an
        # ended span left current would be the parent of everything else the task does.
        try:
            if self._otel_token is not None:
                otel_context.detach(self._otel_token)
            _current.reset(self._token)
        except ValueError:  # left in another context (the block's task ended elsewhere)
            pass
        if isinstance(exc, Exception):
            recorded.record_exception(exc)
            recorded.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        recorded.end()
