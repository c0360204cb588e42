"""The records of a JSON-array batch, bounded before they are built.

``orjson.loads`` of a whole batch builds every value at once: 16 MiB of ``[{},{},…]`` is 5.6
million dicts, about 500 MB, and a batch of one record holding ``[[],[],…]`` the same; both
are refused only afterwards (too many records, a record too large). :func:`array_records`
counts the commas first (C speed): a batch with few separators can hold only few values, so
it is parsed whole as before. A dense one is scanned instead, token by token, for the
boundaries of its top-level elements. The scan stops at the first record past the count
limit or the first record longer than the size limit, and then each record is parsed on its
own, so at most one record's values exist at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from broker.errors import BadRequest, PayloadTooLarge
from broker.exactjson import loads_exact

#: Values a batch may hold per record it may hold before it is scanned instead of parsed
#: whole: at ~100 bytes a value, 10,000 records cost at most ~64 MB of parsed values.
DENSE_VALUES_PER_RECORD = 64
# A string (escapes included), or a structural byte: all the scan needs to track nesting;
# or a quote alone, where a string is never closed: the scan refuses the batch there. The
# string's quantifiers are possessive, so finding it unclosed is one pass to the end of the
# body. (Without the lone quote, an unclosed one was skipped and the search tried again at
# the next quote, each time to the end: 1 500 escaped quotes before 640 000 commas, a
# 643 kB body, blocked the event loop for 12 s.)
_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"|"|[\[\]{},]', re.DOTALL)
_QUOTE, _COMMA = ord('"'), ord(",")
_CLOSER = {b"["[0]: b"]"[0], b"{"[0]: b"}"[0]}  # an opening bracket's closing one
_CLOSES = frozenset(b"]}")
_OPENING = re.compile(rb"[ \t\r\n]*\[")
_WHITESPACE = b" \t\r\n"  # JSON's; bytes.strip() would also take \x0b and \x0c

NOT_AN_ARRAY = "a JSON batch must be an array of records"


def array_records(body: bytes, max_records: int, record_limit: int) -> Iterator[Any]:
    """The records of a JSON-array batch, handed out one at a time.

    :class:`BadRequest` when the body is not a JSON array (nothing is published then), and
    :class:`PayloadTooLarge` when it holds more than ``max_records`` records or, in a dense
    body, a record longer than ``record_limit`` bytes.
    """
    if body.count(b",") < DENSE_VALUES_PER_RECORD * max_records:
        return _parsed_whole(body, max_records)
    return _checked(body, max_records, record_limit)


def _checked(body: bytes, max_records: int, record_limit: int) -> Iterator[Any]:
    """The records of a dense body: found by :func:`_spans`, each parsed once to check the
    whole batch is valid (one record's values at a time), then again as it is handed out."""
    spans = _spans(body, max_records, record_limit)
    for i, (start, end) in enumerate(spans):  # all valid, or nothing is published
        try:
            loads_exact(body[start:end])
        except ValueError as e:
            raise BadRequest(f"the batch is not valid JSON: record {i}: {e}") from None
    return (loads_exact(body[start:end]) for start, end in spans)


def _parsed_whole(body: bytes, max_records: int) -> Iterator[Any]:
    try:
        parsed = loads_exact(body)
    except ValueError as e:
        raise BadRequest(f"the batch is not valid JSON: {e}") from None
    if not isinstance(parsed, list):
        raise BadRequest(NOT_AN_ARRAY)
    if len(parsed) > max_records:
        raise PayloadTooLarge(f"batch has {len(parsed)} records; the limit is {max_records}")
    parsed.reverse()  # handed out from the end, so each is dropped once it is used
    return (parsed.pop() for _ in range(len(parsed)))


def _spans(body: bytes, max_records: int, record_limit: int) -> list[tuple[int, int]]:
    """(start, end) of each top-level element, from the array's own commas and brackets."""
    opening = _OPENING.match(body)
    if opening is None:
        raise BadRequest(NOT_AN_ARRAY)
    spans: list[tuple[int, int]] = []
    start = opening.end()  # where the current element begins
    closers = [_CLOSER[b"["[0]]]  # the bracket each open one needs, innermost last
    for token in _TOKEN.finditer(body, start):
        at = token.start()
        if token.end() - start > record_limit:
            raise PayloadTooLarge(f"record {len(spans)} exceeds {record_limit} bytes")
        byte = body[at]
        if byte == _QUOTE:
            if token.end() == at + 1:
                raise BadRequest("the batch is not valid JSON: a string is not closed")
            continue
        if byte in _CLOSER:
            closers.append(_CLOSER[byte])
        elif byte in _CLOSES:
            if byte != closers.pop():
                raise BadRequest("the batch is not valid JSON: a bracket closes another kind")
            if not closers:
                if spans or body[start:at].strip(_WHITESPACE):  # not the empty array
                    spans.append((start, at))
                if body[at + 1 :].strip(_WHITESPACE):
                    raise BadRequest("the batch is not valid JSON: data after the array")
                return spans
        elif byte == _COMMA and len(closers) == 1:
            spans.append((start, at))
            start = at + 1
            if len(spans) >= max_records:
                raise PayloadTooLarge(f"batch has more than {max_records} records, the limit")
    raise BadRequest("the batch is not valid JSON: the array is not closed")
