"""Credentials in NATS URLs never reach a log line or an error message, not even in part.

A password may hold a raw ``@`` (``nats://user:p@ss@host:4222``): nats-py, like urllib,
takes the user information up to the *last* ``@``, so masking must too. The percent-encoded
form (``p%40ss``) is masked as well, although nats-py sends it undecoded.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from broker.natsconn import ConnectOptions, explain_connect_error, redact_url
from broker.telemetry.logfields import redact_secrets

pytestmark = pytest.mark.unit

#: The parts of the password used below; none may appear in any masked output.
FRAGMENTS = ("pXq", "sEcr3tZ", "pXq%40sEcr3tZ", "pXq sEcr3tZ")
URLS = [
    "nats://user:pXq@sEcr3tZ@127.0.0.1:4222",
    "nats://user:pXq%40sEcr3tZ@127.0.0.1:4222",
    "tls://user:pXq@sEcr3tZ@nats.example:4443",
    "nats://user:pXq@@sEcr3tZ@127.0.0.1:4222",
    "nats://user:pXq:sEcr3tZ@127.0.0.1:4222",
    "nats://user:pXq sEcr3tZ@127.0.0.1:4222",  # nats-py accepts a space
    "nats://user:pXq/sEcr3tZ@127.0.0.1:4222",  # refused by nats-py, still masked
    "nats://user:pXq,sEcr3tZ@127.0.0.1:4222",  # split apart by BROKER_NATS_URL, still masked
    "nats://pXq@sEcr3tZ@127.0.0.1:4222",  # a token with an @
    "user:pXq@sEcr3tZ@127.0.0.1:4222",  # no scheme: nats-py adds nats://
]


#: The URLs nats-py can connect with (``/``, ``?``, ``#`` end its host part; BROKER_NATS_URL
#: is split at commas).
def with_scheme(url: str) -> str:
    """``url`` as nats-py completes it (``nats://`` when it has no scheme)."""
    return url if "://" in url else f"nats://{url}"


def userinfo(url: str) -> str:
    return with_scheme(url).partition("://")[2].rpartition("@")[0]


ACCEPTED = [url for url in URLS if not any(c in userinfo(url) for c in "/?#,")]


def shows_no_password(value: Any) -> bool:
    text = orjson.dumps(value, default=str).decode() if not isinstance(value, str) else value
    return not any(fragment in text for fragment in FRAGMENTS)


def test_nats_py_reads_the_user_information_up_to_the_last_at() -> None:
    """The rule the masking follows: urllib (which nats-py uses) splits at the last ``@``
    and does not decode percent escapes."""
    raw = urlsplit(URLS[0])
    assert (raw.username, raw.password, raw.hostname) == ("user", "pXq@sEcr3tZ", "127.0.0.1")
    assert urlsplit(URLS[1]).password == "pXq%40sEcr3tZ"


@pytest.mark.parametrize("url", URLS)
def test_redact_url_hides_the_whole_password_and_keeps_the_host(url: str) -> None:
    shown = redact_url(url)
    assert shown_host(shown) == shown_host(url)
    assert "***@" in shown
    assert shows_no_password(shown)


def shown_host(url: str) -> str:
    return url.rpartition("@")[2]


@pytest.mark.parametrize(
    "url", ["nats://127.0.0.1:4222", "127.0.0.1:4222", "tls://nats.example:4443"]
)
def test_redact_url_leaves_a_url_without_credentials_as_it_is(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize("url", URLS)
def test_connect_error_messages_name_the_servers_without_the_password(url: str) -> None:
    options = ConnectOptions(servers=[url, "nats://127.0.0.1:4223"])
    message = explain_connect_error(ConnectionRefusedError(111, "refused"), options)
    assert message.startswith(f"NATS at {redact_url(url)},nats://127.0.0.1:4223: ")
    assert shows_no_password(message)


@pytest.mark.parametrize("url", URLS)
def test_log_fields_holding_nats_urls_show_no_part_of_the_password(url: str) -> None:
    """The fields the broker logs its servers under, as they reach the log output."""
    log = structlog.get_logger("test")
    options = ConnectOptions(servers=[url, "nats://127.0.0.1:4223"])
    with capture_logs(processors=[redact_secrets]) as logs:
        log.info("broker_starting", nats_url=url)
        error = explain_connect_error(ConnectionRefusedError(111, "refused"), options)
        log.warning("nats_connect_failed", servers=options["servers"], error=error)
        log.info("worker_options", options={"nats_urls": [url]})
        if url in ACCEPTED:  # what nats-py connects with, split and parsed as it does
            log.warning("router_waiting_for_nats", servers=url.split(","))
            log.info("nats_connected", server=urlsplit(with_scheme(url)).netloc)
    assert len(logs) == (5 if url in ACCEPTED else 3)
    assert shows_no_password(logs), logs
    assert logs[0]["nats_url"] == redact_url(url)


def test_a_server_list_in_one_field_keeps_every_host() -> None:
    line = {
        "event": "broker_starting",
        "nats_url": "nats://a:pXq@sEcr3tZ@n1:4222,nats://n2:4222,nats://b:pXq@sEcr3tZ@n3:4222",
        "error": "NATS at nats://a:pXq@sEcr3tZ@n1:4222,nats://b:pXq@sEcr3tZ@n3:4222 refused",
    }
    redact_secrets(None, "info", line)
    assert line["nats_url"] == "nats://***@n1:4222,nats://n2:4222,nats://***@n3:4222"
    assert line["error"] == "NATS at nats://***@n1:4222,nats://***@n3:4222 refused"


def test_a_bare_user_and_password_is_masked_only_in_address_fields() -> None:
    """``user:pass@host`` without a scheme is masked where a field holds addresses
    (``server``, ``servers``, ``*_url``, ``*_urls``, ``netloc``); elsewhere an ``@`` in
    text (a mail address, say) is left as it is."""
    line = {
        "event": "x",
        "server": "user:pXq@sEcr3tZ@127.0.0.1:4222",
        "netloc": "user:pXq@127.0.0.1:4222",
        "replica_url": "postgresql://bob:pXq@sEcr3tZ@db/replica",
        "contact": "ops@example.com",
        "agent": "ocr@v2",
    }
    redact_secrets(None, "info", line)
    assert line["server"] == line["netloc"] == "***@127.0.0.1:4222"
    assert line["replica_url"] == "postgresql://***@db/replica"
    assert (line["contact"], line["agent"]) == ("ops@example.com", "ocr@v2")
