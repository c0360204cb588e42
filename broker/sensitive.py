"""Payment card numbers in payloads: find them (Luhn-checked), redact them to the last four.

What counts as a card number
----------------------------
A **run** is digits with at most one space or dash between neighbours (``4242424242424242``,
``4242 4242 4242 4242``, ``3782-822463-10005``). Inside a run, a candidate is either

* one unbroken group of 13 to 19 digits, or
* two or more consecutive groups of 3 to 8 digits each, 13 to 19 digits together (the
  ways people group a number: 4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3, ...),

whose digits pass the Luhn check **and** whose length and leading digits fall in an issuer
range of :data:`ISSUER_RANGES`. Among the candidates starting at one group the longest
wins, and the search goes on after it.

What is deliberately *not* a card:

* **long digit runs**: an unbroken group of more than 19 digits (a 40-digit id, a hash
  in decimal) is never looked into for a shorter card inside it, and a grouped candidate
  never takes a group of more than 8 digits;
* **digits glued to a word**: a run directly after or before an ASCII letter or ``_``
  (``id4242424242424242``, hex strings) loses that end group; so does a run after ``+``
  (E.164 phone numbers), and one next to a decimal point with a digit on its other side
  (``0.4242424242424242``, ``4242424242424242.50``);
* **timestamps and most ids**: no accepted range starts with 0, 1, 7 or 8 (UATP, which
  starts with 1, is left out on purpose), so Unix times in seconds, milliseconds,
  microseconds or nanoseconds (all led by ``1`` until 2033) are never cards, Luhn or not;
  a random 16-digit id in an accepted range is still flagged about one time in ten (the
  Luhn check's rate) — the price of not missing real numbers.

A card number written right next to other digit groups (``"qty 12 4242 4242 4242 4242"``)
is matched together with them when the longer window also passes; it is still removed.

Redaction
---------
Each card becomes ``[card ****4242]`` (:func:`mask`): the last four digits stay, so a
person can tell which card it was, and nothing else does. The brackets keep the kept
digits from joining neighbouring digits, so redacting twice changes nothing more. In JSON,
strings and **numbers** are both searched (``{"pan": 4242424242424242}`` is a card too; it
becomes the string ``"[card ****4242]"``), object keys as well (keys that would mask alike
are told apart by ``#2``, ``#3``, ..., so no member is lost); the output stays valid JSON
and, where it can, byte-identical outside the numbers (:func:`redact_json`). A JSON number
is a card when it is a whole number that is one, however it is written
(``4242424242424242.0``, ``42424242424242.42e2``); a float above 2**53 has lost its last
digits, which only the JSON text still has (see :func:`redact_value`).

Results (:class:`Scan`, :class:`CardFinding`) carry the count, brand, last four digits,
length and where each number was (JSON Pointer, offsets), never the number itself.

Bounds
------
No regular expression searches the text for cards, so there is nothing to backtrack (the
two that read JSON numbers match without retrying: see :data:`_NUMBER`). The text is
mapped to one class byte per character (digit, separator, other) with ``bytes.translate``,
and substring searches in C find the only places a card can be: 13 digits in a row, or two
groups of 3+ digits with one separator between them. Only those runs reach Python code,
and each is looked at once, windows of at most 19 digits, so time is linear in the text.
Most runs in real payloads (timestamps, fractions, ids) are dropped on their first two
digits. At most :data:`MAX_SCAN_CHARS` characters of one text are scanned
(``Scan.truncated`` says when more were there), and JSON is walked at most
:data:`MAX_JSON_DEPTH` levels deep.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final, Generic, TypeVar

import orjson

__all__ = [
    "ISSUER_RANGES",
    "MAX_JSON_DEPTH",
    "MAX_SCAN_CHARS",
    "CardBrand",
    "CardFinding",
    "Redacted",
    "Scan",
    "card_brand",
    "find_cards",
    "json_may_hold_card",
    "luhn_valid",
    "mask",
    "redact_json",
    "redact_text",
    "redact_value",
    "text_may_hold_card",
]

T = TypeVar("T")

#: Longest text scanned at once (characters; bytes for :func:`redact_json` and payloads).
MAX_SCAN_CHARS: Final = 1024 * 1024
#: Deepest JSON nesting :func:`redact_value` walks (Python recursion stays far below its limit).
MAX_JSON_DEPTH: Final = 256
MIN_DIGITS: Final = 13
MAX_DIGITS: Final = 19
_MIN_GROUP, _MAX_GROUP = 3, 8


class CardBrand(StrEnum):
    """The card schemes whose issuer ranges are accepted."""

    AMEX = "amex"
    DINERS = "diners"
    DISCOVER = "discover"
    JCB = "jcb"
    MAESTRO = "maestro"
    MASTERCARD = "mastercard"
    MIR = "mir"
    RUPAY = "rupay"
    TROY = "troy"
    UNIONPAY = "unionpay"
    VERVE = "verve"
    VISA = "visa"


def _lengths(low: int, high: int) -> frozenset[int]:
    return frozenset(range(low, high + 1))


#: ``(brand, first digits from, first digits to, card lengths)``: the issuer (IIN) ranges
#: accepted, the more specific before the broader ones that contain them.
ISSUER_RANGES: Final[tuple[tuple[CardBrand, str, str, frozenset[int]], ...]] = (
    (CardBrand.MIR, "2200", "2204", _lengths(16, 19)),
    (CardBrand.MASTERCARD, "2221", "2720", frozenset({16})),
    (CardBrand.DINERS, "300", "305", _lengths(14, 19)),
    (CardBrand.DINERS, "3095", "3095", _lengths(14, 19)),
    (CardBrand.AMEX, "34", "34", frozenset({15})),
    (CardBrand.JCB, "3528", "3589", _lengths(16, 19)),
    (CardBrand.DINERS, "36", "36", _lengths(14, 19)),
    (CardBrand.AMEX, "37", "37", frozenset({15})),
    (CardBrand.DINERS, "38", "39", _lengths(14, 19)),
    (CardBrand.VISA, "4", "4", frozenset({13, 16, 19})),
    (CardBrand.MAESTRO, "5018", "5018", _lengths(13, 19)),
    (CardBrand.MAESTRO, "5020", "5020", _lengths(13, 19)),
    (CardBrand.MAESTRO, "5038", "5038", _lengths(13, 19)),
    (CardBrand.VERVE, "506099", "506198", frozenset({16, 19})),
    (CardBrand.RUPAY, "508", "508", frozenset({16})),
    (CardBrand.MASTERCARD, "51", "55", frozenset({16})),
    (CardBrand.MAESTRO, "5893", "5893", _lengths(13, 19)),
    (CardBrand.DISCOVER, "6011", "6011", _lengths(16, 19)),
    (CardBrand.RUPAY, "60", "60", frozenset({16})),
    (CardBrand.UNIONPAY, "62", "62", _lengths(16, 19)),
    (CardBrand.MAESTRO, "6304", "6304", _lengths(13, 19)),
    (CardBrand.DISCOVER, "644", "649", _lengths(16, 19)),
    (CardBrand.VERVE, "650002", "650027", frozenset({16, 19})),
    (CardBrand.DISCOVER, "65", "65", _lengths(16, 19)),
    (CardBrand.MAESTRO, "6759", "6759", _lengths(13, 19)),
    (CardBrand.MAESTRO, "6761", "6763", _lengths(13, 19)),
    (CardBrand.TROY, "9792", "9792", frozenset({16})),
)

#: The ranges by leading digit, for one short list per lookup.
_RANGES_BY_LEAD: Final[dict[str, tuple[tuple[CardBrand, str, str, frozenset[int]], ...]]] = {
    lead: tuple(r for r in ISSUER_RANGES if r[1][0] == lead) for lead in "0123456789"
}
#: Every two-digit start some range allows: most digit runs (timestamps, ids, fractions)
#: are passed over on their first two digits.
_LEAD2: Final = frozenset(
    f"{p:02d}"
    for p in range(100)
    for _, low, high, _ in ISSUER_RANGES
    if low[:2].ljust(2, "0") <= f"{p:02d}" <= high[:2].ljust(2, "9")
)
_LEAD2B: Final = frozenset(lead.encode() for lead in _LEAD2)
#: Luhn: a doubled digit's digit sum.
_DOUBLED: Final = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)

#: Each byte as its class: an ASCII digit is ``0``, a space or dash ``-``, anything else
#: ``x``. A text's classes (one ``bytes.translate``) let C-speed substring searches find the
#: few places a card can be: ``_LONG`` (13 digits in a row) or ``_PAIR`` (two groups of at
#: least 3 digits with one separator between them), which every candidate holds.
_CLASS: Final = bytes(
    0x30 if 0x30 <= b <= 0x39 else 0x2D if b in {0x20, 0x2D} else 0x78 for b in range(256)
)
_LONG: Final = b"0" * 13
_PAIR: Final = b"000-000"
_WORD: Final = frozenset("0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGITS: Final = frozenset("0123456789")


def luhn_valid(digits: str) -> bool:
    """Whether ``digits`` (ASCII digits only) pass the Luhn (mod 10) check."""
    total = sum(ord(c) - 48 for c in digits[-1::-2])
    total += sum(_DOUBLED[ord(c) - 48] for c in digits[-2::-2])
    return total % 10 == 0


def _check_digit(partial: str) -> int:
    """The digit that makes ``partial`` followed by it pass the Luhn check."""
    total = sum(_DOUBLED[ord(c) - 48] for c in partial[-1::-2])
    total += sum(ord(c) - 48 for c in partial[-2::-2])
    return -total % 10


def card_brand(digits: str) -> CardBrand | None:
    """The scheme whose issuer range and lengths ``digits`` fit (Luhn not checked)."""
    size = len(digits)
    for brand, low, high, lengths in _RANGES_BY_LEAD.get(digits[:1], ()):
        if size in lengths and low <= digits[: len(low)] <= high:
            return brand
    return None


def _card(digits: str) -> CardBrand | None:
    """The brand of a card number, or ``None`` if ``digits`` are not one."""
    if not MIN_DIGITS <= len(digits) <= MAX_DIGITS or digits[:2] not in _LEAD2:
        return None
    brand = card_brand(digits)
    if brand is None or not luhn_valid(digits):
        return None
    return brand


def mask(last4: str) -> str:
    """What a card number is replaced with: ``[card ****4242]``."""
    return f"[card ****{last4}]"


@dataclass(frozen=True, slots=True)
class CardFinding:
    """One card number found: where, which scheme, the last four digits; never the number.

    ``start``/``end`` are character offsets of the number (separators included) in the
    scanned text, or in the JSON string or number at ``path`` (a JSON Pointer, ``""`` for
    the document itself; ``None`` in plain text). ``key`` is true when the number was in
    an object key (``path`` then points at that member). In a JSON number, the offsets are
    those of its digits written out as a whole number, and ``last4`` is ``????`` for a float
    that lost them (see :func:`redact_value`).
    """

    brand: CardBrand
    last4: str
    digits: int
    start: int
    end: int
    path: str | None = None
    key: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON object for audit records and logs."""
        found: dict[str, Any] = {
            "brand": str(self.brand),
            "last4": self.last4,
            "digits": self.digits,
        }
        if self.path is not None:
            found["path"] = self.path
            if self.key:
                found["key"] = True
        found["start"], found["end"] = self.start, self.end
        return found


