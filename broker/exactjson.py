"""JSON parsed with every digit of its integers.

orjson, the broker's parser, reads an integer outside 64 bits (below ``-2**63`` or above
``2**64 - 1``) as a float, its last digits lost, and refuses one past a double's range.
Where the broker stores or shows a parsed value again (batch records, structured
CloudEvents, decoded replays, the replica), :func:`loads_exact` keeps such an integer as an
``orjson.Fragment`` of its digits, which ``orjson.dumps`` writes back as it was.

Only a text with 20 digits in a row somewhere (``2**64`` has 20) can hold one; the C
accelerator's ``digit_run`` looks for that run (about 0.1 µs for 256 bytes; without it, a
``bytes.translate`` and a substring search, about four times that). Such a text is parsed
by Python's ``json`` instead of orjson, with what orjson refuses refused too (``NaN``,
``Infinity``, numbers past a double, a BOM, UTF-16).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["loads_exact"]

#: Digits in a row where an integer past 64 bits can be.
_LONG_RUN = 20
#: Each digit as ``0``, any other byte as a space: a run of digits is a run of zeros.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))


def python_digit_run(data: bytes, length: int) -> bool:
    """Whether ``data`` holds ``length`` ASCII digits in a row (the C accelerator's
    ``digit_run``, in Python)."""
    return b"0" * length in data.translate(_DIGITS_AS_ZEROS)


def _first_digit_run(data: bytes, length: int) -> bool:
    """The accelerator's ``digit_run`` where it is built, bound at first use: importing it
    imports :mod:`broker.codecs`, which every user of :mod:`broker.envelope` (the CLI
    among them) would otherwise pay for at start."""
    global _digit_run  # noqa: PLW0603 - bound once, read on every parse
    from broker.codecs._accelerator import accelerator

    module = accelerator()
    _digit_run = python_digit_run if module is None else module.digit_run
    return _digit_run(data, length)


_digit_run: Callable[[bytes, int], bool] = _first_digit_run
_SMALLEST, _LARGEST = -(2**63), 2**64 - 1
#: Python's own bound on the digits of an int it reads from text (3.11's default, fixed
#: here so that a lowered ``sys.set_int_max_str_digits`` changes nothing).
_MAX_DIGITS = 4300


def _integer(text: str) -> int | orjson.Fragment:
    if len(text) > _MAX_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is past {_MAX_DIGITS}")
    value = int(text)
    if _SMALLEST <= value <= _LARGEST:
        return value
    return orjson.Fragment(text)  # written back by orjson as these digits


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is past a double's range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_exact(raw: bytes) -> Any:
    """``orjson.loads(raw)``, except that an integer past 64 bits is an ``orjson.Fragment``
    of its digits. ``ValueError`` (``orjson.JSONDecodeError`` among them) when ``raw`` is
    not JSON."""
    if not _digit_run(raw, _LONG_RUN):
        return orjson.loads(raw)
    try:
        # Decoded first: given bytes, json would also take UTF-16 and UTF-32, orjson never.
        text = raw.decode()
        return json.loads(
            text, parse_int=_integer, parse_float=_finite, parse_constant=_no_constant
        )
    except RecursionError:
        raise ValueError("nested too deep") from None
