"""structlog processors: trace ids on every line, and nothing secret in any line.

:func:`add_trace_ids` binds ``trace_id`` and ``span_id`` of the recorded (sampled) span
running when the line is logged, so a log line leads to its trace. :func:`redact_secrets`
replaces the value of any field whose name says it is secret (see :func:`is_secret_name`:
password, token, authorization, ``x-auth``, ``session_id``, ``aws_access_key_id``, ...),
also in ``(name, value)`` pairs and ``{"name": ..., "value": ...}`` items (header lists,
environment lists), and the credentials in URLs (``nats://user:pass@host`` becomes
``nats://***@host``; all up to the *last* ``@``, as nats-py reads a password with a raw
``@``; also a bare ``user:pass@host`` token in any text). In every string it also masks
``name=value`` and ``name: value`` where the name is secret (``password=hunter2`` becomes
``password=[redacted]``), bearer and basic credentials, JWTs, NATS credentials and seeds,
and payment card numbers (``[card ****4242]``, see :mod:`broker.sensitive`); an exception
or any other object logged as a field is rendered (``repr``) and scrubbed like a string. It
never lets a payload through under the names a payload would have (``payload``, ``body``).
The keys of a dict logged as a field are field names too, at any depth
(``cfg={"password": ...}``).
Run it after ``format_exc_info``: the formatted traceback (``exception``) is scrubbed like
any field.

Card masking is always on in logs, whatever ``detect_card_numbers`` says: a log line is
never the place for a card number. It costs a length check for strings under 13
characters and two substring searches for the rest; only strings with 13 digits in a row,
or two 3+ digit groups one separator apart, are looked at closely.

Every pattern here is linear in the text it scans: a name or a run is tried only where
one can start (after a character that cannot continue it), so no text, however hostile,
is scanned twice over.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, MutableMapping
from functools import lru_cache
from typing import Any

from broker.sensitive import redact_text, text_may_hold_card

REDACTED = "[redacted]"

# --- names -------------------------------------------------------------------------------
#: A name's words: ``X-Auth-Token``, ``x_auth_token`` and ``xAuthToken`` all read
#: ``x``, ``auth``, ``token``.
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD_SEPARATORS = re.compile(r"[^a-z0-9]+")
#: Words that say "secret" wherever they sit in a word (``dbpassword``, ``client_secret``).
_SECRET_INSIDE = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "credential",
    "authorization",
    "cookie",
    "jwt",
    "nkey",
)
#: Words that say it at a word's end (``accesstoken``, ``jsessionid``), not at its start:
#: ``tokenizer`` is no token.
_SECRET_ENDINGS = (
    "token",
    "tokens",
    "apikey",
    "apikeys",
    "privatekey",
    "accesskey",
    "secretkey",
    "signingkey",
    "sessionkey",
    "sessionid",
    "sessid",
    "seed",
)
#: Words that say it only alone: ``auth`` (not ``author``, ``authority``, ``oauth``).
_SECRET_WORDS = frozenset({"pass", "pwd", "auth", "creds", "bearer"})
#: ``<owner>_key`` is a secret for these owners (``api_key``, ``aws_access_key_id``), not
#: for others (``primary_key``, ``idempotency_key``, ``keyboard``).
_KEY_OWNERS = frozenset({"api", "private", "access", "secret", "signing", "session", "master"})


def is_secret_name(name: str) -> bool:
    """Whether a field, header or setting called ``name`` holds a secret: one of its words
    holds ``password``, ``secret``, ``credential``, ``authorization``, ``cookie``, ``jwt``
    or ``nkey``; ends in ``token``, ``apikey``, ``privatekey``, ``sessionid``, ``seed``
    (and the like); is ``pass``, ``pwd``, ``auth``, ``creds`` or ``bearer``; or two words
    read ``api key``, ``private key``, ``access key``, ``session key``, ``session id``.
    ``author``, ``authority``, ``tokenizer``, ``session_count`` or ``keyboard`` are not."""
    # Names are few and short; any other text (a value in a pair, a word before "=") is
    # judged without the cache, which would keep it alive.
    return _judged_cached(name) if len(name) <= _CACHED_NAME else _judged(name)


def _judged(name: str) -> bool:
    """See :func:`is_secret_name`."""
    words = _WORD_SEPARATORS.split(_CAMEL_HUMP.sub("_", name).lower())
    previous = ""
    for word in words:
        if (
            word in _SECRET_WORDS
            or any(marker in word for marker in _SECRET_INSIDE)
            or word.endswith(_SECRET_ENDINGS)
            or (word == "key" and previous in _KEY_OWNERS)
            or (word == "id" and previous == "session")
        ):
            return True
        previous = word
    return False


_CACHED_NAME = 64
_judged_cached = lru_cache(maxsize=4096)(_judged)


# --- secrets that say what they are, in any text ----------------------------------------
#: A bearer or basic credential: 8 characters or more; all letters only in mixed case
#: (``QWxhZGRpbg``), so that words after "basic" in a sentence stay (``Basic
#: Authentication``, ``basic checks``).
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic|bearer|basic)(\s+)([A-Za-z0-9._~+/=-]{8,})")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PEM_BLOCK = re.compile(r"-----BEGIN [^-\n]*-----.*?(?:-----END [^-\n]*-----|$)", re.DOTALL)
_NKEY_SEED = re.compile(r"\bS[A-Z][A-Z2-7]{50,}\b")
#: A URL query parameter, its value masked to the next ``&`` when its name says secret
#: (``?token=``, ``&api_key=``, ``&sig=``; :data:`_SECRET_QUERY_KEY` or :func:`is_secret_name`).
_QUERY_MARKS = ("?", "&", ";")
_QUERY_PARAMETER = re.compile(r"(?P<name>[?&;](?P<key>[A-Za-z0-9_.-]+)=)[^&#\s]+")
_SECRET_QUERY_KEY = re.compile(
    r"token|secret|password|passwd|api[_-]?key|signature|sig|jwt", re.IGNORECASE
)
#: ``name=value``, ``name: value``, ``"name": "value"`` in any text. A name starts only
#: after a character that cannot be part of it, so each word is tried once.
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z][A-Za-z0-9_.-]*)[\"']?[ \t]*[=:]")
#: The value after a secret name's ``=`` or ``:``: a quoted string (to its closing quote,
#: or the end of the line), else everything up to the next space or quote (after an
#: ``Authorization`` scheme such as ``Basic``, the credential too).
_ASSIGNED_VALUE = re.compile(
    r"(?P<space>[ \t]*)(?:(?P<quote>[\"'])(?:(?!(?P=quote))[^\\\n]|\\.)*(?P<close>(?P=quote))?"
    r"|(?:(?i:bearer|basic|digest|token|negotiate)[ \t]+)?[^\s\"']+)"
)

# --- credentials in URLs -----------------------------------------------------------------
_PAYLOAD_NAMES = frozenset({"payload", "body", "data_base64"})
#: Fields that hold server addresses: a URL, a list of them, or a bare ``user:pass@host``.
_ADDRESS_NAME = re.compile(r"(^|_)(urls?|uri|servers?|netloc|dsn)$", re.IGNORECASE)
#: User information runs to the *last* ``@`` before the next URL: a password may hold a
#: raw ``@`` (``nats://user:p@ss@host``; nats-py takes the last one, as urllib does), and
#: ``/``, ``?``, ``#`` (which no server URL can use) are hidden rather than shown.
_UPTO_LAST_AT = r"(?:(?:(?!://)[^\s@])*@)+"
#: In any text: the user information of a URL with a scheme.
_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)" + _UPTO_LAST_AT)
#: In an address field: also a bare ``user:pass@host`` (nats-py's ``connected_url.netloc``),
#: and a password with spaces (the field is addresses, split at commas, not words).
_ADDRESS_USERINFO = re.compile(r"(?:(?<=://)|(?<![^,]))(?:(?:(?!://)[^@])*@)+")
#: In any text: a word holding an ``@`` (each word tried once, from its start).
_WORD_WITH_AT = re.compile(r"(?<!\S)[^\s@]*@\S*")
#: A bare ``user:`` in such a word, where its user information would start.
_BARE_USER = re.compile(r"(?<![A-Za-z0-9._~+%-])(?P<user>[A-Za-z0-9._~+%-]+):")
#: What may follow the last ``@`` of user information: a host name or ``[`` of an IPv6.
_HOST_START = re.compile(r"[A-Za-z0-9\[]")
#: ``scheme:`` forms whose ``user@host`` holds no password (``mailto:ops@example.com``).
_NOT_A_USER = frozenset({"mailto", "sip", "sips", "xmpp", "tel"})


def add_trace_ids(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add the running span's ``trace_id``/``span_id`` (only when tracing is on)."""
    # Looked up, not imported: a process that never traces never loads OpenTelemetry.
    tracing = sys.modules.get("broker.telemetry.tracing")
    if tracing is not None:
        ctx = tracing.current()
        if ctx is not None:
            event_dict.setdefault("trace_id", ctx.trace_id_hex)
            event_dict.setdefault("span_id", ctx.span_id_hex)
    return event_dict


