"""C implementation of :class:`broker.codecs.lazy.LazyValue` and ``DecodedMessage``, and of
:func:`broker.codecs._avrocheck.check`.

Built from ``_lazy.c`` by ``hatch_build.py`` where a C compiler is available; import the
classes from :mod:`broker.codecs` (or :mod:`broker.codecs.lazy`), which falls back to the
Python ones when this module is missing.
"""

from collections.abc import Callable, Mapping, Sequence
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

def check_avro(program: bytes, payload: bytes, max_depth: int, /) -> tuple[int, str] | None:
    """``(offset, reason)`` of the first integer in ``payload`` that Avro's spec does not
    allow, or ``None`` (see :mod:`broker.codecs._avrocheck`)."""

def encode_otlp_spans(
    spans: Sequence[tuple[Any, ...]], fallback: Callable[[tuple[Any, ...]], bytes], /
) -> bytes:
    """The ``ScopeSpans.spans`` fields of finished spans as OTLP/protobuf; ``fallback(span)``
    encodes the spans it leaves to Python (see :mod:`broker.telemetry._otlp`)."""
