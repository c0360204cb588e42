"""RFC 3339 date-times in query parameters (``as_of``, ``start_time``).

FastAPI's ``datetime`` parameters go through pydantic, which also takes Unix numbers
(``start_time=1700000000``), dates without a time, a space for the ``T`` and a missing
offset. The API documents RFC 3339 (section 5.6) with an offset, and this module takes
exactly that, so an ambiguous value is a 422 instead of a guess.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from broker.errors import Unprocessable

#: RFC 3339 (section 5.6) date-time; ``T`` and ``Z`` may be lowercase, the offset is required.
_DATE_TIME = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})[Tt]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?"
    r"(?:[Zz]|(?P<sign>[+-])(?P<off_hour>[0-9]{2}):(?P<off_minute>[0-9]{2}))"
)

#: What a client is told to send.
EXAMPLES = "e.g. 2026-11-24T10:00:00Z or 2026-11-24T11:00:00.5+01:00"


def parse_date_time(value: str, *, name: str, expected: str | None = None) -> datetime:
    """``value`` as an aware datetime; 422 naming ``name`` when it is not RFC 3339.

    A leap second (``:60``) reads as the last microsecond before it, and a fraction's digits
    beyond microseconds are cut: either way the events stored by then are exactly those kept
    (the stream's times have microseconds at most). ``expected`` replaces the default
    description of what the parameter takes in the message."""
    parts = _DATE_TIME.fullmatch(value)
    if parts is None:
        raise Unprocessable(
            expected or f"{name} is an RFC 3339 date-time with an offset, {EXAMPLES}"
        )
    hours, minutes = int(parts["off_hour"] or 0), int(parts["off_minute"] or 0)
    second, micro = int(parts["second"]), int((parts["fraction"] or "")[:6].ljust(6, "0"))
    if second == 60:
        second, micro = 59, 999_999
    try:
        if hours > 23 or minutes > 59:
            raise ValueError("offset out of range")
        offset = timedelta(hours=hours, minutes=minutes) * (-1 if parts["sign"] == "-" else 1)
        return datetime(
            int(parts["year"]),
            int(parts["month"]),
            int(parts["day"]),
            int(parts["hour"]),
            int(parts["minute"]),
            second,
            micro,
            tzinfo=timezone(offset) if offset else UTC,
        )
    except ValueError:
        raise Unprocessable(f"{name} {value!r} is not a valid date and time") from None
