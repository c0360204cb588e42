"""What :func:`redact_secrets` hides in text and under names, and what it leaves alone.

Secrets written as ``name=value`` in free text, all-letter basic credentials, header and
environment lists of ``{"name", "value"}`` items, exceptions logged as fields and bare
``user:pass@host`` words are masked; ordinary words that merely look like secret names
(``author``, ``tokenizer``, ``session_count``) are not. Every pattern is linear: megabyte
texts built against each of them finish in about a second (a quadratic one: hours).
"""

from __future__ import annotations

import string
from typing import Any

import orjson
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from broker.telemetry.logfields import REDACTED, is_secret_name, redact_secrets

pytestmark = pytest.mark.unit


def _line(**fields: Any) -> str:
    """The fields as redact_secrets leaves them, rendered as a JSON line would be (an
    object the renderer does not know by its ``repr``)."""
    return orjson.dumps(
        redact_secrets(None, "info", {"event": "x", **fields}), default=repr
    ).decode()


def _event(text: str) -> str:
    event: str = redact_secrets(None, "info", {"event": text})["event"]
    return event


# --- secrets in free text --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("login failed password=hunter2 user=x", "login failed password=[redacted] user=x"),
        ("retry with passwd=hunter2", "retry with passwd=[redacted]"),
        ("secret=hunter2; giving up", "secret=[redacted] giving up"),
        ("refresh token=hunter2 expired", "refresh token=[redacted] expired"),
        ("api_key=hunter2 rejected", "api_key=[redacted] rejected"),
        ("password: hunter2 (from env)", "password: [redacted] (from env)"),
        (
            'config {"password": "hunter 2", "user": "x"}',
            'config {"password": "[redacted]", "user": "x"}',
        ),
        ("kwargs {'token': 'hunter2'}", "kwargs {'token': '[redacted]'}"),
        ("Authorization: Basic hunter2xyz sent", "Authorization: [redacted] sent"),
        ("X-Api-Key: hunter2 refused", "X-Api-Key: [redacted] refused"),
    ],
    ids=[
        "password=",
        "passwd=",
        "secret=",
        "token=",
        "api_key=",
        "password-colon",
        "json-quoted",
        "repr-quoted",
        "authorization-header",
        "api-key-header",
    ],
)
def test_a_secret_named_value_in_free_text_is_masked(text: str, shown: str) -> None:
    """``login failed password=hunter2 user=x``: the value goes, the rest of the line
    (``user=x``) stays."""
    assert _event(text) == shown
    assert "hunter2" not in _line(error=text)


@pytest.mark.parametrize("credential", ["QWxhZGRpbg", "dXNlcjpwYXNz", "YWxhZGRpbjpvcGVuc2VzYW1l"])
def test_an_all_letter_basic_credential_is_masked(credential: str) -> None:
    """base64 may be all letters (``dXNlcjpwYXNz`` is ``user:pass``): a basic credential
    needed a digit or a symbol to be seen."""
    assert (
        _event(f"upstream sent Basic {credential} back") == f"upstream sent Basic {REDACTED} back"
    )
    assert credential not in _line(error=f"header was basic {credential}")


@pytest.mark.parametrize(
    "text",
    [
        "request_failed basic checks",
        "Basic Authentication required",
        "a token bucket emptied; Bearer-less request",
        "author: bob, authority=ca tokenizer=bert session_count=3 keyboard: us",
        "mail ops@example.com or mailto:ops@example.com about agent ocr@v2",
        "git@github.com:org/repo.git at 12:30",
        "https://example.com/x?page=2&sort=asc",
    ],
)
def test_ordinary_text_is_left_as_it_is(text: str) -> None:
    assert _event(text) == text


def test_a_bare_user_and_password_in_text_is_masked() -> None:
    """``admin:pw@db:6379`` outside an address field (an event's text, an error) loses its
    user information, as a URL with a scheme does; the host stays."""
    assert _event("connecting to admin:pXq@db:6379 now") == "connecting to ***@db:6379 now"
    assert _event("connecting to redis://admin:pXq@db:6379") == "connecting to redis://***@db:6379"
    assert _event("dsn (admin:p@Xq@db:5432) refused") == "dsn (***@db:5432) refused"
    assert "pXq" not in _line(error="cannot reach admin:pXq@db:6379")


@given(
    before=st.text(alphabet=string.ascii_letters + string.digits + " .,;:=/-_", max_size=40),
    secret=st.text(
        alphabet=string.ascii_letters
        + string.digits
        + string.punctuation.replace('"', "").replace("'", ""),
        min_size=6,
        max_size=30,
    ),
    after=st.text(alphabet=string.ascii_letters + string.digits + " .,;:=/-_", max_size=40),
    name=st.sampled_from(
        ["password", "passwd", "secret", "token", "api_key", "PASSWORD", "db.password"]
    ),
    separator=st.sampled_from(["=", ": ", " = ", ":"]),
)
# a value that starts with "@" was read as user information: "password:@00000" kept "@00000"
@example(before="", secret="@00000", after="", name="password", separator=":")
def test_a_secret_named_value_never_reaches_the_line(
    before: str, secret: str, after: str, name: str, separator: str
) -> None:
    """Whatever surrounds it, ``password=<word>`` never shows the word."""
    assume(secret not in before + after and secret not in f"{name}{separator}{REDACTED}")
    text = f"{before} {name}{separator}{secret} {after}"
    assert secret not in _event(text)
    assert secret not in _line(error=text)