@dataclass(frozen=True, slots=True)
class Scan:
    """What a scan found. ``truncated``: the text was longer than the scan bound, and only
    its first :data:`MAX_SCAN_CHARS` characters were searched."""

    findings: tuple[CardFinding, ...] = ()
    truncated: bool = False

    @property
    def count(self) -> int:
        return len(self.findings)

    def __bool__(self) -> bool:
        return bool(self.findings)


NOTHING: Final = Scan()


@dataclass(frozen=True, slots=True)
class Redacted(Generic[T]):
    """A redacted value (the original object itself when nothing was found) and its scan."""

    value: T
    scan: Scan = field(default=NOTHING)


# --- text ------------------------------------------------------------------------------


def _left_open(text: str, start: int) -> bool:
    """Whether a run may begin at ``start``: not glued to a word, a ``+`` or a decimal."""
    if start == 0:
        return True
    before = text[start - 1]
    if before in _WORD or before == "+":
        return False
    return not (before == "." and start >= 2 and text[start - 2] in _DIGITS)


def _right_open(text: str, end: int) -> bool:
    """Whether a run may end at ``end`` (exclusive)."""
    if end >= len(text):
        return True
    after = text[end]
    if after in _WORD:
        return False
    return not (after == "." and end + 1 < len(text) and text[end + 1] in _DIGITS)


