"""The broker's client publishes exactly as nats-py does, only faster.

:class:`broker.natsconn.Client` replaces nats-py's header encoding (a regular expression per
name, a ``str.translate`` per value) and its subject check (a regular expression search per
subject). Each case publishes the same message through both clients, with the command they
would send captured: the bytes, and the refusals, must be the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from broker import natsconn
from broker.natsconn import Client, encode_headers


class _Upstream(NatsClient):
    sent: list[bytes]

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(cmd)


class _Ours(Client):
    sent: list[bytes]

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(cmd)


def sent_by(client_type: type[Any], headers: Mapping[str, str] | None) -> bytes | str:
    """The command ``client_type`` sends to publish one message, or the name of what it
    raised instead."""
    client = client_type()
    client.sent = []

    async def publish() -> None:
        await client._send_publish("msg.t.x", "_INBOX.r.1", b"{}", 2, headers)

    try:
        asyncio.run(publish())
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    assert client.stats["out_msgs"] == 1
    assert client.stats["out_bytes"] == 2
    (command,) = client.sent
    return bytes(command)


def assert_same(headers: Mapping[str, str] | None) -> None:
    assert sent_by(_Ours, headers) == sent_by(_Upstream, headers)


STORED = {
    "Nats-Msg-Id": "3f2a9c1e-77aa-4e0b-9d21-5c0b8f7a1e22",
    "Content-Type": "application/json",
    "Broker-Tenant": "default",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        STORED,
        {"a": "line\r\nbreak\rand\nmore"},
        {"  padded  ": "  value\t "},
        {"   ": "a blank name is skipped", "kept": "yes"},
        {"": "empty name", "x": ""},
        {"bad name": "refused"},
        {"bad:name": "refused"},
        {"naïve": "a name is ASCII"},
        {"x": "ünïcödé ✓ 漢字"},
        {"x": "\u2003em spaces\u2003 and \x85"},
        {"x": "\ud800"},  # a lone surrogate: not encodable
    ],
)
def test_the_bytes_and_refusals_are_nats_pys(headers: Mapping[str, str] | None) -> None:
    assert_same(headers)


names = st.one_of(
    st.sampled_from(list(STORED)),
    st.text(max_size=12),
    st.text(alphabet="abcXYZ-_.!#\t :\r\n", max_size=8),
)
values = st.one_of(st.text(max_size=40), st.text(alphabet="ab \t\r\n\x0b\x85\u2028", max_size=12))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(names, values, max_size=6))
def test_any_headers_encode_as_nats_py_encodes_them(headers: dict[str, str]) -> None:
    assert_same(headers)


def test_a_refused_name_is_not_remembered_and_stays_refused() -> None:
    with pytest.raises(nats.errors.BadHeaderError):
        encode_headers({"no good": "x"})
    assert "no good" not in natsconn._HEADER_NAMES
    with pytest.raises(nats.errors.BadHeaderError):
        encode_headers({"no good": "x"})


def test_the_names_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(natsconn, "_HEADER_NAMES", {})
    many = {f"X-Name-{n}": str(n) for n in range(natsconn._HEADER_NAMES_KEPT + 50)}
    block = encode_headers(many)
    assert len(natsconn._HEADER_NAMES) == natsconn._HEADER_NAMES_KEPT
    assert block == encode_headers(many)  # the ones not remembered are still written
    assert block.count(b"\r\n") == len(many) + 2


def test_an_empty_subject_is_refused_as_nats_py_refuses_it() -> None:
    client = _Ours()
    client.sent = []
    with pytest.raises(nats.errors.BadSubjectError):
        asyncio.run(client._send_publish("", "", b"", 0, {"a": "b"}))
    assert client.sent == []


# --- publish: the subject checks and the connection's state ----------------------------


def published_by(
    client_type: type[Any],
    subject: str,
    reply: str = "",
    payload: bytes = b"{}",
    *,
    state: str = "connected",
    skip_validation: bool = False,
) -> bytes | str:
    """What ``client_type.publish`` sends for one message from a client in ``state``, or the
    name of what it raised instead."""
    client = client_type()
    client.sent = []
    client._max_payload = 64
    client._skip_subject_validation = skip_validation
    client._max_pending_size = 8
    if state == "connected":
        client._status = NatsClient.CONNECTED
    elif state == "closed":
        client._status = NatsClient.CLOSED
    elif state == "draining publishes":
        client._status = NatsClient.DRAINING_PUBS
    elif state == "reconnecting, no buffer":
        client._status, client._max_pending_size = NatsClient.RECONNECTING, 0
    elif state == "reconnecting, buffer full":
        client._status, client._pending_data_size = NatsClient.RECONNECTING, 7
    else:
        assert state == "reconnecting, room left"
        client._status = NatsClient.RECONNECTING
    try:
        asyncio.run(client.publish(subject, payload, reply=reply, headers={"a": "b"}))
    except Exception as e:
        return type(e).__name__
    (command,) = client.sent
    return bytes(command)


@pytest.mark.parametrize(
    "state",
    [
        "connected",
        "closed",
        "draining publishes",
        "reconnecting, no buffer",
        "reconnecting, buffer full",
        "reconnecting, room left",
    ],
)
@pytest.mark.parametrize("payload", [b"", b"{}", b"x" * 64, b"x" * 65])
def test_publish_answers_each_state_as_nats_py_does(state: str, payload: bytes) -> None:
    """The same bytes or the same error, except for a message whose payload fits
    ``max_payload`` but not with its headers (see the next test)."""
    ours = published_by(_Ours, "msg.t.x", "_INBOX.r.1", payload, state=state)
    upstream = published_by(_Upstream, "msg.t.x", "_INBOX.r.1", payload, state=state)
    fits = len(payload) + len(natsconn.encode_headers({"a": "b"})) <= 64
    if fits or not isinstance(upstream, bytes):
        assert ours == upstream
    else:
        assert ours == "MaxPayloadError"
    if state == "connected" and fits:
        assert isinstance(ours, bytes)


@pytest.mark.parametrize("payload", [b"x" * 49, b"x" * 50, b"x" * 64])
def test_a_message_over_max_payload_with_its_headers_is_refused_before_it_is_sent(
    payload: bytes,
) -> None:
    """The server counts the header block against ``max_payload`` and closes the connection
    on a message over it (every ack in flight on it lost); nats-py checks the payload alone
    and sends it. The header block of ``{"a": "b"}`` is 18 bytes: 46 of payload fit in 64."""
    ours = published_by(_Ours, "msg.t.x", "_INBOX.r.1", payload)
    assert ours == "MaxPayloadError"
    assert isinstance(published_by(_Ours, "msg.t.x", "_INBOX.r.1", b"x" * 46), bytes)


@pytest.mark.parametrize(
    ("subject", "reply", "refused"),
    [
        ("", "", True),
        ("a b", "", True),
        ("a\tb", "", True),
        ("a\r\nPUB x 1", "", True),
        ("a\nb", "", True),
        ("ok", "bad reply", True),
        ("ok", "\r\n", True),
        ("ok", "", False),
        ("a..b.*.>", "x", False),  # token shape is the server's to judge on publish
        ("\u2003", "", False),  # other whitespace passes, as in nats-py
    ],
)
@pytest.mark.parametrize("skip_validation", [False, True])
def test_publish_refuses_the_subjects_nats_py_refuses(
    subject: str, reply: str, refused: bool, skip_validation: bool
) -> None:
    ours = published_by(_Ours, subject, reply, skip_validation=skip_validation)
    assert ours == published_by(_Upstream, subject, reply, skip_validation=skip_validation)
    # Told to skip the check, both still refuse an empty subject (when writing it out).
    assert (ours == "BadSubjectError") == (refused and (not skip_validation or not subject))


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet="ab. *>\t\r\n\x0b\u2003", max_size=10) | st.text(max_size=10),
    st.text(alphabet="ab. \t\r\n", max_size=6),
)
def test_any_subject_is_refused_or_sent_as_nats_py_does(subject: str, reply: str) -> None:
    assert published_by(_Ours, subject, reply) == published_by(_Upstream, subject, reply)


_LINE = st.binary(max_size=40).filter(lambda b: b"\r\n" not in b)


@given(st.lists(_LINE, max_size=8))
def test_a_stored_header_block_is_read_as_nats_py_reads_a_delivered_one(lines: list[bytes]) -> None:
    """``get_stored`` reads a message got by sequence as a subscriber reads a delivered one
    (nats-py's own line parser), not as nats-py's ``get_msg`` does (``email``'s parser)."""
    block = b"\r\n".join(lines)
    expected = NatsClient._parse_header_lines(block) or None
    assert natsconn.decode_headers(b"NATS/1.0\r\n" + block + b"\r\n\r\n") == expected


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
        st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=30),
        max_size=6,
    )
)
def test_what_the_broker_stores_is_read_back_whole(headers: dict[str, str]) -> None:
    expected = {name: value.strip() for name, value in headers.items()} or None
    assert natsconn.decode_headers(encode_headers(headers)) == expected