# --- names ---------------------------------------------------------------------------------------

SECRET_NAMES = [
    "password",
    "db_password",
    "x-auth",
    "x_auth_token",
    "XAuthToken",
    "session_id",
    "sessionid",
    "JSESSIONID",
    "aws_access_key_id",
    "aws_secret_access_key",
    "client_secret",
    "private_key",
    "apiKey",
    "cookie",
    "set-cookie",
    "auth",
    "nats_pass",
]
ORDINARY_NAMES = [
    "author",
    "authority",
    "oauth_provider",
    "tokenizer",
    "session_count",
    "keyboard",
    "primary_key",
    "idempotency_key",
    "key",
    "sort_keys",
    "subject",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_secret_name_hides_its_field(name: str) -> None:
    assert is_secret_name(name)
    assert redact_secrets(None, "info", {"event": "x", name: "hunter2"})[name] == REDACTED
    assert "hunter2" not in _event(f"{name}=hunter2")


@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_an_ordinary_name_keeps_its_field(name: str) -> None:
    """``tokenizer`` holds ``token``, ``author`` starts with ``auth``: neither is secret."""
    assert not is_secret_name(name)
    assert redact_secrets(None, "info", {"event": "x", name: "kept"})[name] == "kept"
    assert _event(f"{name}=kept") == f"{name}=kept"


# --- structured values -------------------------------------------------------------------------


def test_header_and_environment_lists_of_items_hide_secret_values() -> None:
    """``[{"name": "Authorization", "value": "Bearer x"}]`` (a HAR's headers, a pod's
    environment): an item's name says whether its value is secret."""
    line = redact_secrets(
        None,
        "info",
        {
            "event": "x",
            "headers": [
                {"name": "Authorization", "value": "Bearer x"},
                {"name": "X-Api-Key", "value": "k1"},
                {"name": "Accept", "value": "application/json"},
            ],
            "env": [{"Name": "DB_PASSWORD", "Value": "hunter2"}, {"key": "token", "value": "t1"}],
        },
    )
    assert line["headers"] == [
        {"name": "Authorization", "value": REDACTED},
        {"name": "X-Api-Key", "value": REDACTED},
        {"name": "Accept", "value": "application/json"},
    ]
    assert line["env"] == [
        {"Name": "DB_PASSWORD", "Value": REDACTED},
        {"key": "token", "value": REDACTED},
    ]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("token=abc123xyz"),
        ConnectionError("cannot reach nats://u:abc123xyz@h:4222"),
        RuntimeError("sent Basic abc123xyz"),
    ],
    ids=["value-error", "connection-error", "runtime-error"],
)
def test_an_exception_logged_as_a_field_is_rendered_and_redacted(error: Exception) -> None:
    """``log.error("x", error=ValueError("token=abc"))``: the renderer writes the
    exception's ``repr`` after every processor, so it is rendered and scrubbed first."""
    redacted = redact_secrets(None, "error", {"event": "x", "error": error})["error"]
    assert isinstance(redacted, str)
    assert type(error).__name__ in redacted
    assert "abc123xyz" not in _line(error=error)


def test_an_exception_whose_repr_fails_is_still_logged() -> None:
    class Unprintable(Exception):
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert redact_secrets(None, "error", {"event": "x", "error": Unprintable()})["error"] == (
        "<unprintable Unprintable>"
    )


# --- hostile input ---------------------------------------------------------------------------

MEGABYTE = 1 << 20


def _repeat(unit: str, prefix: str = "", suffix: str = "") -> str:
    return prefix + unit * (MEGABYTE // len(unit)) + suffix


#: Texts shaped against each pattern: each would cost a quadratic pattern hours (the query
#: parameter and address patterns were: ~30 minutes and ~2 hours for the first two).
HOSTILE = {
    "query-name-without-equals": _repeat("token", "?", " ="),
    "address-commas-after-the-at": _repeat(",a", "x@ "),
    "bare-users-after-the-at": _repeat("a:b,", "x@ "),
    "names-without-separators": _repeat("password "),
    "names-and-colons": _repeat("password: "),
    "assignments": _repeat("a="),
    "unclosed-quote": _repeat("a", 'password="'),
    "schemes": _repeat("x://", "x@ "),
    "basic-words": _repeat("Basic "),
    "jwt-prefixes": _repeat("eyJ", "?", " ="),
    "pem-begins": _repeat("-----BEGIN x-----"),
    "ats": _repeat("@a:", "", "@h"),
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_megabyte_texts_built_against_the_patterns_are_scanned_in_one_pass(text: str) -> None:
    """No timing asserted: a quadratic pattern makes this test run into pytest's timeout."""
    line = redact_secrets(None, "info", {"event": text, "servers": text, "note": text})
    assert all(isinstance(line[k], str) for k in ("event", "servers", "note"))