def _cards(text: str) -> str:
    """``text`` with card numbers masked (the same object when it holds none)."""
    return redact_text(text).value if text_may_hold_card(text) else text


def _mask_userinfo(text: str, *, address: bool = False) -> str:
    """``text`` with the user information of every URL in it replaced by ``***``
    (``nats://user:p@ss@host:4222`` → ``nats://***@host:4222``), and of every bare
    ``user:pass@host`` word. ``address``: ``text`` is a field of server addresses, where a
    bare ``user:pass@host`` is masked whatever it holds (spaces too)."""
    if "@" not in text:
        return text
    if address:
        # Only the text up to the last "@" can hold user information: a start after it
        # would scan to the end for an "@" that is not there, once per comma.
        last = text.rindex("@") + 1
        return _ADDRESS_USERINFO.sub("***@", text[:last]) + text[last:]
    if "://" in text:
        text = _USERINFO.sub(r"\g<scheme>***@", text)
    if ":" in text:
        text = _WORD_WITH_AT.sub(_mask_bare_userinfo, text)
    return text


def _mask_bare_userinfo(word: re.Match[str]) -> str:
    """A word as :func:`_mask_userinfo` writes it: ``admin:pw@db:6379`` → ``***@db:6379``,
    ``(admin:p@ss@db)`` → ``(***@db)``; a word with no ``user:`` before its last ``@``
    (``ops@example.com``, ``ocr@v2``, ``nats://***@h``) as it is."""
    text = word[0]
    last = text.rindex("@")
    if last + 1 == len(text) or not _HOST_START.match(text, last + 1):
        return text
    user = _BARE_USER.search(text, 0, last)
    if user is None or "/" in text[user.start() : last] or user["user"].lower() in _NOT_A_USER:
        return text
    return f"{text[: user.start()]}***{text[last:]}"