#: A card number in a text: start, end (exclusive), its digits, its brand.
_Hit = tuple[int, int, str, CardBrand]


def _in_run(text: str, start: int, end: int, strict: bool) -> Iterator[_Hit]:
    """The card numbers in the run ``text[start:end]``."""
    run = text[start:end]
    left, right = (_left_open(text, start), _right_open(text, end)) if strict else (True, True)
    if run.isdigit():  # one unbroken group: the common case
        brand = _card(run) if left and right else None
        if brand is not None:
            yield start, end, run, brand
        return
    parts = run.replace("-", " ").split(" ")
    if len(run) - len(parts) + 1 < MIN_DIGITS:  # fewer digits than any card has
        return
    groups: list[tuple[int, str]] = []
    offset = start
    for part in parts:
        groups.append((offset, part))
        offset += len(part) + 1
    last = len(groups) - 1
    i = 0
    while i <= last:
        if (i == 0 and not left) or (i == last and not right):
            i += 1
            continue
        g_start, digits = groups[i]
        best: tuple[int, str, CardBrand] | None = None
        if len(digits) >= MIN_DIGITS:
            brand = _card(digits)
            if brand is not None:
                best = (i, digits, brand)
        elif _MIN_GROUP <= len(digits) <= _MAX_GROUP:  # grow a window of groups
            j = i
            while j < last:
                following = groups[j + 1][1]
                if (
                    not _MIN_GROUP <= len(following) <= _MAX_GROUP
                    or len(digits) + len(following) > MAX_DIGITS
                    or (j + 1 == last and not right)
                ):
                    break
                j += 1
                digits += following
                brand = _card(digits) if len(digits) >= MIN_DIGITS else None
                if brand is not None:
                    best = (j, digits, brand)  # the longest window from group i wins
        if best is None:
            i += 1
            continue
        last_group, digits, brand = best
        end_at, end_group = groups[last_group]
        yield g_start, end_at + len(end_group), digits, brand
        i = last_group + 1


