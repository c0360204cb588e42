"""Card number detection and redaction (broker.sensitive) and card masking in log fields.

Card numbers are generated from the accepted issuer ranges with a computed Luhn check
digit; property tests hide them in text and JSON and check they are always found, always
masked, and that nothing else changes.
"""

from __future__ import annotations

import json
import math
import string
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.sensitive import (
    ISSUER_RANGES,
    MAX_JSON_DEPTH,
    CardBrand,
    card_brand,
    find_cards,
    json_may_hold_card,
    luhn_valid,
    mask,
    redact_json,
    redact_text,
    redact_value,
    text_may_hold_card,
)
from broker.telemetry.logfields import REDACTED, redact_secrets

pytestmark = pytest.mark.unit

# --- generators -----------------------------------------------------------------------------


def check_digit(partial: str) -> str:
    """The digit that makes ``partial + digit`` pass Luhn (computed here independently)."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return str((10 - total % 10) % 10)


@st.composite
def cards(draw: st.DrawFn) -> str:
    """A Luhn-valid number inside one accepted issuer range, of one of its lengths."""
    _, low, high, lengths = draw(st.sampled_from(ISSUER_RANGES))
    prefix = str(draw(st.integers(int(low), int(high)))).zfill(len(low))
    size = draw(st.sampled_from(sorted(lengths)))
    body = draw(st.text("0123456789", min_size=size - len(prefix) - 1, max_size=size - 1))
    partial = (prefix + body)[: size - 1]
    return partial + check_digit(partial)


#: How people write a number of each length in groups.
LAYOUTS = {
    13: (4, 4, 5),
    14: (4, 6, 4),
    15: (4, 6, 5),
    16: (4, 4, 4, 4),
    17: (4, 4, 4, 5),
    18: (4, 4, 4, 6),
    19: (4, 4, 4, 4, 3),
}


def grouped(number: str, separator: str) -> str:
    parts, at = [], 0
    for size in LAYOUTS[len(number)]:
        parts.append(number[at : at + size])
        at += size
    return separator.join(parts)


@st.composite
def written(draw: st.DrawFn) -> tuple[str, str]:
    """A card number as someone would write it (unbroken, or grouped with spaces or
    dashes), and its digits."""
    number = draw(cards())
    style = draw(st.sampled_from(["", " ", "-"]))
    return (grouped(number, style) if style else number), number


NO_DIGITS = st.text(st.characters(blacklist_characters="0123456789"), max_size=40)


def wrong_check_digit(number: str) -> str:
    last = int(number[-1])
    return number[:-1] + str((last + 1) % 10)


# --- Luhn and brands ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4242424242424242", CardBrand.VISA),
        ("4000056655665556", CardBrand.VISA),
        ("4222222222222", CardBrand.VISA),
        ("5555555555554444", CardBrand.MASTERCARD),
        ("2223003122003222", CardBrand.MASTERCARD),
        ("378282246310005", CardBrand.AMEX),
        ("371449635398431", CardBrand.AMEX),
        ("6011111111111117", CardBrand.DISCOVER),
        ("3056930009020004", CardBrand.DINERS),
        ("36227206271667", CardBrand.DINERS),
        ("3566002020360505", CardBrand.JCB),
        ("6200000000000005", CardBrand.UNIONPAY),
    ],
)
def test_published_test_card_numbers_are_found_with_their_brand(
    number: str, brand: CardBrand
) -> None:
    scan = find_cards(f"paid with {number} today")
    assert [(f.brand, f.last4, f.digits) for f in scan.findings] == [
        (brand, number[-4:], len(number))
    ]
    assert luhn_valid(number)


@given(cards())
def test_generated_numbers_pass_luhn_and_match_a_range(number: str) -> None:
    assert luhn_valid(number)
    assert not luhn_valid(wrong_check_digit(number))
    [finding] = find_cards(number).findings
    assert finding.last4 == number[-4:]


@pytest.mark.parametrize(
    "text",
    [
        "4242424242424241",  # Luhn fails
        "ts=1717000000123456",  # a microsecond timestamp: no range starts with 1
        "1717000000123",  # milliseconds
        "1717000000123456789",  # nanoseconds
        "4242424242424242424242424242424242424242",  # 40 digits: not a card, nor holds one
        "id4242424242424242",  # glued to a word
        "4242424242424242abc",
        "card_4242424242424242",
        "+4242424242424242",  # E.164 phone number
        "0.4242424242424242",  # a fraction
        "4242424242424242.25",
        "4242 4242 4242 424",  # 15 digits: not a Visa length
        "4242  4242 4242 4242",  # two spaces: not one number
        "0042424242424242",  # no range starts with 0
        "7242424242424242",
        "4242 42 42 4242 4242",  # groups of two are not how a number is written
    ],
)
def test_what_is_not_a_card(text: str) -> None:
    assert find_cards(text).count == 0
    assert redact_text(text).value == text


@given(st.integers(10**12, 2 * 10**18))
def test_timestamps_and_ids_led_by_1_are_never_cards(number: int) -> None:
    assume(str(number)[0] == "1")
    assert find_cards(f"at {number}").count == 0


@given(st.text("0123456789", min_size=20, max_size=200))
def test_long_digit_runs_are_never_cards(run: str) -> None:
    assert find_cards(f"id {run} end").count == 0


# --- text -----------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(written(), st.text(max_size=60), st.text(max_size=60))
def test_a_card_in_any_text_is_found_and_masked(
    card: tuple[str, str], before: str, after: str
) -> None:
    """Hidden between any texts (", " and "; " keep it from touching their digits), the
    number is found once more than the texts hold on their own, and is gone from the
    output."""
    shown, number = card
    text = f"{before}, {shown}; {after}"
    done = redact_text(text)
    alone = find_cards(before).count + find_cards(after).count
    assert done.scan.count == alone + 1
    assert (mask(number[-4:]), number[-4:], len(number)) in [
        (mask(f.last4), f.last4, f.digits) for f in done.scan.findings
    ]
    assume(shown not in before + after and number not in before + after)
    assert shown not in done.value
    assert number not in done.value.replace(" ", "").replace("-", "")
    assert done.value.startswith(redact_text(before).value + ", ")


@given(written(), NO_DIGITS, NO_DIGITS)
def test_digit_free_surroundings_are_kept_exactly(
    card: tuple[str, str], before: str, after: str
) -> None:
    shown, number = card
    done = redact_text(f"{before} {shown} {after}")
    assert done.value == f"{before} {mask(number[-4:])} {after}"
    [finding] = done.scan.findings
    assert (finding.start, finding.end) == (len(before) + 1, len(before) + 1 + len(shown))


@given(written(), NO_DIGITS, NO_DIGITS)
def test_luhn_invalid_numbers_are_left_alone(
    card: tuple[str, str], before: str, after: str
) -> None:
    _, number = card
    text = f"{before} {wrong_check_digit(number)} {after}"
    done = redact_text(text)
    assert done.value is text
    assert done.scan.count == 0


TEXTY = st.text(st.sampled_from([*"0123456789", " ", "-", ".", "+", "a", "\n"]), max_size=120)


@given(st.one_of(TEXTY, st.text(max_size=80)), st.lists(written(), max_size=3))
def test_redacting_twice_changes_nothing_more(noise: str, numbers: list[tuple[str, str]]) -> None:
    text = noise + "".join(f" / {shown} / " for shown, _ in numbers)
    once = redact_text(text).value
    assert redact_text(once).value == once
    assert find_cards(once).count == 0


@given(written())
def test_findings_never_hold_the_number(card: tuple[str, str]) -> None:
    shown, number = card
    scan = find_cards(f"x {shown} y")
    described = repr(scan) + json.dumps([f.to_dict() for f in scan.findings])
    assert number not in described
    assert number[:-4] not in described


def test_two_cards_one_space_apart_are_both_found() -> None:
    done = redact_text("cards 4242424242424242 5555555555554444 on file")
    assert done.value == "cards [card ****4242] [card ****4444] on file"
    assert [(f.brand, f.last4) for f in done.scan.findings] == [
        (CardBrand.VISA, "4242"),
        (CardBrand.MASTERCARD, "4444"),
    ]


def test_a_grouped_card_next_to_other_numbers_is_still_masked() -> None:
    done = redact_text("qty 12 4242 4242 4242 4242 99 boxes")
    assert done.value == "qty 12 [card ****4242] 99 boxes"


def test_text_past_the_scan_bound_is_reported_not_scanned() -> None:
    text = "x" * 100 + " 4242424242424242"
    scan = find_cards(text, max_chars=50)
    assert (scan.count, scan.truncated) == (0, True)
    assert find_cards(text).count == 1


def test_hostile_megabyte_texts_are_linear_and_find_nothing() -> None:
    """A megabyte of digits, of single digits and of 3-digit groups: bounded work, no
    card (the 3-digit groups never pass: 999 repeated fails Luhn at every length)."""
    for text in ("4" * 1_000_000, "4 " * 500_000, "999-" * 250_000):
        assert find_cards(text).count == 0
    # Past the bound nothing is scanned, and it says so.
    assert find_cards("4242424242424242 " * 70_000).truncated


def test_text_may_hold_card_is_a_cheap_superset() -> None:
    assert not text_may_hold_card("short 42")
    assert not text_may_hold_card("order 123456789012 at 12:30")  # 12 digits
    assert text_may_hold_card("4242424242424242")
    assert text_may_hold_card("4242 4242 4242 4242")


@given(st.text("0123456789 -xa", max_size=80))
def test_text_may_hold_card_never_misses_a_card(text: str) -> None:
    if find_cards(text).count:
        assert text_may_hold_card(text)


# --- JSON -----------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    TEXTY,
    cards(),
    cards().map(int),
    written().map(lambda card: f"\n{card[0]}\t"),
)


def documents(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )


@st.composite
def with_cards(draw: st.DrawFn) -> tuple[Any, list[str]]:
    """A JSON document of card-free leaves with 1-3 card numbers planted as strings (in
    sentences, or alone) and as JSON integers."""
    planted: list[str] = []

    def plant(number: str, how: str) -> Any:
        planted.append(number)
        if how == "int":
            return int(number)
        if how == "alone":
            return number
        return f"card {grouped(number, ' ')} exp 12/29"

    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-1000, 1000),
        st.text(string.ascii_letters + " é", max_size=10),
    )
    doc = draw(documents(leaves))
    count = draw(st.integers(1, 3))
    items = [
        plant(draw(cards()), draw(st.sampled_from(["int", "alone", "sentence"])))
        for _ in range(count)
    ]
    return {"doc": doc, "cards": items, "nested": {"more": [items[0]]}}, [
        *planted,
        planted[0],
    ]


@given(with_cards(), st.sampled_from([0, 2]))
def test_cards_in_json_strings_and_numbers_are_masked_and_json_stays_valid(
    case: tuple[Any, list[str]], indent: int
) -> None:
    document, planted = case
    option = orjson.OPT_INDENT_2 if indent else 0
    body = orjson.dumps(document, option=option)
    done = redact_json(body)
    back = orjson.loads(done.value)  # still valid JSON
    assert done.scan.count == len(planted)
    assert sorted(f.last4 for f in done.scan.findings) == sorted(n[-4:] for n in planted)
    for number in planted:
        assert number.encode() not in done.value
        assert grouped(number, " ").encode() not in done.value
    assert back["doc"] == document["doc"]  # the rest is untouched
    assert redact_json(done.value).value == done.value  # redacting twice changes nothing
    assert not redact_value(back).scan


def test_json_outside_the_numbers_stays_byte_identical() -> None:
    body = (
        b'{ "pan" : 4242424242424242 ,\n  "note": "use 4111 1111 1111 1111 please",'
        b' "n": -5555555555554444, "price": 12.50, "id": 1717000000123 }'
    )
    done = redact_json(body)
    assert done.value == (
        b'{ "pan" : "[card ****4242]" ,\n  "note": "use [card ****1111] please",'
        b' "n": "[card ****4444]", "price": 12.50, "id": 1717000000123 }'
    )
    assert [(f.path, f.start, f.end) for f in done.scan.findings] == [
        ("/pan", 0, 16),
        ("/note", 4, 23),
        ("/n", 1, 17),
    ]


def test_json_without_a_card_comes_back_as_the_same_object() -> None:
    body = b'{"ts": 1717000000123456, "amount": 99.94999999999999, "phone": "+44 20 7946 0958"}'
    assert redact_json(body).value is body
    value = orjson.loads(body)
    assert redact_value(value).value is value


def test_json_with_escapes_is_scanned_decoded_and_reserialised() -> None:
    """A number spelt with a \\u escape, or next to a \\n, is found all the same."""
    body = b'{"a": "\\u0034242424242424242", "b": "\\n5555555555554444", "c": "caf\\u00e9"}'
    assert json_may_hold_card(body)
    done = redact_json(body)
    assert orjson.loads(done.value) == {
        "a": "[card ****4242]",
        "b": "\n[card ****4444]",
        "c": "café",
    }


def test_a_card_in_a_key_is_masked_and_paths_never_show_it() -> None:
    done = redact_value(
        {"4242424242424242": {"pan": "5555555555554444"}, "a/b": [1, 4242424242424242]}
    )
    assert done.value == {
        "[card ****4242]": {"pan": "[card ****4444]"},
        "a/b": [1, "[card ****4242]"],
    }
    assert [(f.path, f.key) for f in done.scan.findings] == [
        ("/[card ****4242]", True),
        ("/[card ****4242]/pan", False),
        ("/a~1b/1", False),
    ]


def test_redact_value_never_changes_its_input() -> None:
    value = {"a": ["4242424242424242", {"b": 4242424242424242}], "c": "x"}
    copy = json.loads(json.dumps(value))
    done = redact_value(value)
    assert value == copy
    assert done.value["c"] is value["c"]


@given(documents(SCALARS))
def test_json_prefilter_is_sound_for_generated_documents(document: Any) -> None:
    """The raw-text pre-check may say yes too often, never no when the walk finds one."""
    body = orjson.dumps(document)
    if redact_value(document).scan:
        assert json_may_hold_card(body)
    done = redact_json(body)
    assert orjson.loads(done.value) == redact_value(document, source=body).value


def test_too_deep_or_broken_json_is_redacted_as_text() -> None:
    deep = b"[" * (MAX_JSON_DEPTH + 1) + b'"4242424242424242"' + b"]" * (MAX_JSON_DEPTH + 1)
    assert b"4242424242424242" not in redact_json(deep).value
    broken = b'{"pan": "4242424242424242", oops'
    done = redact_json(broken)
    assert done.value == b'{"pan": "[card ****4242]", oops'
    with pytest.raises(ValueError, match="deeper"):
        redact_value(orjson.loads(deep))


# --- logs -----------------------------------------------------------------------------------


def test_log_fields_mask_card_numbers_in_every_string() -> None:
    line = {
        "event": "charge_failed for 4242424242424242",
        "reason": "card 4111-1111-1111-1111 declined",
        "cards": ["5555555555554444", 42],
        "context": {"pan": "378282246310005", "ok": True},
        "url": "nats://user:pw@host:4222",
        "password": "4242424242424242",
        "payload": "4242424242424242",
        "seq": 4242424242424242,
    }
    out = redact_secrets(None, "info", dict(line))
    assert out["event"] == "charge_failed for [card ****4242]"
    assert out["reason"] == "card [card ****1111] declined"
    assert out["cards"] == ["[card ****4444]", 42]
    assert out["context"] == {"pan": "[card ****0005]", "ok": True}
    assert out["url"] == "nats://***@host:4222"
    assert out["password"] == REDACTED
    assert out["payload"] == "[payload omitted: 16 bytes]"
    assert out["seq"] == 4242424242424242  # numbers are ids in logs, not card text


def test_log_strings_without_enough_digits_pass_through_untouched() -> None:
    short, timestamp = "seq 12 of 4242", "at 1717000000123456"
    out = redact_secrets(None, "info", {"event": "x", "a": short, "b": timestamp})
    assert out["a"] is short
    assert out["b"] is timestamp


@pytest.mark.parametrize(
    "body",
    [b'{"pan": 4.242424242424242e15}', b'{"pan": 4242424242424242.0}', b"[4.2424242424242420E+15]"],
)
def test_a_card_written_as_a_json_float_is_masked(body: bytes) -> None:
    """orjson decodes these to floats, which the walk left as they were (only ints were
    searched), and the raw-text pre-check saw no run of digits in the exponent form."""
    assert json_may_hold_card(body)
    done = redact_json(body)
    assert done.scan.count == 1
    assert b"4242424242424242" not in done.value
    assert b"[card ****4242]" in done.value


def test_floats_that_are_not_card_numbers_stay_as_they_are() -> None:
    body = b'{"t": 1.5e3, "x": 12.5, "big": 1e300, "ms": 1732600000000.0}'
    assert redact_json(body).value == body


# --- JSON numbers written with a point or an exponent ----------------------------------------


@pytest.mark.parametrize(
    ("literal", "last4"),
    [
        ("42424242424242.42e2", "4242"),  # the digits split by the point
        ("4242424242.424242e6", "4242"),  # a small exponent
        ("424242424242424200e-2", "4242"),  # a negative one
        ("0.0000004242424242424242e22", "4242"),  # leading zeros
        ("42e14", "0000"),  # 4200000000000000 passes Luhn: a Visa number in five bytes
        ("-4242424242424242.000", "4242"),
        ("4111111111111111110.0", "1110"),  # 19 digits: more than a float holds
        ("4111111111111111110e0", "1110"),
        ("411111111111111111.0e1", "1110"),
    ],
)
def test_a_card_written_with_a_point_or_an_exponent_is_masked_by_its_digits(
    literal: str, last4: str
) -> None:
    """The pre-check saw no run of digits in these (nor an exponent of 12 or more), and the
    walk judged a float by ``str(int(value))``: above 2**53 not the digits written."""
    body = f'{{"pan": {literal}, "n": 1}}'.encode()
    assert json_may_hold_card(body)
    done = redact_json(body)
    assert [f.last4 for f in done.scan.findings] == [last4]
    assert orjson.loads(done.value) == {"pan": f"[card ****{last4}]", "n": 1}


def test_a_float_that_lost_its_last_digits_is_masked_without_its_json_text() -> None:
    """The replica walks the decoded value alone: any card that decodes to a float too big
    to hold its last digits may have been written, and those digits are not known."""
    value = orjson.loads(b'{"pan": 4111111111111111110.0}')
    done = redact_value(value)
    assert done.value == {"pan": "[card ****????]"}
    [finding] = done.scan.findings
    assert (finding.brand, finding.last4, finding.digits, finding.path) == (
        CardBrand.VISA,
        "????",
        19,
        "/pan",
    )
    # The same float, written as a number that is not a card, is left alone given its text.
    body = b'{"pan": 4111111111111111100.0}'
    assert orjson.loads(body) == value
    assert not redact_value(value, source=body).scan


def test_hex_ids_and_float_timestamps_are_not_read_as_card_numbers() -> None:
    """A digit before an ``e`` in a hex string is no exponent; a float led by 1 is never a
    card (the old pre-check said yes to the first, sending every such event to the walk)."""
    for body in [
        b'{"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "id": "4e51a3e9-7c2d-4b8e"}',
        b'{"ts": 1732600000000.125, "us": 1.7326000001234e15, "x": 3.5e-7}',
        b'{"n": 4242e-30, "m": 4.2e11, "big": 4.2e19}',
    ]:
        assert not json_may_hold_card(body)


#: Two-digit starts of whole numbers near one led by 1, 7 or 8: the pre-check's proof says
#: no card starts so.
NEAR_1_7_8 = {f"{d}{x}" for d in "178" for x in "0123456789"} | {"20", "69", "90", "99"}


def test_no_issuer_range_starts_near_1_7_or_8() -> None:
    for _, low, high, _ in ISSUER_RANGES:
        width = len(low)
        for prefix in range(int(low), int(high) + 1):
            assert str(prefix).zfill(width)[:2] not in NEAR_1_7_8


@st.composite
def whole_numbers(draw: st.DrawFn) -> int:
    """Whole numbers a float check has to get right: card numbers, numbers near them and
    near 2**53, any of 12 to 20 digits."""
    return draw(
        st.one_of(
            cards().map(int),
            cards().map(int).flatmap(lambda n: st.integers(n - 3000, n + 3000)),
            st.integers(2**53 - 50, 2**53 + 50),
            st.integers(10**11, 10**20),
        )
    )


@st.composite
def float_literals(draw: st.DrawFn, number: st.SearchStrategy[int]) -> str:
    """A JSON number with a point or an exponent (or both), for a whole number, or for one
    a little off it (extra fraction digits, which may round away in a float)."""
    digits = str(draw(number))
    shift = draw(st.integers(-4, len(digits) + 6))  # digits = mantissa * 10**shift
    if shift >= len(digits):
        mantissa = "0." + "0" * (shift - len(digits)) + digits
    elif shift >= 0:
        head, tail = digits[: len(digits) - shift], digits[len(digits) - shift :]
        mantissa = head + "." + (tail or "0")
    else:
        mantissa = digits + "0" * -shift
    mantissa += draw(st.sampled_from(["", "", "0", "000", "1", "5", "99999"])) * ("." in mantissa)
    if shift or "." not in mantissa or draw(st.booleans()):
        sign = "-" if shift < 0 else draw(st.sampled_from(["", "+"]))
        zeros = draw(st.sampled_from(["", "0", "00"]))
        mantissa += f"{draw(st.sampled_from('eE'))}{sign}{zeros}{abs(shift)}"
    return draw(st.sampled_from(["", "-"])) + mantissa


@settings(max_examples=500)
@given(float_literals(whole_numbers()), st.sampled_from(["{}", '{{"a": [1, {}]}}', "[ {} ]"]))
def test_json_prefilter_is_sound_for_numbers_with_points_and_exponents(
    literal: str, frame: str
) -> None:
    """Whatever the walk masks in a number written with a point or an exponent, with its
    JSON text or without, the pre-check says may hold a card."""
    body = frame.format(literal).encode()
    value = orjson.loads(body)
    as_written = redact_value(value, source=body)
    decoded_only = redact_value(value)
    if as_written.scan:
        assert decoded_only.scan  # the text only tells the digits a float lost
    if decoded_only.scan:
        assert json_may_hold_card(body)
    assert orjson.loads(redact_json(body).value) == as_written.value


@given(float_literals(cards().filter(lambda n: n[0] != "0").map(int)))
def test_a_card_written_as_any_float_is_masked_with_its_own_last_digits(literal: str) -> None:
    body = f"[{literal}]".encode()
    exact = Decimal(literal)
    assume(exact == int(exact))  # no extra fraction digits
    digits = str(abs(int(exact)))
    assert json_may_hold_card(body)
    done = redact_json(body)
    assert [f.last4 for f in done.scan.findings] == [digits[-4:]]
    assert digits.encode() not in done.value


#: Where an issuer range begins or ends, in numbers of 16 digits or more.
RANGE_EDGES = sorted(
    {
        int(prefix.ljust(size, "0"))
        for _, low, high, lengths in ISSUER_RANGES
        for size in lengths
        if size >= 16
        for prefix in (low, str(int(high) + 1))
    }
)


@settings(max_examples=300)
@given(
    st.one_of(
        cards().filter(lambda n: len(n) >= 16).map(int),
        st.sampled_from(RANGE_EDGES).flatmap(lambda edge: st.integers(edge - 3000, edge + 3000)),
        st.integers(2**53, 10**19 - 1),
    ).map(float)
)
def test_a_float_is_masked_without_its_text_when_any_card_decodes_to_it(value: float) -> None:
    """Checked against every whole number that decodes to the float (up to 2 049), where the
    walk tries six, also where the float's numbers straddle the edge of an issuer range."""
    exact, step = int(value), int(math.ulp(value))
    card_decodes_to_it = any(
        float(n) == value and card_brand(str(n)) is not None and luhn_valid(str(n))
        for n in range(exact - step, exact + step + 1)
    )
    assert bool(redact_value([value]).scan) == card_decodes_to_it


def test_a_card_in_a_content_type_is_masked_in_the_replica() -> None:
    """The parameters of a Content-Type are the client's own text; the replica stored them
    unscanned while it masked the subject and the idempotency key."""
    from projections.base import Event
    from projections.replica import MessagesReplica

    headers = {"Content-Type": 'application/json; note="4242 4242 4242 4242"'}
    event = Event("MESSAGES", 1, "msg.acme.orders", None, headers, b'{"a": 1}')
    row, audit = MessagesReplica(detect_cards=True).scanned_row(event)
    assert row["content_type"] == 'application/json; note="[card ****4242]"'
    assert audit is not None


def test_a_logged_request_path_is_masked_before_it_is_cut() -> None:
    """Cut to 100 characters first, a card the cut split kept its first 12 digits in the
    log: the 16 digits no longer formed a card to mask."""
    from broker.http.app import _loggable

    path = "/v1/publish/" + "a" * 75 + ".4111111111111111"
    assert "411111111111" not in _loggable(path)
    assert len(_loggable(path)) <= 100
