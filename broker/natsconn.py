"""How every broker process connects to NATS: :class:`Settings` → ``nats.connect`` options.

One place turns the ``BROKER_NATS_*`` settings into nats-py's keyword options, so the
ingress, the workers, the routers, the agent SDK and the CLI all connect the same way::

    nc = await open_client(**connect_options(settings, name="broker-provision"))

- TLS: ``nats_tls_ca`` (the CA that signs the servers' certificates) and/or
  ``nats_tls_cert`` + ``nats_tls_key`` (a client certificate, for servers with
  ``verify: true``) build one :class:`ssl.SSLContext` that verifies the server's
  certificate and host name (the host of each URL, so certificates must name it).
- Credentials, one kind at a time: ``nats_user`` + ``nats_password``, ``nats_token``, or
  ``nats_creds`` (a JWT + NKey seed ``.creds`` file).

Passwords and tokens stay :class:`~pydantic.SecretStr` until this function hands them to
nats-py; nothing here logs them. Bad settings (a certificate without its key, a file that
cannot be read, two kinds of credentials) raise :class:`InvalidNatsSettings` before any
connection is tried.

:func:`connect` connects with those options and turns nats-py's and ssl's failures into
:class:`NatsConnectFailed` with a message that says what was refused and which setting to
look at (:func:`explain_connect_error`, also used by the long-lived connections' error
callbacks): a server certificate from an unknown CA, a missing or untrusted client
certificate, wrong credentials, or no server answering.

Every broker process reads NATS through :class:`Client` (:func:`open_client` in place of
``nats.connect``): nats-py's client, except that a message whose subject is not UTF-8 is
read with U+FFFD in place of the bad bytes. nats-server stores such a subject from any
client allowed to publish there (an agent's NATS user, say), and nats-py's own client
raises on it inside its read loop, which then stops for good, silently: every later fetch
on that connection times out, so a projection worker, router or agent stalls while looking
idle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import importlib.util
import math
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypedDict
from urllib.parse import urlsplit

import nats.errors
import structlog
from nats.aio.client import DEFAULT_BUFFER_SIZE, DEFAULT_CONNECT_TIMEOUT
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.protocol.command import hpub_cmd

from broker.errors import BrokerError
from broker.settings import Settings

__all__ = [
    "DEFAULT_SERVERS",
    "ONE_SHOT",
    "RECONNECT_FOREVER",
    "Client",
    "ConnectOptions",
    "InvalidNatsSettings",
    "LogThrottle",
    "NatsConnectFailed",
    "connect",
    "connect_options",
    "encode_headers",
    "explain_connect_error",
    "header_line_size",
    "message_size",
    "nats_url_problem",
    "open_client",
    "redact_servers",
    "redact_url",
    "subscribe_detached",
]

DEFAULT_SERVERS = ("nats://127.0.0.1:4222",)
#: ``NATS/1.0\r\n`` and the blank line that ends a message's header block.
_HEADER_BLOCK = len(b"NATS/1.0\r\n\r\n")
#: A header name nats-py accepts (an RFC 7230 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: ``nats.connect`` options of a process that must outlive any NATS outage (the ingress's
#: publisher, routers, projection workers, agents): reconnect for ever, every 0.25 s, and
#: find a dead server within ~15 s (a ping every 5 s, three unanswered).
RECONNECT_FOREVER: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
)
#: ``connect`` options of a one-shot command (the CLI's ``dlq``, ``projections`` and
#: ``routes simulate``): three quick attempts per server, then :class:`NatsConnectFailed`.
#: nats-py's defaults retry for about two minutes (60 attempts, 2 s apart), which for a
#: person at a terminal looks like a hang.
ONE_SHOT: Final[Mapping[str, Any]] = MappingProxyType(
    {"max_reconnect_attempts": 2, "reconnect_time_wait": 0.5}
)

log = structlog.get_logger(__name__)


class InvalidNatsSettings(BrokerError):
    """The NATS connection settings contradict each other or name unreadable files."""

    error_code: ClassVar[str] = "invalid_nats_settings"


class NatsConnectFailed(BrokerError):
    """No connection to NATS could be made; the message says why (start-up, not HTTP)."""

    error_code: ClassVar[str] = "nats_connect_failed"


class ConnectOptions(TypedDict, total=False):
    """The ``nats.connect`` keyword options this module sets (pass them with ``**``)."""

    servers: list[str]
    name: str
    connect_timeout: float
    tls: ssl.SSLContext
    user: str
    password: str
    token: str
    user_credentials: str
    #: Where the client's own replies come (``_INBOX`` by default): an agent's user that may
    #: subscribe to its own prefix only (docs/tenants.md) connects with it.
    inbox_prefix: str


def connect_options(
    settings: Settings, *, name: str, servers: str | Sequence[str] | None = None
) -> ConnectOptions:
    """``nats.connect`` keyword options for ``settings``: servers, TLS, credentials, timeout.

    ``servers`` (a comma-separated string or a list) replaces ``settings.nats_url``, for
    commands that take their own ``--nats-url``; with neither, ``nats://127.0.0.1:4222``.
    """
    options = ConnectOptions(
        servers=_servers(servers if servers is not None else settings.nats_url),
        name=name,
        connect_timeout=settings.nats_connect_timeout,
    )
    tls = tls_context(settings)
    if tls is not None:
        plain = [url for url in options["servers"] if urlsplit(url).scheme.lower() == "ws"]
        if plain:
            # A ws:// server is spoken to in plaintext whatever the TLS settings say (nats-py
            # never upgrades a WebSocket), credentials included.
            raise InvalidNatsSettings(
                f"{redact_servers(plain)} is plaintext WebSocket, while BROKER_NATS_TLS_* ask "
                "for TLS: use wss://"
            )
        options["tls"] = tls
    _add_credentials(options, settings)
    return options


def _servers(urls: str | Sequence[str] | None) -> list[str]:
    if urls is None:
        return list(DEFAULT_SERVERS)
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    servers = [url.strip() for url in parts if url.strip()]
    return servers or list(DEFAULT_SERVERS)


#: The schemes nats-py connects with, by transport: TCP, or WebSocket (not mixed in a list).
_TCP_SCHEMES = frozenset({"nats", "tls"})
_WS_SCHEMES = frozenset({"ws", "wss"})


def nats_url_problem(urls: str, *, option: str = "--nats-url") -> str | None:
    """Why ``urls`` (NATS URLs, comma-separated: one or a cluster's) names no server to
    connect to, before any connection is tried; ``None`` when each one is usable.

    Each is ``SCHEME://HOST[:PORT]`` (``nats``, ``tls``, ``ws``, ``wss``; the user and
    password may precede the host) or ``HOST[:PORT]``, read as ``nats://``, as nats-py reads
    them. nats-py takes many wrong ones for a host to try (``bogus://x`` for the host
    ``bogus``, ``nats://a b:4222`` for ``a b``) and others fail only once connecting, so a
    typo read as "cannot reach NATS". The message names ``option`` and shows the URL
    without its credentials (:func:`redact_url`)."""
    servers = [url.strip() for url in urls.split(",") if url.strip()]
    if not servers:
        return f"{option} names no NATS server; give nats://HOST:PORT"
    for url in servers:
        if reason := _server_problem(url):
            return (
                f"{option}: {redact_url(url)} is not a NATS server URL ({reason}); give "
                "nats://HOST:PORT, comma-separated for a cluster"
            )
    schemes = {urlsplit(_with_scheme(url)).scheme for url in servers}
    if schemes & _WS_SCHEMES and schemes & _TCP_SCHEMES:
        return (
            f"{option} {redact_servers(servers)} mixes ws:// or wss:// with other schemes, "
            "which one connection cannot use together"
        )
    if schemes & _WS_SCHEMES and not websockets_available():
        return (
            f"{option} {redact_servers(servers)}: ws:// and wss:// need the aiohttp package, "
            "which is not installed: pip install 'agent-broker[websocket]'"
        )
    return None


def websockets_available() -> bool:
    """Whether nats-py can speak to ``ws://`` and ``wss://`` servers here: it needs aiohttp,
    which it does not require (each connect attempt then failed with an ImportError)."""
    return importlib.util.find_spec("aiohttp") is not None


def _with_scheme(url: str) -> str:
    return url if "://" in url else f"nats://{url}"


def _server_problem(url: str) -> str | None:
    """What is wrong with one server's URL, in words that quote none of it (the port's
    text may be a piece of a password)."""
    scheme = url.partition("://")[0] if "://" in url else "nats"
    if scheme not in _TCP_SCHEMES | _WS_SCHEMES:
        return "its scheme is not nats, tls, ws or wss"
    parts = urlsplit(_with_scheme(url))
    # After the last @: the user and password before it may hold any character but / ? #.
    if any(c.isspace() or not c.isprintable() for c in parts.netloc.rpartition("@")[2]):
        return "its host or port holds a space or a control character"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        # nats-py decodes no percent-encoding: such a password cannot be in the URL.
        hint = (
            ": a password with / ? or # cannot be written in a URL; set BROKER_NATS_USER "
            "and BROKER_NATS_PASSWORD instead"
            if "@" in url
            else ""
        )
        return f"its port is not a number from 1 to 65535{hint}"
    if not parts.hostname:
        return "it names no host"
    return None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for NATS, or ``None`` when no ``nats_tls_*`` is set: a
    :class:`RenewingContext`, which reads the files again for a new connection once they
    changed. :class:`InvalidNatsSettings` when they do not go together or do not load."""
    files = TlsFiles(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)
    if files.ca is None and files.cert is None and files.key is None:
        return None
    if (files.cert is None) != (files.key is None):
        raise InvalidNatsSettings(
            "BROKER_NATS_TLS_CERT and BROKER_NATS_TLS_KEY go together: "
            f"got only {'the certificate' if files.key is None else 'the key'}"
        )
    return RenewingContext.of(files)