def _classes(data: bytes) -> bytes:
    """The class bytes of ``data``, a double separator made ``xx`` (it breaks a run as any
    other character does), so that ``x`` alone marks where runs end."""
    classes = data.translate(_CLASS)
    return classes.replace(b"--", b"xx") if b"--" in classes else classes


def _text_classes(text: str, limit: int) -> bytes:
    """The class bytes of ``text[:limit]`` (a character outside Latin-1 is one ``x``)."""
    return _classes(text[:limit].encode("latin-1", "replace"))


def _runs(classes: bytes, first: tuple[int, int] | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each maximal run that holds a ``_LONG`` or a ``_PAIR``: the only
    runs that can hold a card number. Every step is a C-speed search. ``first``: where the
    first ``_LONG`` and ``_PAIR`` are, when the caller has looked already."""
    next_long, next_pair = first or (classes.find(_LONG), classes.find(_PAIR))
    while next_long >= 0 or next_pair >= 0:
        at = next_pair if next_long < 0 or 0 <= next_pair < next_long else next_long
        start = classes.rfind(b"x", 0, at) + 1
        if classes[start] != 0x30:  # a separator right after the break
            start += 1
        end = classes.find(b"x", at)
        if end < 0:
            end = len(classes)
        if classes[end - 1] != 0x30:  # a separator right before the break
            end -= 1
        yield start, end
        if 0 <= next_long < end:
            next_long = classes.find(_LONG, end)
        if 0 <= next_pair < end:
            next_pair = classes.find(_PAIR, end)


def _hits_in(text: str, classes: bytes, strict: bool = True) -> Iterator[_Hit]:
    for start, end in _runs(classes):
        if (
            classes[start:end] == _LONG[: end - start]  # one unbroken group (fast path)
            and not (MIN_DIGITS <= end - start <= MAX_DIGITS and text[start : start + 2] in _LEAD2)
        ):
            continue
        yield from _in_run(text, start, end, strict)


def _hits(text: str, limit: int, strict: bool = True) -> Iterator[_Hit]:
    """The card numbers in ``text[:limit]``."""
    return _hits_in(text, _text_classes(text, limit), strict)


def _finding(hit: _Hit, path: str | None = None, key: bool = False) -> CardFinding:
    start, end, digits, brand = hit
    return CardFinding(brand, digits[-4:], len(digits), start, end, path, key)


def text_may_hold_card(text: str) -> bool:
    """A cheap test: ``False`` means ``text`` holds no card number (it has neither 13
    digits in a row nor two groups of 3+ digits with one separator between them); ``True``
    means it might."""
    if len(text) < MIN_DIGITS:
        return False
    return next(_runs(_text_classes(text, MAX_SCAN_CHARS)), None) is not None


def find_cards(text: str, *, max_chars: int = MAX_SCAN_CHARS) -> Scan:
    """The card numbers in the first ``max_chars`` characters of ``text``."""
    findings = tuple(_finding(h) for h in _hits(text, max_chars))
    return Scan(findings, len(text) > max_chars)


def _splice(text: str, hits: list[_Hit]) -> str:
    parts: list[str] = []
    done = 0
    for start, end, digits, _ in hits:
        parts += (text[done:start], mask(digits[-4:]))
        done = end
    parts.append(text[done:])
    return "".join(parts)


def redact_text(text: str, *, max_chars: int = MAX_SCAN_CHARS) -> Redacted[str]:
    """``text`` with each card number in its first ``max_chars`` characters masked."""
    hits = list(_hits(text, max_chars))
    truncated = len(text) > max_chars
    if not hits:
        return Redacted(text, Scan((), truncated))
    return Redacted(_splice(text, hits), Scan(tuple(_finding(h) for h in hits), truncated))


def _redact_bytes(data: bytes) -> Redacted[bytes]:
    """Bytes redacted as text (Latin-1 keeps every byte and offset as it is)."""
    done = redact_text(data.decode("latin-1"))
    if not done.scan:
        return Redacted(data, done.scan)
    return Redacted(done.value.encode("latin-1"), done.scan)


# --- JSON --------------------------------------------------------------------------------


def _pointer(path: list[str | int]) -> str:
    """An RFC 6901 JSON Pointer."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


class _TooDeep(ValueError):
    pass


#: From here up, a float no longer holds every whole number: whole numbers ``ulp`` apart.
_EXACT_FLOAT: Final = 2**53
#: What stands for the last four digits of a card number that a float lost (see
#: :meth:`_Walk._float`).
_LOST: Final = "????"
#: A JSON number's digits, point and exponent (no sign). In a JSON text every number is one
#: match; so are digits inside strings, which only adds numbers. Linear: nothing to retry.
_NUMBER: Final = re.compile(rb"[0-9][0-9.]*(?:[eE][-+]?[0-9]+)?")


def _whole_literals(source: bytes) -> dict[float, str]:
    """Each float of 2**53 to 10**19 that a number in the JSON text ``source`` decodes to,
    and the digits of the first card number written for it (``""`` when none is one)."""
    written: dict[float, str] = {}
    for match in _NUMBER.finditer(source):
        literal = match.group()
        try:
            decoded = float(literal)
        except ValueError:  # "1.2.3" in a string
            continue
        if not _EXACT_FLOAT <= decoded < 1e19 or written.get(decoded):
            continue
        exact = Decimal(literal.decode("ascii"))
        whole = int(exact)
        digits = str(whole)
        written[decoded] = digits if exact == whole and _card(digits) is not None else ""
    return written


@functools.lru_cache(maxsize=1024)
def _card_decoding_to(whole: float) -> str | None:
    """A card number that decodes to ``whole`` (a float of 2**53 or more), if one does.

    Those are among the ``ulp`` or so whole numbers around ``whole`` (up to 2 049 below
    10**19), and only six are tried: in each of the three decades (``10q`` to ``10q + 9``)
    at either end, the one number that passes Luhn (only its last, undoubled digit
    differs). A brand depends on the length and first six digits only, so it changes at
    most once in the interval (at a multiple of 10**10). A card on one side of that change
    is in one of the three decades at its end of the interval, or lies beyond them, and
    then the whole second decade is on its side, with a card of that brand in it.
    """
    exact = int(whole)
    half = int(math.ulp(whole)) // 2
    low, high = exact - half, exact + half
    if float(low) != whole:  # a tie rounds to the even neighbour
        low += 1
    if float(high) != whole:
        high -= 1
    first, last = low // 10, high // 10
    for decade in (first, first + 1, first + 2, last - 2, last - 1, last):
        number = decade * 10 + _check_digit(str(decade))
        digits = str(number)
        if low <= number <= high and _card(digits) is not None:
            return digits
    return None


class _Walk:
    """One walk over a decoded JSON value, collecting findings and copying what changes."""

    __slots__ = ("findings", "max_depth", "path", "source", "truncated", "written")

    def __init__(self, max_depth: int, source: bytes | None = None) -> None:
        self.findings: list[CardFinding] = []
        self.path: list[str | int] = []
        self.max_depth = max_depth
        self.truncated = False
        self.source = source
        #: The card number written in ``source`` for each float above 2**53, ``""`` for
        #: none (built once, when the first such float is judged).
        self.written: dict[float, str] | None = None

    def _mask(self, text: str) -> tuple[str, list[_Hit]]:
        """``text`` masked, and the card numbers in it (with none, ``text`` itself)."""
        if len(text) < MIN_DIGITS:
            return text, []
        if len(text) > MAX_SCAN_CHARS:
            self.truncated = True
        hits = list(_hits(text, MAX_SCAN_CHARS))
        return (_splice(text, hits), hits) if hits else (text, hits)

    def string(self, text: str) -> str:
        """``text`` masked; its findings point at the current path."""
        masked, hits = self._mask(text)
        if hits:
            where = _pointer(self.path)
            self.findings += (_finding(h, where) for h in hits)
        return masked

    def _renamed(self, names: Collection[Any]) -> dict[str, tuple[str, list[_Hit]]]:
        """The keys that hold a card number: each one's stored name, and the numbers.

        Different numbers with the same last four digits mask alike, and a masked key may
        read like another key of the object. Keys without a number keep their names; a
        masked key that is already taken gets the first free ``#2``, ``#3``, ... appended,
        in document order, so no member overwrites another and a rebuild names them the
        same. The suffix is an ordinal: it tells nothing about the number.
        """
        renamed: dict[str, tuple[str, list[_Hit]]] = {}
        for name in names:
            if type(name) is str and len(name) >= MIN_DIGITS:
                masked, hits = self._mask(name)
                if hits:
                    renamed[name] = (masked, hits)
        if not renamed:  # the common case
            return renamed
        taken = {name for name in names if name not in renamed}
        tried: dict[str, int] = {}  # per masked name, the last suffix tried: linear time
        for name, (masked, hits) in renamed.items():
            n = tried.get(masked, 1)
            stored = masked if n == 1 else f"{masked}#{n}"
            while stored in taken:
                n += 1
                stored = f"{masked}#{n}"
            tried[masked] = n
            taken.add(stored)
            renamed[name] = (stored, hits)
        return renamed

    def _number(self, value: int | float, sign: str, digits: str, last4: str = "") -> Any:
        """``value``, a JSON number that is the whole number ``sign + digits``, masked if
        that is a card number (``last4`` stands for its last four digits if given)."""
        brand = _card(digits)
        if brand is None:
            return value
        last4 = last4 or digits[-4:]
        start = len(sign)
        where = _pointer(self.path)
        self.findings.append(
            CardFinding(brand, last4, len(digits), start, start + len(digits), where)
        )
        return mask(last4)

    def _float(self, value: float) -> Any:
        """A whole float of 13 to 19 digits masked if a card number was written for it.

        Below 2**53 a float holds its whole number exactly: those are its digits. Above,
        the whole numbers around it decode to the same float (up to 2 049 of them below
        10**19). The numbers written for it in the JSON text, when there is one, are judged,
        then its digits as stored (the shortest that decode to it, as orjson writes them);
        without the text, any card number that decodes to this float may have been
        written, and the float is masked as ``[card ****????]``: its last digits are lost.
        """
        whole = abs(value)
        sign = "-" if value < 0 else ""
        if whole < _EXACT_FLOAT:
            return self._number(value, sign, str(int(whole)))
        written: str | None = None
        if self.source is not None:
            if self.written is None:
                self.written = _whole_literals(self.source)
            written = self.written.get(whole)
            if written:
                return self._number(value, sign, written)
        masked = self._number(value, sign, str(int(Decimal(repr(whole)))))
        if masked is not value or written is not None:  # its digits are known: no card
            return masked
        possible = _card_decoding_to(whole)
        if possible is None:
            return value
        return self._number(value, sign, possible, _LOST)

    def value(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is str:
            return self.string(value)
        if kind is int:
            if -(10**12) < value < 10**12:  # fewer than 13 digits
                return value
            return self._number(value, "-" if value < 0 else "", str(abs(value)))
        if kind is float:  # 4242424242424242.0, 4.242424242424242e15, 42424242424242.42e2
            if value.is_integer() and 1e12 <= abs(value) < 1e19:
                return self._float(value)
            return value
        if kind is dict:
            return self._object(value, depth + 1)
        if kind is list:
            return self._array(value, depth + 1)
        return value

    def _object(self, value: dict[str, Any], depth: int) -> dict[str, Any]:
        if depth > self.max_depth:
            raise _TooDeep(f"JSON nested deeper than {self.max_depth} levels")
        changed = False
        items: list[tuple[str, Any]] = []
        path = self.path
        renamed = self._renamed(value)
        for name, item in value.items():
            new_name = name
            if renamed and name in renamed:
                new_name, hits = renamed[name]
                where = _pointer([*path, new_name])  # its member, under its stored name
                self.findings += (_finding(h, where, key=True) for h in hits)
            path.append(new_name)  # never the number itself, even in a path
            new_item = self.value(item, depth)
            path.pop()
            changed = changed or new_name is not name or new_item is not item
            items.append((new_name, new_item))
        return dict(items) if changed else value

    def _array(self, value: list[Any], depth: int) -> list[Any]:
        if depth > self.max_depth:
            raise _TooDeep(f"JSON nested deeper than {self.max_depth} levels")
        out: list[Any] | None = None
        path = self.path
        for index, item in enumerate(value):
            path.append(index)
            new_item = self.value(item, depth)
            path.pop()
            if new_item is not item:
                if out is None:
                    out = list(value)
                out[index] = new_item
        return value if out is None else out


def redact_value(
    value: Any, *, max_depth: int = MAX_JSON_DEPTH, source: bytes | None = None
) -> Redacted[Any]:
    """A decoded JSON value with every card number masked: in strings, in object keys, and
    in numbers (replaced by the mask string). Unchanged parts are shared with ``value``,
    which is never modified; with nothing found the result *is* ``value``.

    A number is a card number when it is a whole number of 13 to 19 digits that is one:
    an integer, or a float (``4242424242424242.0``, ``4.242424242424242e15``,
    ``42424242424242.42e2``). A float above 2**53 has lost its last digits; ``source``,
    the JSON text ``value`` was decoded from, gives them as written. Without it, such a
    float is masked when any card number decodes to it, as ``[card ****????]``.

    Raises :class:`ValueError` for containers nested deeper than ``max_depth``.
    """
    walk = _Walk(max_depth, source)
    new = walk.value(value, 0)
    return Redacted(new, Scan(tuple(walk.findings), walk.truncated))


#: :data:`_CLASS`, but ``e`` for ``e`` and ``E``: right after a digit, an exponent follows.
_JSON_CLASS: Final = bytes(0x65 if b in {0x45, 0x65} else c for b, c in enumerate(_CLASS))
_EXPONENT: Final = b"0e"
#: The fewest bytes a card number takes in JSON: ``42e14`` (4200000000000000, a Visa
#: number). Shorter, a number of 13+ digits has one significant digit, which fails Luhn.
_SHORTEST_JSON_CARD: Final = 5
#: A number's first significant digit after which no whole number near it is a card: no
#: issuer range starts with 0, 1, 7 or 8, nor with 20, 69, 90 or 99, where the whole numbers
#: near a 1…, 7… or 8… number may begin (2000… near 1999…, 6999… near 7000…, 9000… near
#: 8999…, 999… near 1000… of one digit more).
_NEVER_FIRST: Final = b"0178"
#: A mantissa longer than this is not looked into: its number may be a card.
_LONGEST_MANTISSA: Final = 64
#: An exponent of a JSON number (after its mantissa): sign, leading zeros, the value,
#: and one more digit if there are more than 7.
_EXPONENT_PART: Final = re.compile(rb"[eE]([-+]?)(0*)([0-9]{0,7})([0-9]?)")
_MANTISSA_BYTES: Final = frozenset(b"0123456789.")
#: What a JSON number may follow: its sign, whitespace, ``[``, ``,`` or ``:``.
_BEFORE_NUMBER: Final = frozenset(b"- \t\n\r[,:")
#: What the digit before an ``e`` may follow in a number: the above, a digit or a point.
_IN_NUMBER: Final = _MANTISSA_BYTES | _BEFORE_NUMBER


def _float_may_be_card(body: bytes, last: int) -> bool:
    """Whether the JSON number whose mantissa ends at ``body[last]`` (a digit right before
    an ``e`` or ``E``) may decode to a whole number of 13 to 19 digits that starts like a
    card: it has that many digits before its point once the exponent is applied, and its
    first significant digit is not one of :data:`_NEVER_FIRST`. Digits and an ``e`` inside a
    string (``"4e51a3e9-…"``, never a number) are told apart by what precedes them."""
    first, bound, point = last, max(0, last - _LONGEST_MANTISSA), -1
    while first > bound:
        byte = body[first - 1]
        if 0x30 <= byte <= 0x39:
            first -= 1
        elif byte == 0x2E and point < 0:
            point = first = first - 1
        else:
            break
    else:
        if first and body[first - 1] in _MANTISSA_BYTES:
            return True  # too long to look into here: it may be one
    if first and body[first - 1] not in _BEFORE_NUMBER:  # a word, a hex id, "1.2.3e4"
        return False
    part = _EXPONENT_PART.match(body, last + 1)
    if part is None:
        return False
    sign, zeros, value, more = part.groups()
    if not (zeros or value) or more:  # "4e" alone, or an exponent of 10**7 or more
        return False
    digits = body[first : last + 1].replace(b".", b"")
    significant = digits.lstrip(b"0")
    if not significant:  # zero
        return False
    whole = (point if point >= 0 else last + 1) - first  # digits before the point
    exponent = int(value or b"0")
    order = whole - (len(digits) - len(significant)) + (-exponent if sign == b"-" else exponent)
    return MIN_DIGITS <= order <= MAX_DIGITS and significant[0] not in _NEVER_FIRST


def json_may_hold_card(body: bytes) -> bool:
    """A fast, sound pre-check of a JSON text: ``False`` means :func:`redact_value` of its
    decoded value finds nothing.

    Strings, keys and integers: without ``\\u`` escapes every digit, space and dash of a
    decoded string or integer is in the raw text as it is, so the raw text is scanned with
    the run-end rules relaxed (an escape such as ``\\n`` shows a letter where the decoded
    text has a newline): whatever the strict scan of the decoded value finds, this finds
    too. Text with ``\\u`` escapes is always worth a look.

    Floats: the walk masks a float only if it is whole, 10**12 to 10**19, and a whole number
    ``n`` within half an ``ulp`` of it is a card (its own value, its shortest digits, or a
    number written for it). So is the number ``x`` written in the text, so
    ``|n - x| <= ulp < x / 2**51``. Hence ``x`` has 13 to 19 digits before its point (else
    ``n`` is 10**12, starts with 99 or has 20 digits: no card), and its first significant
    digit is not 1, 7 or 8 (else ``n`` starts with one of 10-20, 69-90 or 99, where no
    issuer range starts). This checks every number written with a point or an exponent
    for both:

    * with an exponent: the digit before each ``e``/``E`` that follows a digit is read as
      the end of a number (:func:`_float_may_be_card`), unless what precedes its mantissa
      cannot precede a JSON number (then it is in a string: a hex id, a word);
    * with a point only: its 13 to 19 digits before the point are an unbroken run of
      13 or more, right before a ``.``, met among the runs below.

    (An integer too long for 64 bits decodes to a float as well: of 20 digits or more, or
    negative with 19 starting 92 to 99; no card is either, and the walk finds nothing.)
    """
    if len(body) < _SHORTEST_JSON_CARD:
        return False
    if b"\\u" in body or len(body) > MAX_SCAN_CHARS:
        return True
    classes = body.translate(_JSON_CLASS)
    at = classes.find(_EXPONENT)
    while at >= 0:
        if (not at or body[at - 1] in _IN_NUMBER) and _float_may_be_card(body, at):
            return True
        at = classes.find(_EXPONENT, at + 2)
    first_places = classes.find(_LONG), classes.find(_PAIR)
    if first_places == (-1, -1):  # the common case: a few passes over the bytes, all in C
        return False
    classes = classes.replace(b"e", b"x")  # neither _LONG nor _PAIR holds "e": same places
    if b"--" in classes:  # nor "--"
        classes = classes.replace(b"--", b"xx")
    text: str | None = None
    for start, end in _runs(classes, first_places):
        separators = classes.count(b"-", start, end)
        if separators == 0:  # unbroken: most are timestamps, fractions, ids
            size = end - start
            if (
                body[end : end + 1] == b"."  # the whole part of a float
                and MIN_DIGITS <= size <= MAX_DIGITS
                and body[start] not in _NEVER_FIRST
            ):
                return True
            if not MIN_DIGITS <= size <= MAX_DIGITS or body[start : start + 2] not in _LEAD2B:
                continue
        elif end - start - separators < MIN_DIGITS:  # phone numbers, dates
            continue
        if text is None:
            text = body.decode("latin-1")
        if next(_in_run(text, start, end, False), None) is not None:
            return True
    return False


def _splice_json(body: bytes, scan: Scan, redacted: Any) -> bytes | None:
    """``body`` with only the card numbers replaced (strings masked in place, numbers by a
    quoted mask), or ``None`` when that does not give exactly ``redacted``."""
    if b"\\" in body:  # escapes: offsets in the raw text are not those of the strings
        return None
    text = body.decode("latin-1")
    hits = list(_hits(text, len(text)))
    if len(hits) != scan.count:
        return None
    parts: list[str] = []
    done = 0
    quotes = 0  # before ``done``: hits come in order, so each stretch is counted once
    for start, end, digits, _ in hits:
        quotes += text.count('"', done, start)
        in_string = quotes % 2 == 1
        if in_string:
            parts += (text[done:start], mask(digits[-4:]))
        else:
            begin = start - 1 if start and text[start - 1] == "-" else start
            parts += (text[done:begin], '"', mask(digits[-4:]), '"')
        done = end
    parts.append(text[done:])
    out = "".join(parts).encode("latin-1")
    try:
        same = orjson.loads(out) == redacted
    except orjson.JSONDecodeError:
        return None
    return out if same else None


def redact_json(body: bytes, *, max_bytes: int = MAX_SCAN_CHARS) -> Redacted[bytes]:
    """A JSON document with every card number masked (see :func:`redact_value`).

    The result is valid JSON. Outside the masked numbers it is byte-identical to ``body``
    when the document has no backslash escapes; otherwise it is ``body`` re-serialised
    (compact, by orjson). A body with nothing found comes back as the same object.
    A body that is not JSON, is longer than ``max_bytes`` or nests deeper than
    :data:`MAX_JSON_DEPTH` is redacted as text instead: no card number survives, but a
    masked JSON number is then left unquoted.
    """
    if len(body) > max_bytes:
        return _redact_bytes(body)
    if not json_may_hold_card(body):
        return Redacted(body)
    try:
        value = orjson.loads(body)
        done = redact_value(value, source=body)
    except (orjson.JSONDecodeError, _TooDeep):
        return _redact_bytes(body)
    if not done.scan:
        return Redacted(body, done.scan)
    out = _splice_json(body, done.scan, done.value)
    if out is None:
        out = orjson.dumps(done.value)
    return Redacted(out, done.scan)
