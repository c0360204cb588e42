"""The broker's recorded span: a sampled span as a few plain fields, cheap to start and end.

The OpenTelemetry SDK's own span takes tens of microseconds to start and end (a lock, a
sampler run, bounded containers, span processors) on the request's thread. A sampled span
here is an object with slots: its ids, name, kind, times, a plain dict of attributes and
the rare events. It is a full :class:`opentelemetry.trace.Span`, so code that uses the
OpenTelemetry API inside one (``trace.get_current_span()``, a tracer of its own) sees it
and nests under it.

When it ends, what it recorded is handed on as a :data:`FinishedSpan`: one flat tuple of
strings and numbers. Finished spans wait in the export queue for up to
``OTEL_BSP_SCHEDULE_DELAY`` (and up to ``OTEL_BSP_MAX_QUEUE_SIZE`` of them while the
collector is slow or down), long enough to outlive two garbage collections and reach the
oldest generation, where every tracked object adds to the work of each full collection and
hastens the next one (a full collection of the ingress's heap takes ~100 ms on the 2-core
benchmark machine). CPython stops tracking a tuple of such atoms at the first collection
it survives, so a queued finished span never reaches the oldest generation.
:mod:`broker.telemetry._otlp` encodes them; :func:`to_readable` makes the SDK's
:class:`ReadableSpan` of one for span processors and other exporters.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.trace import (
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util import types

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = [
    "MAX_ATTRIBUTES",
    "Event",
    "FinishedSpan",
    "RecordedSpan",
    "SpanSink",
    "attributes",
    "clean_value",
    "exception_event",
    "head",
    "to_readable",
]

#: At most this many attributes per span or event (``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``'s
#: default); more are dropped and counted.
MAX_ATTRIBUTES = 128
_PLAIN = frozenset({str, bool, int, float, bytes})
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_time_ns = time.time_ns

#: An event of a span: ``(name, timestamp, attributes, dropped attribute count)``.
Event = tuple[str, int, dict[str, Any], int]

#: What a span recorded, once it ended: one flat tuple, ``(name, trace_id, span_id,
#: parent_id, parent_remote, tracestate, kind, start_ns, end_ns, dropped_attributes, events,
#: status_code, status_description, key, value, key, value, ...)``. ``parent_id`` is 0 for a
#: root; ``kind`` and ``status_code`` are the values of :class:`SpanKind` and
#: :class:`StatusCode`; ``events`` is ``None`` or a tuple of :data:`Event`. Read it with
#: :func:`head` and :func:`attributes`. Flat and exact (no named tuple, no nested tuple or
#: dict): the collector untracks a tuple only once everything in it is untracked, and finds
#: that out for one level of nesting per collection.
FinishedSpan = tuple[Any, ...]
#: The fields before the attributes, as :func:`head` types them.
Head = tuple[
    str,
    int,
    int,
    int,
    bool,
    str | None,
    int,
    int,
    int,
    int,
    tuple[Event, ...] | None,
    int,
    str | None,
]
_HEAD = 13


def head(span: FinishedSpan) -> Head:
    """The fields of a finished span before its attributes."""
    return span[:_HEAD]


def attributes(span: FinishedSpan) -> Iterator[tuple[str, Any]]:
    """The ``(key, value)`` attributes of a finished span."""
    rest = iter(span[_HEAD:])
    return zip(rest, rest, strict=False)


class SpanSink(Protocol):
    """Where a span's record goes when it ends (the export pipeline)."""

    def ended(self, span: FinishedSpan, /) -> None: ...


def clean_value(value: object) -> Any:
    """``value`` as an attribute value: scalars as they are, sequences as tuples, mappings as
    dicts, anything else as its ``str``; ``None`` when it has none."""
    if value is None or type(value) in _PLAIN or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, Mapping):
        return {str(k): clean_value(v) for k, v in value.items() if k}
    if isinstance(value, Sequence):
        return tuple(clean_value(v) for v in value)
    return str(value)


def _cleaned(attributes: Mapping[str, Any] | None) -> tuple[dict[str, Any], int]:
    if not attributes:
        return {}, 0
    if len(attributes) <= MAX_ATTRIBUTES and all(
        map(_PLAIN.__contains__, map(type, attributes.values()))
    ):  # the usual case, checked in C: plain values only, no None, within the bound
        return dict(attributes), 0
    out: dict[str, Any] = {}
    dropped = 0
    for key, raw in attributes.items():
        value = raw if type(raw) in _PLAIN else clean_value(raw)
        if value is None:
            continue
        if len(out) >= MAX_ATTRIBUTES and key not in out:
            dropped += 1
            continue
        out[key] = value
    return out, dropped


