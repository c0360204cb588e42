"""W3C trace context headers: what the broker keeps of a client's traceparent and tracestate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import PublishRequest, Tenant, passthrough_headers
from broker.telemetry import tracing
from broker.telemetry.w3c import (
    MAX_TRACESTATE,
    MAX_TRACESTATE_MEMBERS,
    bounded_tracestate,
    parse_traceparent,
    request_trace_headers,
)
from tests._tracing import RequestHeaders

pytestmark = pytest.mark.unit

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_valid_list_is_kept_as_sent_without_spaces_around_members() -> None:
    assert bounded_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7") == (
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    )
    assert bounded_tracestate("tenant@vendor=x,,  ,a=b ") == "tenant@vendor=x,a=b"


@pytest.mark.parametrize(
    "value",
    [
        "novalue",
        "Upper=x",
        "a=b,a=c",  # a key twice
        "a=b\x07",  # a control character
        "a=b,c",
        "a=,b=c",  # an empty value
        "a=b=c",
        ",".join(f"k{i}=v" for i in range(MAX_TRACESTATE_MEMBERS + 1)),
    ],
    ids=[
        "no-value",
        "upper-key",
        "key-twice",
        "control",
        "bare-member",
        "empty-value",
        "two-equals",
        "33-members",
    ],
)
def test_an_invalid_list_is_dropped_whole(value: str) -> None:
    assert bounded_tracestate(value) is None


def test_a_long_list_loses_its_long_members_first_then_members_from_the_end() -> None:
    long = "big=" + "x" * 200
    short = [f"k{i}=" + "v" * 40 for i in range(14)]  # 14 x 44 + commas: over 512 with `long`
    kept = bounded_tracestate([long, *short])
    assert kept is not None
    assert "big=" not in kept
    assert len(kept) <= MAX_TRACESTATE
    assert kept.split(",") == short[: len(kept.split(","))]  # the first ones, in order
    assert len(kept.split(",")) == 11  # 11 x 45 - 1 = 494; 12 would be 539


def test_long_members_go_from_the_last_only_as_many_as_it_takes() -> None:
    first, second = "one=" + "x" * 200, "two=" + "y" * 200
    short = [f"k{i}=" + "v" * 40 for i in range(3)]  # 2 x 204 + 3 x 44 + 4 commas = 544
    assert bounded_tracestate([first, *short, second]) == ",".join([first, *short])


def test_a_header_sent_twice_is_one_list() -> None:
    headers = RequestHeaders(("traceparent", PARENT), ("tracestate", "a=1"), ("tracestate", "b=2"))
    assert request_trace_headers(headers) == {"traceparent": PARENT, "tracestate": "a=1,b=2"}
    # the key twice across the two headers: the list is invalid, the traceparent stays
    twice = RequestHeaders(("traceparent", PARENT), ("tracestate", "a=1"), ("tracestate", "a=2"))
    assert request_trace_headers(twice) == {"traceparent": PARENT}


def test_a_traceparent_that_does_not_parse_drops_both_headers() -> None:
    for bad in ("00-zz", PARENT.replace("-01", "-0"), "ff" + PARENT[2:], PARENT + "-x"):
        assert (
            request_trace_headers(RequestHeaders(("traceparent", bad), ("tracestate", "a=1")))
            is None
        )
    twice = RequestHeaders(("traceparent", PARENT), ("traceparent", PARENT))
    assert request_trace_headers(twice) is None


def test_a_traceparent_is_stored_as_version_00_and_upper_case_is_invalid() -> None:
    later = "01" + PARENT[2:] + "-extra"
    assert request_trace_headers(RequestHeaders(("traceparent", later))) == {"traceparent": PARENT}
    # HEXDIGLC: an upper-case digit is not a traceparent (W3C test suite, OpenTelemetry)
    upper = RequestHeaders(("traceparent", later.upper()))
    assert request_trace_headers(upper) is None


def test_a_publish_with_an_oversized_tracestate_is_stored_with_a_bounded_one() -> None:
    """A client's trace headers never refuse its message (a 2 000-character tracestate was
    refused with 422)."""
    state = ",".join(f"vendor{i}=" + "x" * 60 for i in range(30))
    headers = RequestHeaders(("traceparent", PARENT), ("tracestate", state))
    extra = passthrough_headers(headers)
    assert extra is not None
    request = PublishRequest("orders", b"{}", "application/json", extra_headers=extra)
    stored = request.to_outbound(Tenant("acme")).headers
    assert stored["traceparent"] == PARENT
    assert len(stored["tracestate"]) <= MAX_TRACESTATE
    assert stored["tracestate"].startswith("vendor0=")


def test_extract_reads_the_tracestate_beside_its_traceparent_bounded() -> None:
    headers = {"ce-traceparent": PARENT, "ce-tracestate": "a=1, b=2", "tracestate": "other=1"}
    context = tracing.extract(headers)
    assert context is not None
    assert context.tracestate == "a=1,b=2"
    # 519 characters: cut at 512 it ended inside a member; now the last long member goes
    over = {"traceparent": PARENT, "tracestate": f"a={'x' * 255},b={'y' * 255},c=1"}
    assert tracing.extract(over).tracestate == f"a={'x' * 255},c=1"  # type: ignore[union-attr]
    invalid = {"traceparent": PARENT, "tracestate": "not a list"}
    assert tracing.extract(invalid).tracestate is None  # type: ignore[union-attr]


_KEY = st.from_regex(r"[a-z][a-z0-9_*/-]{0,20}", fullmatch=True)
_VALUE = st.from_regex(r"[\x21-\x2b\x2d-\x3c\x3e-\x7e]{1,150}", fullmatch=True)


@given(st.lists(st.tuples(_KEY, _VALUE), max_size=40, unique_by=lambda kv: kv[0]))
def test_what_is_kept_is_valid_bounded_and_kept_again_unchanged(
    members: list[tuple[str, str]],
) -> None:
    value = ",".join(f"{k}={v}" for k, v in members)
    kept = bounded_tracestate(value)
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        assert kept is None
        return
    if kept is None:  # every member was over 128 characters, and together over 512
        assert all(len(k) + len(v) > 127 for k, v in members)
        assert len(value) > MAX_TRACESTATE
        return
    assert len(kept) <= MAX_TRACESTATE
    assert bounded_tracestate(kept) == kept
    assert set(kept.split(",")) <= {f"{k}={v}" for k, v in members}
    if len(value) <= MAX_TRACESTATE:
        assert kept == value


@given(st.text(max_size=300))
def test_any_text_is_kept_valid_or_dropped(value: str) -> None:
    kept = bounded_tracestate(value)
    if kept is not None:
        assert len(kept) <= MAX_TRACESTATE
        assert kept.isascii()
        assert kept.isprintable()
        assert bounded_tracestate(kept) == kept


def test_parse_traceparent_reads_ids_and_the_sampled_flag() -> None:
    assert parse_traceparent(PARENT) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        True,
    )
    assert parse_traceparent(PARENT[:-2] + "00") is not None
    assert parse_traceparent("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None