@dataclass(frozen=True)
class TlsFiles:
    """The files of a NATS client's TLS: the servers' CA, the client certificate and key."""

    ca: Path | None
    cert: Path | None
    key: Path | None

    def stamp(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        """What tells a file changed: its inode, size, modification and change time (the
        last moves with a ``chmod``, so a key made readable after a failed reload is tried
        again); ``None`` for a file that cannot be read now."""
        stamps: list[tuple[int, int, int, int] | None] = []
        for path in (self.ca, self.cert, self.key):
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            stamps.append(
                None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            )
        return tuple(stamps)

    def context(self) -> ssl.SSLContext:
        """A context of these files as they are now; :class:`InvalidNatsSettings` naming
        the setting when one cannot be read or does not load."""
        named = (("NATS_TLS_CA", self.ca), ("NATS_TLS_CERT", self.cert), ("NATS_TLS_KEY", self.key))
        for setting, path in named:
            _require_readable(setting, path)
        # Verifies the server's chain (against ``ca``, or the system's CAs) and its host name.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.ca is not None:
                context.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, ValueError, OSError) as e:  # OSError: gone since it was checked
            raise InvalidNatsSettings(
                f"BROKER_NATS_TLS_CA {self.ca} holds no usable CA: {e}"
            ) from None
        if self.cert is not None and self.key is not None:
            try:
                context.load_cert_chain(str(self.cert), str(self.key))
            except (ssl.SSLError, OSError) as e:
                raise InvalidNatsSettings(
                    f"BROKER_NATS_TLS_CERT {self.cert} and BROKER_NATS_TLS_KEY {self.key} do "
                    f"not load as a PEM certificate and its private key: {e}"
                ) from None
        return context