class RecordedSpan(Span):
    """A sampled span: recording from its start until :meth:`end`, then handed to ``sink``.

    ``parent_id`` is 0 for a trace's root; ``parent_remote`` says the parent came from
    another process (headers) rather than from a span of this one.
    """

    __slots__ = (
        "_context",
        "_sink",
        "attributes",
        "dropped_attributes",
        "end_time",
        "events",
        "kind",
        "name",
        "parent_id",
        "parent_remote",
        "span_id",
        "start_time",
        "status_code",
        "status_description",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        *,
        parent_id: int,
        parent_remote: bool,
        tracestate: str | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        sink: SpanSink,
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.parent_remote = parent_remote
        self.tracestate = tracestate
        self.kind = kind
        if attributes:
            self.attributes, self.dropped_attributes = _cleaned(attributes)
        else:
            self.attributes, self.dropped_attributes = {}, 0
        self.events: list[tuple[str, int, dict[str, Any], int]] | None = None
        self.status_code = StatusCode.UNSET
        self.status_description: str | None = None
        self._sink: SpanSink | None = sink
        self._context: SpanContext | None = None
        self.end_time = 0
        self.start_time = _time_ns()

    # --- opentelemetry.trace.Span ----------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            state = TraceState.from_header([self.tracestate]) if self.tracestate else None
            context = self._context = SpanContext(
                self.trace_id, self.span_id, False, _SAMPLED, state
            )
        return context

    def is_recording(self) -> bool:
        return self._sink is not None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._sink is None:
            return
        if type(value) not in _PLAIN:
            value = clean_value(value)
            if value is None:
                return
        attributes = self.attributes
        if len(attributes) >= MAX_ATTRIBUTES and key not in attributes:
            self.dropped_attributes += 1
            return
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._sink is None:
            return
        if not self.attributes:  # the usual case: one call, right after the start
            self.attributes, self.dropped_attributes = _cleaned(attributes)
            return
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._sink is not None:
            cleaned, dropped = _cleaned(attributes)
            self._add_event((name, timestamp or _time_ns(), cleaned, dropped))

    def _add_event(self, event: Event) -> None:
        if self.events is None:
            self.events = [event]
        elif len(self.events) < MAX_ATTRIBUTES:
            self.events.append(event)

    def update_name(self, name: str) -> None:
        if self._sink is not None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK does: ``OK`` is final; a description is kept only with ``ERROR``."""
        if self._sink is None or self.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        self.status_code = code
        self.status_description = description if code is StatusCode.ERROR else None

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """An ``exception`` event with the semantic-convention attributes the SDK writes."""
        if self._sink is not None:
            self._add_event(exception_event(exception, attributes, timestamp, escaped))

    def end(self, end_time: int | None = None) -> None:
        sink = self._sink
        if sink is None:  # ended already
            return
        self.end_time = end_time or _time_ns()
        self._sink = None
        sink.ended(self.finished())

    def finished(self) -> FinishedSpan:
        """What this span recorded, as the flat tuple the exporters take."""
        fields = [
            self.name,
            self.trace_id,
            self.span_id,
            self.parent_id,
            self.parent_remote,
            self.tracestate,
            self.kind._value_,
            self.start_time,
            self.end_time,
            self.dropped_attributes,
            tuple(self.events) if self.events else None,
            self.status_code._value_,
            self.status_description,
        ]
        for pair in self.attributes.items():
            fields += pair
        return tuple(fields)


def exception_event(
    exception: BaseException,
    attributes: types.Attributes = None,
    timestamp: int | None = None,
    escaped: bool = False,
) -> Event:
    """The ``exception`` event of a span, with the semantic-convention attributes the SDK
    writes."""
    cls = type(exception)
    module = cls.__module__
    event: dict[str, Any] = {
        "exception.type": (
            f"{module}.{cls.__qualname__}" if module and module != "builtins" else cls.__qualname__
        ),
        "exception.message": _message(exception),
        "exception.stacktrace": "".join(traceback.format_exception(exception)),
        "exception.escaped": str(escaped),
    }
    if attributes:
        event.update(attributes)
    cleaned, dropped = _cleaned(event)
    return ("exception", timestamp or _time_ns(), cleaned, dropped)


def _message(exception: BaseException) -> str:
    """``str(exception)``, or a placeholder when that raises (a ``__str__`` reading
    arguments its ``__init__`` never passed on): recording a failure must not fail."""
    try:
        return str(exception)
    except Exception:
        return f"<{type(exception).__qualname__}: str() failed>"


def to_readable(
    span: FinishedSpan, resource: Resource, scope: InstrumentationScope
) -> ReadableSpan:
    """The SDK's read-only span for a finished span (span processors and any exporter other
    than OTLP/HTTP take these)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan

    (name, trace_id, span_id, parent_id, remote, tracestate, kind, start, end) = head(span)[:9]
    events, status, description = head(span)[10:]
    state = TraceState.from_header([tracestate]) if tracestate else None
    parent = SpanContext(trace_id, parent_id, remote, _SAMPLED) if parent_id else None
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, False, _SAMPLED, state),
        parent=parent,
        resource=resource,
        attributes=dict(attributes(span)),
        events=tuple(Event(n, dict(a), ts) for n, ts, a, _ in events or ()),
        kind=SpanKind(kind),
        status=Status(StatusCode(status), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )
