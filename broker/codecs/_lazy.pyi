"""C implementation of :class:`broker.codecs.lazy.LazyValue` and ``DecodedMessage``, and of
:func:`broker.codecs._avrocheck.check`; also the OTLP encoding of finished spans and a
sampled span's :class:`Timing` for :mod:`broker.telemetry`.

Built from ``_lazy.c`` by ``hatch_build.py`` where a C compiler is available; import the
classes from :mod:`broker.codecs` (or :mod:`broker.codecs.lazy`), which falls back to the
Python ones when this module is missing.
"""

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from broker.codecs.base import Codec, DecodeError

class LazyValue:
    """A body and the codec that reads it; ``.value`` decodes once, on first access."""

    payload: bytes
    codec: Codec
    def __init__(self, payload: bytes, codec: Codec) -> None: ...
    @property
    def value(self) -> Any: ...
    @property
    def decoded(self) -> bool: ...
    @property
    def error(self) -> DecodeError | None: ...

class DecodedMessage(LazyValue):
    """A stored message as a reader sees it: position and headers now, value when asked."""

    headers: Mapping[str, str]
    subject: str | None
    sequence: int | None
    def __init__(
        self,
        payload: bytes,
        headers: Mapping[str, str],
        codec: Codec,
        *,
        subject: str | None = None,
        sequence: int | None = None,
    ) -> None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def schema_id(self) -> int | None: ...

def digit_run(data: bytes, length: int, /) -> bool:
    """Whether ``data`` holds ``length`` ASCII digits in a row (see :mod:`broker.exactjson`)."""

def check_avro(program: bytes, payload: bytes, max_depth: int, /) -> tuple[int, str] | None:
    """``(offset, reason)`` of the first integer in ``payload`` that Avro's spec does not
    allow, or ``None`` (see :mod:`broker.codecs._avrocheck`)."""

def encode_otlp_spans(
    spans: Sequence[tuple[Any, ...]], fallback: Callable[[tuple[Any, ...]], bytes], /
) -> bytes:
    """The ``ScopeSpans.spans`` fields of finished spans as OTLP/protobuf; ``fallback(span)``
    encodes the spans it leaves to Python (see :mod:`broker.telemetry._otlp`)."""

class Timing:
    """A sampled span while it runs (:class:`broker.telemetry.tracing.Timing` in C): its ids
    and start time, made by :func:`start_timing`; every field but ``ended`` is read-only."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int
    parent_remote: bool
    tracestate: str | None
    pipeline: Any
    token: Any
    start: int
    kind: int
    ended: bool

def timing_bind(
    current: Any,
    trace_context: type[tuple[Any, ...]],
    getrandbits: Any,
    end_timing: Callable[..., None],
    /,
) -> None:
    """What the timing functions use: the tracing module's context variable, its
    ``TraceContext`` type, the random id source and the Python ``end_timing`` that
    :func:`end_timing` hands what it does not end itself."""

def start_timing(
    name: str,
    kind: int,
    parent: tuple[Any, ...] | None,
    trace_id: int,
    pipeline: Any,
    /,
    *,
    current: bool = True,
) -> Timing:
    """A :class:`Timing` child of ``parent`` (a ``TraceContext``; ``None``: a root), made
    current as a ``TraceContext`` in the bound context variable unless ``current`` is
    false (its ``token`` is then ``None``)."""

def end_timing(
    timing: Timing,
    attributes: tuple[Any, ...] = (),
    /,
    *,
    error: BaseException | None = None,
    failed: bool = False,
    name: str | None = None,
) -> None:
    """``broker.telemetry.tracing.end_timing``: a :class:`Timing` that neither failed nor
    raised is ended here (the context before it current again, its finished span handed to
    its pipeline's ``ended``, none when that is ``None``; ``name``, when not ``None``,
    replaces the one it started with), anything else by the bound Python function."""

def tracing_switch(pipeline: Any, /) -> None:
    """Tracing on, :func:`child_timing`'s spans ending into ``pipeline``; ``None``: off, and
    :func:`child_timing` and :func:`inject` do nothing (the tracing module switches it)."""

def child_timing(name: str, kind: Any, current: bool = True) -> Timing | None:
    """A :class:`Timing` child of the bound context variable's span (``kind`` a ``SpanKind``),
    made current unless ``current`` is false, or ``None`` when none is current or tracing is
    off."""

def inject(headers: MutableMapping[str, str], span: Timing | None = None, /) -> None:
    """The ``traceparent`` (and ``tracestate``, when there is one) of ``span``, else of the
    bound context variable's span, written into ``headers``, which keep no other
    ``tracestate``; nothing while switched off or when no span is current."""
