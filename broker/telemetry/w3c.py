"""The W3C Trace Context headers, read and bounded: ``traceparent`` and ``tracestate``.

Framework-free and light (the envelope uses it on every publish that carries a trace
context, tracing off or on). What a client sends is never a reason to refuse its message:
a ``traceparent`` that does not parse is dropped with its ``tracestate`` (the
specification's rule: a vendor that cannot parse ``traceparent`` must not read
``tracestate``), and a ``tracestate`` is cut to the specification's bounds or dropped when
it is not a valid list.

``tracestate`` rules (Trace Context, level 1, section 3.3): a comma-separated list of at
most 32 ``key=value`` members with unique keys; empty members and spaces around them are
allowed. A header sent more than once is one list, the values joined with commas in order.
Vendors propagate at least 512 characters; past that, members over 128 characters go
first, then members from the end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = [
    "MAX_TRACESTATE",
    "MAX_TRACESTATE_MEMBERS",
    "TRACEPARENT_FORMAT",
    "RequestHeaders",
    "bounded_tracestate",
    "format_traceparent",
    "parse_traceparent",
    "request_trace_headers",
]

#: A version ``00`` ``traceparent``: trace id, span id, flags (``01`` sampled, ``00`` not).
TRACEPARENT_FORMAT = "00-%032x-%016x-%s"
#: What the broker keeps of a ``tracestate``: the length every vendor must propagate.
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
#: A member longer than this is the first to go when the list is over its length.
_LONG_MEMBER = 128
_HEX = frozenset("0123456789abcdef")
#: A key: ``lcalpha (lcalpha / digit / "_" / "-" / "*" / "/"){0,255}``, or a multi-tenant key
#: ``tenant@system`` (tenant up to 241 characters starting with lcalpha or a digit, system up
#: to 14 starting with lcalpha). A value: up to 256 printable ASCII characters other than
#: ``,`` and ``=``, the last not a space.
_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_*/-]{0,255}|[a-z0-9][a-z0-9_*/-]{0,240}@[a-z][a-z0-9_*/-]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_OWS = " \t"


class RequestHeaders(Protocol):
    """HTTP request headers as granian gives them: ``get``, and ``get_all`` for a name sent
    more than once."""

    def get(self, key: str, /) -> Any: ...
    def get_all(self, key: str, /) -> Any: ...


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """``(trace_id, span_id, sampled)`` of a ``traceparent``, or ``None`` if it does not
    parse. A later version's header is read as version ``00`` with more after it. Every
    field is lower-case hex (``HEXDIGLC``): an upper-case digit makes the header invalid, as
    for the specification's test suite and OpenTelemetry's propagator."""
    value = value.strip(_OWS)
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version = value[:2]
    if version == "ff" or (version == "00" and len(value) != 55):
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    if not _HEX.issuperset(value[:2] + value[3:35] + value[36:52] + value[53:55]):
        return None
    trace_id, span_id = int(value[3:35], 16), int(value[36:52], 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, bool(int(value[53:55], 16) & 1)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    """A version ``00`` ``traceparent``."""
    return TRACEPARENT_FORMAT % (trace_id, span_id, "01" if sampled else "00")


def bounded_tracestate(value: str | Iterable[str] | None) -> str | None:
    """``value`` (one header's value, or the values of a header sent more than once) as a
    valid ``tracestate`` of at most :data:`MAX_TRACESTATE` characters, or ``None`` when it
    is empty or not a valid list (a member that is not ``key=value``, a key twice, more than
    :data:`MAX_TRACESTATE_MEMBERS` members). A valid list within the bounds comes back with
    its members as sent, spaces around them removed."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ",".join(value)
    if not text:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for part in text.split(","):
        member = part.strip(_OWS)
        if not member:
            continue
        if len(members) == MAX_TRACESTATE_MEMBERS or _MEMBER.fullmatch(member) is None:
            return None
        key = member[: member.index("=")]
        if key in keys:
            return None
        keys.add(key)
        members.append(member)
    kept = _shortened(members)
    return ",".join(kept) if kept else None


def _shortened(members: list[str]) -> list[str]:
    """``members``, fewer of them when together (with their commas) they are over
    :data:`MAX_TRACESTATE`: members over :data:`_LONG_MEMBER` characters first, from the
    last, as many as it takes; then others from the end."""
    length = sum(map(len, members)) + len(members) - 1
    if length <= MAX_TRACESTATE:
        return members
    kept = list(members)
    for i in range(len(kept) - 1, -1, -1):
        if len(kept[i]) > _LONG_MEMBER:
            length -= len(kept.pop(i)) + 1
            if length <= MAX_TRACESTATE:
                return kept
    while kept and length > MAX_TRACESTATE:
        length -= len(kept.pop()) + 1
    return kept


def request_trace_headers(headers: RequestHeaders) -> dict[str, str] | None:
    """The trace context an HTTP request carries, as the broker stores it with the message:
    ``traceparent`` rewritten as version ``00`` and ``tracestate`` bounded, or ``None``.
    A ``traceparent`` that is absent, sent twice or does not parse drops both."""
    raw = headers.get("traceparent")
    if not raw:
        return None
    values = headers.get_all("traceparent")
    parsed = parse_traceparent(raw) if len(values) == 1 else None
    if parsed is None:
        return None
    found = {"traceparent": format_traceparent(*parsed)}
    state = headers.get_all("tracestate")
    if state and (bounded := bounded_tracestate(state)):
        found["tracestate"] = bounded
    return found