def _auth_credential(found: re.Match[str]) -> str:
    scheme, space, credential = found.groups()
    if credential.isalpha() and (credential[1:].islower() or credential.isupper()):
        return found[0]  # a word ("Basic Authentication"), not a credential
    return f"{scheme}{space}{REDACTED}"


def _query_parameter(found: re.Match[str]) -> str:
    if _SECRET_QUERY_KEY.search(found["key"]) or is_secret_name(found["key"]):
        return found["name"] + REDACTED
    return found[0]


def _mask_assignments(text: str) -> str:
    """``text`` with the value of every ``name=value`` / ``name: value`` whose name is
    secret replaced (``login failed password=hunter2 user=x`` → ``login failed
    password=[redacted] user=x``); the same object when it holds none."""
    pieces: list[str] = []
    done = 0
    for found in _ASSIGNMENT.finditer(text):
        if found.start() < done or not is_secret_name(found["name"]):
            continue  # inside a value already masked, or a name like any other
        if found[0][-1] == "=" and text[found.start() - 1 : found.start()] in _QUERY_MARKS:
            continue  # a URL's query parameter: masked to its "&" already
        value = _ASSIGNED_VALUE.match(text, found.end())
        if value is None:
            continue
        quote, close = value["quote"] or "", value["close"] or ""
        pieces += (text[done : found.end()], value["space"], quote, REDACTED, close)
        done = value.end()
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def _mask_marked(text: str) -> str:
    """``text`` with the secrets that say what they are replaced (see :data:`_AUTH_SCHEME`
    and the patterns after it); the same object when it holds none."""
    if "earer" in text or "asic" in text:
        text = _AUTH_SCHEME.sub(_auth_credential, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "-----BEGIN" in text:
        text = _PEM_BLOCK.sub(REDACTED, text)
    if "=" in text:
        text = _QUERY_PARAMETER.sub(_query_parameter, text)
    if "=" in text or ":" in text:
        text = _mask_assignments(text)
    if len(text) >= 52 and "S" in text:
        text = _NKEY_SEED.sub(REDACTED, text)
    return text


def _text(text: str, address: bool = False) -> str:
    # Secret-named values first: in ``password:@x`` the value is "@x", which read as user
    # information would leave "@x" in place.
    return _cards(_mask_userinfo(_mask_marked(text), address=address))


def _exception_text(error: object) -> str:
    """What a renderer would write for ``error`` (its ``repr``), to be scrubbed first."""
    try:
        return repr(error)
    except Exception:  # an exception whose repr fails still gets a line
        return f"<unprintable {type(error).__name__}>"


def _scrub(value: Any, address: bool = False) -> Any:
    if isinstance(value, str):
        return _text(value, address)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"[{len(value)} bytes omitted]"  # raw bytes are a payload's, or a key's
    if isinstance(value, BaseException):  # rendered by repr() later: its message is text
        return _text(_exception_text(value), address)
    if isinstance(value, list | tuple):
        # A (name, value) pair is a header or a field: its name says whether it is secret.
        if len(value) == 2 and isinstance(value[0], str) and is_secret_name(value[0]):
            return [value[0], REDACTED] if isinstance(value, list) else (value[0], REDACTED)
        return type(value)(_scrub(v, address) for v in value)
    if isinstance(value, set | frozenset):
        return [_scrub(v, address) for v in value]
    if isinstance(value, Mapping):
        return _mapping(value, address)
    if value is None or isinstance(value, bool | int | float) or hasattr(value, "__structlog__"):
        return value
    # Any other object is written by its repr (both renderers do so, after every processor):
    # a dataclass's or a model's ``password='…'``, a URL's password, are text like any other.
    return _text(_exception_text(value), address)


_ITEM_NAMES = frozenset({"name", "key"})
_ITEM_VALUES = frozenset({"value", "values"})


def _mapping(value: Mapping[Any, Any], address: bool) -> dict[Any, Any]:
    """A mapping as a dict of its scrubbed items. A nested key is a field name like any
    other (``cfg={"password": ...}``; HTTP headers too), and an item that names itself
    (``{"name": "Authorization", "value": "Bearer x"}``, a header list's, an environment
    list's) has its ``value`` masked when its name is secret."""
    items = {k: _field(k, v, address) for k, v in value.items()}
    named_secret = any(
        isinstance(k, str) and k.lower() in _ITEM_NAMES and isinstance(v, str) and is_secret_name(v)
        for k, v in value.items()
    )
    if named_secret:
        for k in items:
            if isinstance(k, str) and k.lower() in _ITEM_VALUES:
                items[k] = REDACTED
    return items


def _field(key: object, value: Any, address: bool = False) -> Any:
    """``value`` as it may be logged under the name ``key``, at any depth."""
    if not isinstance(key, str):
        return _scrub(value, address)
    if is_secret_name(key):
        return REDACTED
    if key in _PAYLOAD_NAMES:
        size = len(value) if isinstance(value, bytes | str) else None
        return f"[payload omitted: {size} bytes]" if size is not None else REDACTED
    return _scrub(value, address or _is_address(key))


def _is_address(name: object) -> bool:
    return isinstance(name, str) and _ADDRESS_NAME.search(name) is not None


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Blank secret-looking fields and payloads; strip credentials out of URLs and text;
    mask card numbers."""
    for key, value in event_dict.items():
        if key == "event":
            if isinstance(value, str):  # a third-party line's message, too
                event_dict[key] = _text(value)
            else:
                event_dict[key] = _scrub(value)
            continue
        event_dict[key] = _field(key, value)
    return event_dict