class RenewingContext(ssl.SSLContext):
    """A NATS client's TLS context that makes each new connection (a reconnect included)
    with its files as they are then: read again once any of them changed (a certificate
    renewed by cert-manager, a CA bundle replaced), so a router, worker or agent that runs
    for months reconnects with the certificate that is valid now, not the one it started
    with. Files that do not load then (a certificate written before its key) leave the
    context as it was (``nats_tls_files_not_reloaded``), and are tried again once they
    change again. Only ``wrap_bio``/``wrap_socket`` are passed on: nats-py and asyncio make
    their TLS connections with those."""

    _files: TlsFiles
    _stamp: tuple[tuple[int, int, int, int] | None, ...]
    _current: ssl.SSLContext

    @classmethod
    def of(cls, files: TlsFiles) -> RenewingContext:
        current = files.context()  # raises: at start, files that do not load are an error
        context = cls(ssl.PROTOCOL_TLS_CLIENT)  # as ``current``: verifies, checks host names
        context._files, context._stamp, context._current = files, files.stamp(), current
        return context

    def _renewed(self) -> ssl.SSLContext:
        stamp = self._files.stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._current = self._files.context()
            except InvalidNatsSettings as e:
                log.warning("nats_tls_files_not_reloaded", error=e.message)
            else:
                log.info("nats_tls_files_reloaded", cert=str(self._files.cert or ""))
        return self._current

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self._renewed().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(  # noqa: PLR0917 - ssl.SSLContext's own signature
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return self._renewed().wrap_socket(
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            server_hostname,
            session,
        )


class LogThrottle:
    """Lets one log line per text through every ``every`` seconds, counting the rest: a
    connection retried every 0.25 s while NATS is away would log each failed attempt."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}  # text -> (last let through, held back)

    def admit(self, text: str) -> int | None:
        """``None`` to hold the line back; else how many were held back since the last."""
        now = time.monotonic()
        last, held = self._seen.get(text, (-math.inf, 0))
        if now - last < self.every:
            self._seen[text] = (last, held + 1)
            return None
        if len(self._seen) > 1000:  # bounded: texts carry subjects
            self._seen.clear()
        self._seen[text] = (now, 0)
        return held


def _require_readable(setting: str, path: Path | None) -> None:
    if path is None:
        return
    if not path.is_file() or not os.access(path, os.R_OK):
        raise InvalidNatsSettings(f"BROKER_{setting} {path} is not a readable file")


def _add_credentials(options: ConnectOptions, settings: Settings) -> None:
    kinds = [
        kind
        for kind, present in (
            ("BROKER_NATS_USER/BROKER_NATS_PASSWORD", settings.nats_user or settings.nats_password),
            ("BROKER_NATS_TOKEN", settings.nats_token),
            ("BROKER_NATS_CREDS", settings.nats_creds),
        )
        if present
    ]
    if len(kinds) > 1:
        raise InvalidNatsSettings(f"choose one kind of NATS credentials, not {' and '.join(kinds)}")
    if settings.nats_password is not None and not settings.nats_user:
        raise InvalidNatsSettings("BROKER_NATS_PASSWORD is set without BROKER_NATS_USER")
    if settings.nats_user:
        options["user"] = settings.nats_user
        if settings.nats_password is not None:
            options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token is not None:
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_creds is not None:
        _require_readable("NATS_CREDS", settings.nats_creds)
        options["user_credentials"] = str(settings.nats_creds)


def header_line_size(name: str, value: str) -> int:
    """Bytes one header takes in a message's header block (``name: value\\r\\n``)."""
    return len(name.encode()) + len(value.encode(errors="replace")) + 4


def message_size(payload: bytes, headers: Mapping[str, str] | None = None) -> int:
    """Bytes of a message as the server counts them against ``max_payload``: the payload
    and the header block nats-py writes (``NATS/1.0``, one line per header, a blank line).
    nats-py checks the payload alone, and the server closes the connection on a message
    over the limit, so a message whose headers may be large is measured first."""
    if not headers:
        return len(payload)
    return len(payload) + _HEADER_BLOCK + sum(header_line_size(k, v) for k, v in headers.items())


#: Header names already checked, with the bytes they start their line with (``name: ``;
#: empty for a name nats-py skips): the same few names are on every message.
_HEADER_NAMES: dict[str, bytes] = {}
_HEADER_NAMES_KEPT = 1024


def _header_name(name: str) -> bytes:
    key = name.strip()
    if key and not _HEADER_NAME.fullmatch(key):
        raise nats.errors.BadHeaderError(key)
    line = f"{key}: ".encode() if key else b""
    if len(_HEADER_NAMES) < _HEADER_NAMES_KEPT:
        _HEADER_NAMES[name] = line
    return line


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """A message's header block as nats-py 2.16 writes it, byte for byte and with the same
    refusals: names and values stripped, a blank name skipped, a name that is not an RFC
    7230 token refused (``BadHeaderError``), CR and LF in a value written as spaces.

    nats-py checks every name with a regular expression and cleans every value with
    ``str.translate`` and a dict, which raises and clears a ``KeyError`` per character:
    7.6 µs for a stored message's seven headers, against 1.3 µs here."""
    parts = [b"NATS/1.0\r\n"]
    names = _HEADER_NAMES
    for name, raw in headers.items():
        line = names.get(name)
        if line is None:
            line = _header_name(name)
        if not line:
            continue
        value = raw.strip()
        if "\r" in value or "\n" in value:
            value = value.replace("\r", " ").replace("\n", " ")
        parts += (line, value.encode(), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def decode_headers(block: bytes) -> dict[str, str] | None:
    """A stored message's header block (``NATS/1.0`` and ``Name: Value`` lines) read as
    nats-py reads a delivered message's: names and values stripped, values UTF-8 (U+FFFD
    for bad bytes), a line without a colon or with a name that is not ASCII or holds
    whitespace skipped, the last of a repeated name kept; ``None`` when none is left."""
    found: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:  # the first is the version line
        name, colon, value = line.partition(b":")
        key = name.strip()
        if not colon or not key.isascii():
            continue
        text = key.decode()
        if any(c.isspace() for c in text):  # str's whitespace: \x1c to \x1f too
            continue
        found[text] = value.strip().decode("utf-8", "replace")
    return found or None


async def get_stored(
    js: JetStreamContext,
    stream: str,
    seq: int | None = None,
    *,
    subject: str | None = None,
    following: bool = False,
) -> RawStreamMsg:
    """``js.get_msg`` (the stream leader's answer, never a direct get, which a lagging
    replica may answer), with the headers read as a consumer reads them. nats-py reads
    this answer's headers with :mod:`email`'s parser, which makes any value that is not
    ASCII an ``email.header.Header`` of mangled bytes: a decision whose ``Broker-Route``
    quotes an agent's error in German could not be read back, nor a client's
    ``Broker-Intent`` in Chinese compared. ``seq`` alone: that record; ``subject`` alone:
    the subject's last; both with ``following``: the subject's first from ``seq`` on. Raises
    what ``get_msg`` raises (``NotFoundError`` when there is none)."""
    raw = await js.get_msg(stream, seq, subject=subject, next=following)
    if raw.hdrs:
        raw.headers = decode_headers(base64.b64decode(raw.hdrs))
    return raw


def _unsendable(subject: str) -> bool:
    """Whether nats-py refuses ``subject`` in a publish: empty, or with whitespace that
    would break the protocol line (a space, tab, CR or LF)."""
    return not subject or " " in subject or "\t" in subject or "\r" in subject or "\n" in subject


class _TcpTransport(TcpTransport):
    """nats-py's TCP transport, whose close does not wait on a socket a failed TLS upgrade
    took. ``start_tls`` hands the socket to its TLS protocol and closes it when the handshake
    fails, so the plain stream's protocol never hears of the close, and nats-py's close
    after the failed attempt waited for it for good: a client with TLS settings against a
    plaintext port hung on its second attempt, with nothing scheduled to wake it."""

    async def wait_closed(self) -> None:
        writer = self._io_writer
        if writer is not None and writer.transport.get_protocol() is not getattr(
            writer, "_protocol", None
        ):
            return  # taken over: closed by start_tls already
        await super().wait_closed()  # type: ignore[no-untyped-call]


class Client(NatsClient):
    """nats-py's client, with these changes:

    - a subject or reply subject that is not UTF-8 is read with U+FFFD for the bad bytes
      instead of stopping its read loop (see the module's docstring);
    - with TLS configured, or a ``tls://`` URL, every connection is TLS (with the system's
      CAs when nothing is configured). nats-py upgrades only when the server's
      first ``INFO`` asks for it, so a server (or anything on the path) that leaves
      ``tls_required`` out got a plaintext connection, and the user and password in clear.
      The upgrade is made regardless: a server without TLS fails the handshake, before any
      credential is sent;
    - a message's headers are written by :func:`encode_headers` (the same bytes, a fifth of
      nats-py's time: a stored message has several, and every publish pays for them), and a
      message over ``max_payload`` with them is refused (``MaxPayloadError``) before it is
      sent: nats-py checks the payload alone, and the server closes the connection on it,
      which loses every other publish's ack in flight on that connection;
    - :meth:`publish` checks the subject and reply subject for what nats-py refuses (empty,
      or holding a space, tab, CR or LF) with ``in`` tests instead of a regular expression;
    - a ``ws://`` or ``wss://`` connection attempt is given ``connect_timeout``: nats-py
      passed it to aiohttp as a close timeout, and a handshake that never ended took 300 s;
    - a TCP connection is made with :class:`_TcpTransport` (a failed TLS upgrade no longer
      hangs the close that follows it).
    """

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """nats-py's ``publish``, the same checks in the same order and the same errors.

        nats-py looks for a space, tab, CR or LF with a regular expression search (its
        ``_validate_subject``), twice per message with a reply subject: about 1.2 µs of the
        ingress's every publish, against 0.2 µs for the four ``in`` tests here."""
        if not self._skip_subject_validation and (
            _unsendable(subject) or (reply and _unsendable(reply))
        ):
            raise nats.errors.BadSubjectError
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        payload_size = len(payload)
        if not self.is_connected and (
            self._max_pending_size <= 0
            or payload_size + self._pending_data_size > self._max_pending_size
        ):  # reconnecting, and buffering is off or its buffer is full
            raise nats.errors.OutboundBufferLimitError
        if payload_size > self._max_payload:
            raise nats.errors.MaxPayloadError
        await self._send_publish(subject, reply, payload, payload_size, headers)

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        if headers is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        if subject == "":
            raise nats.errors.BadSubjectError
        header_block = encode_headers(headers)
        if len(header_block) + payload_size > self._max_payload:
            # The server counts the headers against max_payload and closes the connection
            # on a message over it, losing every ack in flight on it; nats-py checks the
            # payload alone.
            raise nats.errors.MaxPayloadError
        command = hpub_cmd(subject, reply, header_block, payload)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _connect_to_server(self, s: Any) -> None:
        if s.uri.scheme not in _WS_SCHEMES:  # nats-py's, with a transport of ours
            s.last_attempt = time.monotonic()
            if not self._transport:
                self._transport = _TcpTransport()  # type: ignore[no-untyped-call]
            timeout = self.options["connect_timeout"]
            await self._transport.connect(s.uri, DEFAULT_BUFFER_SIZE, timeout)
            return
        # nats-py hands ``connect_timeout`` to aiohttp's ``ws_connect`` as its (deprecated)
        # close timeout, so a WebSocket handshake to a port that accepts and never answers
        # ran under aiohttp's own 300 s instead.
        await asyncio.wait_for(super()._connect_to_server(s), self.options["connect_timeout"])

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        if (
            initial_connection
            and server is not None
            and ("tls" in self.options or server.uri.scheme == "tls")
        ):
            info["tls_required"] = server.uri.scheme not in ("ws", "wss") or bool(
                info.get("tls_required")
            )  # the dict nats-py reads next (its _server_info)
        await super()._process_info(info, initial_connection)

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        return self.msg_class(
            subject=subject.decode(errors="replace"),  # as fast as strict for UTF-8
            reply=reply.decode(errors="replace"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )


async def subscribe_detached(
    nc: NatsClient, subject: str, cb: Callable[[Msg], Awaitable[None]]
) -> Subscription:
    """``nc.subscribe(subject, cb=cb)`` made in an empty context: for a subscription made
    lazily by the first request that needs it and kept for the life of the connection.
    nats-py runs each subscription's callbacks in a task of its own, which would otherwise
    keep that first request's context for good: its trace (every later span and log line
    of the callbacks attributed to it) and its bound log fields."""
    return await asyncio.get_running_loop().create_task(
        nc.subscribe(subject, cb=cb), context=contextvars.Context()
    )


#: Seconds :func:`close_within` gives the server, unless told otherwise.
CLOSE_SECONDS = 3.0


async def close_within(nc: NatsClient, seconds: float = CLOSE_SECONDS) -> None:
    """Close ``nc`` (what is still buffered is written first), giving up on the server after
    ``seconds``: its socket is then cut.

    Not ``drain()``: a caller waits for the acks that matter first, and nats-py's drain, once
    its time is up, swallows the cancellation and waits for a PONG (10 s) that a hung
    server never sends. ``close()`` itself waits, unbounded, for the socket to take what is
    buffered; a server that stopped reading never does."""
    closing = asyncio.ensure_future(nc.close())
    done, _ = await asyncio.wait({closing}, timeout=seconds)
    if not done:
        log.warning("nats_close_timed_out", seconds=seconds)
        _cut(nc)
        await asyncio.wait({closing}, timeout=1.0)
        closing.cancel()
    if closing.done() and not closing.cancelled() and closing.exception() is not None:
        log.debug("nats_close_failed", error=repr(closing.exception())[:200])
    await _close_websocket(nc)


def _cut(nc: NatsClient) -> None:
    """Abort ``nc``'s socket, leaving what it had not sent (nats-py has no public way)."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is not None:
        transport.abort()


async def _close_websocket(nc: NatsClient) -> None:
    """Close the aiohttp session of ``nc``'s WebSocket transport, if it has one still open.
    nats-py leaves it open when a connect fails, and when a client closed while disconnected
    (its close stops at the transport's drain, which raises without a socket), and asyncio
    then logs "Unclosed client session" as an error when the process exits."""
    session = getattr(getattr(nc, "_transport", None), "_client", None)
    if session is None or getattr(session, "closed", True):
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(session.close(), 1.0)


async def open_client(**options: Any) -> Client:
    """``nats.connect(**options)``, with a :class:`Client`. Interrupted (cancelled, or
    failed), the half-made client's TCP or TLS socket is cut, or its WebSocket session
    closed (nats-py starts the client's tasks only once it is connected)."""
    client = Client()
    try:
        await client.connect(**options)
    except BaseException:
        _cut(client)
        await _close_websocket(client)
        raise
    return client


#: How long :func:`cancel_until_done` gives a cancelled task before cancelling it again:
#: long enough for the task's own cleanup (a ``finally`` closing a connection, which takes
#: a few seconds at most against a hung server), short enough for a stop.
CANCEL_AGAIN_SECONDS = 2.0


async def cancel_until_done(
    task: asyncio.Future[Any], *, again: float = CANCEL_AGAIN_SECONDS
) -> None:
    """Cancel ``task`` and wait until it is done, cancelling it again every ``again``
    seconds while it runs. Whatever it raised is left in it, read (asyncio logs no
    "exception was never retrieved" for it). Cancelled itself while it waits, it cancels
    ``task`` once more and stops waiting.

    For a task awaiting nats-py: ``Client._flush_pending`` catches ``CancelledError``, so a
    cancellation that lands there (a connect attempt's first flush, a publish waiting for
    room in the flush queue) is lost and the task goes on, to its next connect attempt, say.
    Cancelled once and awaited, such a task kept a stopping process waiting until its stop
    deadline ended it, or, with none, for good. Not sooner than ``again``: a task whose
    ``finally`` closes a connection must be let finish that, and a second cancellation
    would cut it short."""
    try:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=again)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.cancelled():
        task.exception()


async def connect(options: ConnectOptions, **extra: Any) -> NatsClient:
    """Connect with ``options`` (and any other ``nats.connect`` keyword in ``extra``).

    Raises :class:`NatsConnectFailed`, from the original error, when it cannot connect.
    An ``error_cb`` in ``extra`` replaces the debug line logged per failed attempt.
    """
    client = Client()
    failures: list[Exception] = []
    error_cb = extra.pop("error_cb", None)

    async def attempt_failed(error: Exception) -> None:
        # Instead of nats-py's default, which logs a traceback per attempt: the caller gets
        # the explanation in the exception.
        failures[:] = [error]
        if error_cb is not None:
            await error_cb(error)
        else:
            log.debug("nats_connect_attempt_failed", error=explain_connect_error(error, options))

    # nats-py annotates connect_timeout as int; it is used as float seconds (asyncio.wait_for).
    keywords: dict[str, Any] = {"error_cb": attempt_failed, **options, **extra}
    try:
        await client.connect(**keywords)
    except BaseException as e:
        await _close_websocket(client)
        if not isinstance(e, OSError | TimeoutError | nats.errors.Error):
            raise
        # After retries nats-py raises NoServersError, and keeps that as its last error:
        # the cause is the last attempt's error (refused, timed out, TLS).
        cause: BaseException = e
        if isinstance(e, nats.errors.NoServersError):
            cause = failures[-1] if failures else client.last_error or e
        raise NatsConnectFailed(explain_connect_error(cause, options)) from e
    return client


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def redact_url(url: str) -> str:
    """``url`` as a log line or an error message may show it: its user information (all
    before the *last* ``@``, as nats-py reads it) replaced by ``***``.

    ``nats://user:p@ss@host:4222`` and ``user:p@ss@host:4222`` (a server without a scheme)
    become ``nats://***@host:4222`` and ``***@host:4222``; a URL without ``@`` is returned
    as it is.
    """
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        scheme, sep, rest = "", "", url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def redact_servers(servers: str | Sequence[str]) -> str:
    """Servers (a comma-separated setting or a list) as one comma-separated string to show:
    each through :func:`redact_url`."""
    urls = servers.split(",") if isinstance(servers, str) else servers
    return ",".join(redact_url(url) for url in urls)


def _ssl_cause(error: BaseException) -> BaseException:
    """The :mod:`ssl` error ``error`` was raised from, when a transport wrapped one (nats-py's
    WebSocket transport raises aiohttp's errors, which subclass ``ssl``'s without their
    attributes); else ``error`` itself."""
    cause: BaseException | None = error
    for _ in range(4):  # a short chain: aiohttp's error, then ssl's
        if cause is None:
            break
        if type(cause).__module__ == "ssl":
            return cause
        cause = cause.__cause__  # raised from it (not merely while handling it)
    return error


def explain_connect_error(error: BaseException, options: ConnectOptions) -> str:
    """What a failed NATS connection means, naming the settings to check; no secrets."""
    servers = redact_servers(options.get("servers", DEFAULT_SERVERS))
    error = _ssl_cause(error)
    if isinstance(error, ssl.SSLCertVerificationError):
        why = getattr(error, "verify_message", None) or error
        return (
            f"NATS at {servers}: the server's certificate was refused ({why}); "
            "set BROKER_NATS_TLS_CA to the CA that signed it, and use a URL whose host the "
            "certificate names"
        )
    if isinstance(error, ssl.SSLError) and getattr(error, "reason", None) == "WRONG_VERSION_NUMBER":
        return (
            f"NATS at {servers}: the server did not answer in TLS; is it a plaintext port "
            "(a nats:// or ws:// one)? Use the server's TLS port, or its plaintext URL without "
            "BROKER_NATS_TLS_*"
        )
    if isinstance(error, ssl.SSLError):
        why = getattr(error, "reason", None) or error
        return (
            f"NATS at {servers}: the TLS handshake failed ({why}); the server may require a "
            "client certificate (BROKER_NATS_TLS_CERT, BROKER_NATS_TLS_KEY) signed by a CA "
            "it trusts"
        )
    if isinstance(error, nats.errors.AuthorizationError) or (
        isinstance(error, nats.errors.Error) and "authorization violation" in str(error).lower()
    ):
        return (
            f"NATS at {servers} refused the credentials (authorization violation); check "
            "BROKER_NATS_USER and BROKER_NATS_PASSWORD, BROKER_NATS_TOKEN or BROKER_NATS_CREDS"
        )
    if isinstance(error, ConnectionResetError | BrokenPipeError | EOFError) and "tls" in options:
        return (
            f"NATS at {servers} closed the connection ({error}); while connecting this means "
            "it verifies client certificates and refused ours or its absence: set "
            "BROKER_NATS_TLS_CERT and BROKER_NATS_TLS_KEY to a certificate signed by a CA "
            "it trusts"
        )
    if any(c.__name__ == "ClientResponseError" for c in type(error).__mro__):
        # aiohttp's, over ws:// or wss://: an HTTP answer, or none, where a WebSocket
        # handshake was expected (its message may quote a NATS port's whole INFO line).
        said = str(getattr(error, "message", "")).split(":", 1)[0][:60]  # not what followed
        answer = f"{getattr(error, 'status', '?')} {said}".strip()
        return (
            f"NATS at {servers} did not accept a WebSocket ({answer}); give the port of the "
            "server's websocket listener, or a nats:// URL for its client port"
        )
    if isinstance(error, TimeoutError):
        timeout = options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)  # nats-py's own
        return f"NATS at {servers} did not answer within {timeout} s"
    if isinstance(error, nats.errors.NoServersError):
        return f"no NATS server answered at {servers}"
    return f"NATS at {servers}: {error or type(error).__name__}"
