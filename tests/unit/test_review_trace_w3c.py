"""W3C Trace Context (levels 1 and 2) at the broker's edge: which ``traceparent`` a request
may continue, and what of it and of ``tracestate`` is kept for the next hop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.telemetry import tracing
from broker.telemetry.w3c import (
    MAX_TRACESTATE_MEMBERS,
    bounded_tracestate,
    format_traceparent,
    parse_traceparent,
    request_trace_headers,
)
from tests._tracing import OTHER, PARENT, SPAN, TRACE, RequestHeaders

pytestmark = pytest.mark.unit


# --- traceparent -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        PARENT.upper(),
        f"00-{TRACE:032X}-{SPAN:016x}-01",  # the trace id only
        f"00-{TRACE:032x}-{SPAN:016X}-01",  # the parent id only
        f"00-{TRACE:032x}-{SPAN:016x}-0A",  # the flags only
        f"CC-{TRACE:032x}-{SPAN:016x}-01",  # a later version's number
    ],
    ids=["all", "trace-id", "parent-id", "flags", "version"],
)
def test_an_upper_case_hex_digit_makes_the_traceparent_invalid(value: str) -> None:
    """Every field is ``HEXDIGLC``: the W3C test suite's parser and OpenTelemetry's
    propagator ignore such a header (a new trace), where the broker continued it."""
    assert parse_traceparent(value) is None
    assert request_trace_headers(RequestHeaders(("traceparent", value))) is None
    assert tracing.extract({"traceparent": value}) is None


def test_a_traceparent_sent_twice_starts_a_new_trace_at_the_edge(
    exporter: InMemorySpanExporter,
) -> None:
    """Two ``traceparent`` headers are invalid (the W3C suite's
    ``test_traceparent_duplicated``): the stored message leaves them out, and the server
    span must not continue the first one either (it did, so the stored ``traceparent``,
    written from the append span, carried the first header's trace after all)."""
    for name in ("traceparent", "ce-traceparent"):
        headers = RequestHeaders((name, PARENT), (name, OTHER))
        assert tracing.extract(headers) is None
        timing = tracing.edge_timing("/v1/publish/{subject}", headers)
        assert timing is not None  # a root: every new trace is sampled here
        tracing.end_timing(timing)
    assert (
        request_trace_headers(RequestHeaders(("traceparent", PARENT), ("traceparent", OTHER)))
        is None
    )
    finished = exporter.get_finished_spans()
    assert len(finished) == 2
    for span in finished:
        assert span.parent is None
        assert span.context is not None
        assert span.context.trace_id not in (TRACE, TRACE + 1)


def test_one_traceparent_at_the_edge_is_continued_with_its_tracestate(
    exporter: InMemorySpanExporter,
) -> None:
    headers = RequestHeaders(
        ("traceparent", PARENT), ("tracestate", "a=1"), ("tracestate", " b=2 ,")
    )
    timing = tracing.edge_timing("/v1/publish/{subject}", headers)
    assert timing is not None
    stored: dict[str, str] = {}
    tracing.inject(stored)
    tracing.end_timing(timing)
    (span,) = exporter.get_finished_spans()
    assert span.context is not None
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (TRACE, SPAN)
    assert stored["traceparent"] == f"00-{TRACE:032x}-{span.context.span_id:016x}-01"
    assert stored["tracestate"] == "a=1,b=2"


@given(
    st.integers(min_value=1, max_value=2**128 - 1),
    st.integers(min_value=1, max_value=2**64 - 1),
    st.booleans(),
)
def test_a_formatted_traceparent_parses_back_to_its_ids(
    trace_id: int, span_id: int, sampled: bool
) -> None:
    assert parse_traceparent(format_traceparent(trace_id, span_id, sampled)) == (
        trace_id,
        span_id,
        sampled,
    )


#: Headers shaped like a traceparent, hex digits of either case, with maybe more around.
_SHAPED = st.tuples(
    st.sampled_from(["", " ", "\t", "\n", "x"]),
    st.from_regex(r"[0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}", fullmatch=True),
    st.sampled_from(["", " ", "\t", "\r\n", "-", "-x", ".x"]),
).map("".join)
_LOWER_HEX = frozenset("0123456789abcdef")


@given(st.text(max_size=120) | st.binary(max_size=120).map(lambda b: b.decode("latin-1")) | _SHAPED)
def test_any_text_parses_to_the_ids_it_spells_or_to_nothing(value: str) -> None:
    """Never raises; what parses is a version 00 header spelling those very ids (lower
    case, as sent, apart from spaces and tabs around it) or a later version's with them."""
    parsed = parse_traceparent(value)
    if parsed is None:
        return
    sent = value.strip(" \t")
    assert format_traceparent(*parsed)[2:52] == sent[2:52]
    assert _LOWER_HEX.issuperset(sent[:2] + sent[53:55])
    assert sent[:2] != "ff"
    assert len(sent) == 55 or (sent[:2] != "00" and sent[55] == "-")


_FLAGS = st.integers(min_value=0, max_value=255).map(lambda f: f"{f:02x}")


@given(
    st.integers(min_value=1, max_value=254).map(lambda v: f"{v:02x}"),
    _FLAGS,
    st.none() | st.text(max_size=40).map(lambda t: "-" + t),
)
def test_a_later_version_is_read_as_version_00_with_more_after_it(
    version: str, flags: str, rest: str | None
) -> None:
    value = f"{version}-{TRACE:032x}-{SPAN:016x}-{flags}{rest or ''}"
    assert parse_traceparent(value) == (TRACE, SPAN, bool(int(flags, 16) & 1))


@given(_FLAGS, st.text(min_size=1, max_size=40))
def test_version_00_is_exactly_55_characters(flags: str, rest: str) -> None:
    value = f"00-{TRACE:032x}-{SPAN:016x}-{flags}"
    assert parse_traceparent(value) is not None
    if rest.strip(" \t"):
        assert parse_traceparent(value + rest) is None


@pytest.mark.parametrize(
    "value",
    [
        f" \t{PARENT}",
        f"{PARENT}\t ",
    ],
)
def test_spaces_and_tabs_around_a_traceparent_are_allowed(value: str) -> None:
    assert parse_traceparent(value) == (TRACE, SPAN, True)


@pytest.mark.parametrize(
    "value",
    [
        f"{PARENT}\r\n",
        f"{PARENT}\n",
        f"\n{PARENT}",
        f"{PARENT[:-2]}\r\nx-evil: 1",
        f"cc-{TRACE:032x}-{SPAN:016x}-01\r\nx: y",
        "ff" + PARENT[2:],
        "000" + PARENT[2:],
        PARENT.replace("-", "_"),
        f"00-{0:032x}-{SPAN:016x}-01",
        f"00-{TRACE:032x}-{0:016x}-01",
        PARENT + ".",
        PARENT + "-future",
        f"cc-{TRACE:032x}-{SPAN:016x}-01.future",
        f"00-{TRACE:032x}-{SPAN:016x}-0g",
        f"00-+{TRACE:031x}-{SPAN:016x}-01",
        f"00-{TRACE:032x}-{SPAN:015x}_-01",
    ],
)
def test_a_malformed_traceparent_is_ignored(value: str) -> None:
    assert parse_traceparent(value) is None
    assert request_trace_headers(RequestHeaders(("traceparent", value))) is None


def test_flags_other_than_sampled_are_not_forwarded() -> None:
    """Level 1: flags this version does not define are set to zero when propagated."""
    for flags, sampled in (("03", True), ("02", False), ("ff", True), ("fe", False)):
        value = PARENT[:-2] + flags
        assert parse_traceparent(value) == (TRACE, SPAN, sampled)
        stored = request_trace_headers(RequestHeaders(("traceparent", value)))
        assert stored == {"traceparent": PARENT[:-2] + ("01" if sampled else "00")}


# --- tracestate ------------------------------------------------------------------------------


def test_tracestate_headers_are_one_list_in_order_with_empty_members_left_out() -> None:
    headers = RequestHeaders(
        ("traceparent", PARENT),
        ("tracestate", "foo=1,bar=2"),
        ("tracestate", ""),
        ("tracestate", "rojo=1 \t, \tcongo=2"),
        ("tracestate", "baz=3"),
    )
    assert request_trace_headers(headers) == {
        "traceparent": PARENT,
        "tracestate": "foo=1,bar=2,rojo=1,congo=2,baz=3",
    }


def test_a_key_in_two_tracestate_headers_drops_the_list_not_the_traceparent() -> None:
    headers = RequestHeaders(
        ("traceparent", PARENT), ("tracestate", "foo=1"), ("tracestate", "foo=1")
    )
    assert request_trace_headers(headers) == {"traceparent": PARENT}


def test_32_members_are_kept_and_33_drop_the_list() -> None:
    members = [f"k{i}=v" for i in range(MAX_TRACESTATE_MEMBERS + 1)]
    assert bounded_tracestate(",".join(members[:-1])) == ",".join(members[:-1])
    assert bounded_tracestate(members) is None


@pytest.mark.parametrize(
    "value",
    ["foo =1", "FOO=1", "foo.bar=1", "foo@=1,bar=2", "@foo=1,bar=2", "foo@@bar=1", "a@b@c=1"],
)
def test_an_invalid_key_drops_the_list(value: str) -> None:
    assert bounded_tracestate(value) is None


def test_every_allowed_character_is_kept() -> None:
    """The W3C suite's ``test_tracestate_all_allowed_characters``."""
    key = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
    value = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))
    for k in (key, key + "@a-z0-9_-*/"):
        assert bounded_tracestate(f"{k}={value}") == f"{k}={value}"


@given(st.lists(st.text(max_size=60), max_size=5))
def test_what_a_tracestate_keeps_is_safe_in_a_nats_header(values: list[str]) -> None:
    kept = bounded_tracestate(values)
    if kept is not None:
        assert kept.isascii()
        assert kept.isprintable()
        assert kept == kept.strip(" \t")
