"""Conditions on registry requests, without a server: ``If-Match`` read and decided as
RFC 9110 (section 13.1.1) says, ``as_of`` read as RFC 3339 (section 5.6) and nothing else,
and ``broker agents apply`` taking only a 404 for an agent that is not there."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
import typer

from broker.cli import EXIT_REFUSED, EXIT_UNAVAILABLE
from broker.cli_agents import _registered
from broker.envelope import Tenant
from broker.errors import Unprocessable
from broker.http.agents import parse_as_of, parse_if_match
from broker.registry.commands import (
    IfMatch,
    precondition_holds,
    repeats_deregistration,
)
from broker.registry.events import RegistryEvent, RegistryEventType
from broker.registry.manifest import AgentName

pytestmark = pytest.mark.unit


def event(kind: RegistryEventType, seq: int) -> RegistryEvent:
    return RegistryEvent(kind, Tenant("acme"), AgentName("tr"), None, seq)


REGISTERED_AT_18 = event(RegistryEventType.UPDATED, 18)
DEREGISTERED_AT_19 = event(RegistryEventType.DEREGISTERED, 19)


# --- If-Match: what the header says ------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        ("", None),
        (" \t", None),
        ('"18"', IfMatch(tags=frozenset({"18"}))),
        (' "18" ', IfMatch(tags=frozenset({"18"}))),
        ("18", IfMatch(tags=frozenset({"18"}))),  # a bare seq, as the header once was
        ("*", IfMatch(wildcard=True)),
        (" * ", IfMatch(wildcard=True)),
        ('W/"18"', IfMatch()),  # weak: read, but it can never match
        ('"3", "18"', IfMatch(tags=frozenset({"3", "18"}))),
        ('W/"18",  "3"', IfMatch(tags=frozenset({"3"}))),
        ('"3",,"18",', IfMatch(tags=frozenset({"3", "18"}))),  # empty members are ignored
        ('"a,b", "18"', IfMatch(tags=frozenset({"a,b", "18"}))),  # a comma inside a tag
        ('""', IfMatch(tags=frozenset({""}))),
    ],
)
def test_if_match_is_read_as_rfc_9110_says(header: str, condition: IfMatch | None) -> None:
    assert parse_if_match(header) == condition


@pytest.mark.parametrize(
    "header",
    [
        "abc",
        '"18',
        '18"',
        "W/18",
        'w/"18"',  # W/ is case-sensitive
        '"18" "19"',
        '*, "18"',
        "**",
        ",",
        '"1 8"',  # a space is not an etagc
        '"18"x',
        "١٨",  # digits, but not ASCII ones
    ],
)
def test_a_malformed_if_match_is_unprocessable(header: str) -> None:
    with pytest.raises(Unprocessable):
        parse_if_match(header)


# --- If-Match: whether a write may go ahead --------------------------------------------


def test_a_strong_tag_matches_only_the_current_version() -> None:
    assert precondition_holds(IfMatch.seq(18), REGISTERED_AT_18)
    assert not precondition_holds(IfMatch.seq(17), REGISTERED_AT_18)
    assert not precondition_holds(IfMatch(tags=frozenset({"018"})), REGISTERED_AT_18)


def test_a_weak_tag_never_matches() -> None:
    """Strong comparison: ``W/"18"`` is not ``"18"``, even for an agent at 18."""
    weak = parse_if_match('W/"18"')
    assert weak is not None
    assert not precondition_holds(weak, REGISTERED_AT_18)
    assert not precondition_holds(weak, None)
    assert not repeats_deregistration(weak, 18)


def test_a_list_matches_when_any_member_does() -> None:
    listed = parse_if_match('W/"18", "7", "18"')
    assert listed is not None
    assert precondition_holds(listed, REGISTERED_AT_18)
    stale = parse_if_match('"7", W/"18"')
    assert stale is not None
    assert not precondition_holds(stale, REGISTERED_AT_18)


def test_a_star_matches_a_registered_agent_only() -> None:
    star = IfMatch(wildcard=True)
    assert precondition_holds(star, REGISTERED_AT_18)
    assert not precondition_holds(star, None)
    assert not precondition_holds(star, DEREGISTERED_AT_19)


def test_no_condition_always_holds_and_version_0_is_an_agent_never_seen() -> None:
    assert precondition_holds(None, None)
    assert precondition_holds(None, DEREGISTERED_AT_19)
    assert precondition_holds(IfMatch.seq(0), None)
    assert precondition_holds(IfMatch.seq(19), DEREGISTERED_AT_19)


def test_a_delete_repeats_a_deregistration_whose_replaced_version_it_names() -> None:
    """A retried conditional delete (its answer lost) is recognised by the version the
    deregistration replaced; ``*`` names no version and asks for a registered agent."""
    assert repeats_deregistration(IfMatch.seq(18), 18)
    assert repeats_deregistration(IfMatch(tags=frozenset({"3", "18"})), 18)
    assert not repeats_deregistration(IfMatch.seq(17), 18)
    assert not repeats_deregistration(IfMatch(wildcard=True), 18)
    assert not repeats_deregistration(None, 18)
    assert not repeats_deregistration(IfMatch.seq(18), None)


# --- as_of ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "moment"),
    [
        ("2026-11-26T12:00:00Z", datetime(2026, 11, 26, 12, tzinfo=UTC)),
        ("2026-11-26t12:00:00z", datetime(2026, 11, 26, 12, tzinfo=UTC)),
        ("2026-11-26T12:00:00.5Z", datetime(2026, 11, 26, 12, 0, 0, 500_000, tzinfo=UTC)),
        (
            "2026-11-26T12:00:00.123456789Z",  # cut to microseconds, never rounded up
            datetime(2026, 11, 26, 12, 0, 0, 123_456, tzinfo=UTC),
        ),
        (
            "2026-11-26T17:30:00+05:30",
            datetime(2026, 11, 26, 17, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        ),
        ("2026-11-26T07:00:00-05:00", datetime(2026, 11, 26, 12, tzinfo=UTC)),
        ("2026-11-26T12:00:00-00:00", datetime(2026, 11, 26, 12, tzinfo=UTC)),
        (
            "2016-12-31T23:59:60Z",  # a leap second: the last instant before it
            datetime(2016, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        ),
    ],
)
def test_as_of_takes_rfc_3339_date_times(value: str, moment: datetime) -> None:
    assert parse_as_of(value) == (None, moment)


def test_as_of_takes_a_stream_sequence() -> None:
    assert parse_as_of("42") == (42, None)


@pytest.mark.parametrize(
    "value",
    [
        "2026-W48-4",  # ISO 8601 week date
        "2026-W48-4T12:00:00Z",
        "20261126T120000Z",  # ISO 8601 basic format
        "2026-11-26T120000Z",
        "2026-330T12:00:00Z",  # ordinal date
        "2026-11-26",
        "2026-11-26T12:00Z",  # no seconds
        "2026-11-26T12Z",
        "2026-11-26T12:00:00",  # no offset
        "2026-11-26T12:00:00+0100",
        "2026-11-26T12:00:00+01",
        "2026-11-26 12:00:00Z",
        "2026-11-26T12:00:00,5Z",  # a comma before the fraction
        "2026-11-26T12:00:00.Z",
        "2026-11-26T12:00:00ZZ",
        " 2026-11-26T12:00:00Z",
        "2026-11-26T12:00:00Z\n",
        "+2026-11-26T12:00:00Z",
        "2026-11-26T12:00:00+24:00",
        "2026-11-26T12:00:00+01:60",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-11-26T24:00:00Z",
        "2026-11-26T12:61:00Z",
        "0000-01-01T00:00:00Z",
        "\uff12\uff10\uff12\uff16-11-26T12:00:00Z",  # full-width digits
        "²",
        "yesterday",
        "",
    ],
)
def test_as_of_refuses_what_is_not_rfc_3339(value: str) -> None:
    with pytest.raises(Unprocessable, match="as_of"):
        parse_as_of(value)


# --- broker agents apply: reading the agent first -----------------------------------------


def test_apply_reads_only_a_404_as_an_agent_not_registered() -> None:
    assert _registered(httpx.Response(404, json={"error_code": "not_found"})) is None
    record = {"name": "tr", "version": "1", "seq": 18, "updated_at": "t", "manifest": {}}
    assert _registered(httpx.Response(200, json=record)) == record


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, EXIT_REFUSED), (403, EXIT_REFUSED), (503, EXIT_UNAVAILABLE), (500, EXIT_UNAVAILABLE)],
)
def test_apply_stops_when_the_agent_cannot_be_read(
    status: int, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Taking a refused or failed read for an absent agent would put without If-Match."""
    answer = {"error_code": "whatever", "message": "the broker said no"}
    with pytest.raises(typer.Exit) as exited:
        _registered(httpx.Response(status, json=answer))
    assert exited.value.exit_code == code
    assert "the broker said no" in capsys.readouterr().err
