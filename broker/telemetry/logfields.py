"""structlog processors: trace ids on every line, and nothing secret in any line.

:func:`add_trace_ids` binds ``trace_id`` and ``span_id`` of the recorded (sampled) span
running when the line is logged, so a log line leads to its trace. :func:`redact_secrets`
replaces the value of any field whose name says it is secret (password, token,
authorization, ...) and the credentials in URLs (``nats://user:pass@host`` becomes
``nats://***@host``; all up to the *last* ``@``, as nats-py reads a password with a raw
``@``; in fields of server addresses, ``server``, ``*_url`` and the like, also a bare
``user:pass@host``), it masks payment card numbers in every string (``[card ****4242]``,
see :mod:`broker.sensitive`), and it never lets a payload through under the names a
payload would have (``payload``, ``body``). The keys of a dict logged as a field are
field names too, at any depth (``cfg={"password": ...}``). Run it after
``format_exc_info``: the formatted traceback (``exception``) is scrubbed like any field.

Card masking is always on in logs, whatever ``detect_card_numbers`` says: a log line is
never the place for a card number. It costs a length check for strings under 13
characters and two substring searches for the rest; only strings with 13 digits in a row,
or two 3+ digit groups one separator apart, are looked at closely.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

from broker.sensitive import redact_text, text_may_hold_card

_SECRET_NAME = re.compile(
    r"pass(word|wd)?$|secret|token|api[_-]?key|authorization|credential|cookie|private[_-]?key"
    r"|^auth$|jwt|nkey|seed$",
    re.IGNORECASE,
)
#: Secrets that say what they are in any text (an error's message, a third-party log
#: line): a bearer or basic credential, a JWT, a NATS credentials block or nkey seed, and a
#: URL query parameter named like a secret. Each looked for only where a cheap test finds
#: its mark (the text holds "Bearer", "eyJ", "-----BEGIN", "=").
#: (A credential: 8 characters or more, one at least a digit or a symbol, so that words
#: after "basic" in a sentence stay.)
_AUTH_SCHEME = re.compile(
    r"\b(Bearer|Basic|bearer|basic)\s+(?=[A-Za-z0-9._~+/=-]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}"
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PEM_BLOCK = re.compile(r"-----BEGIN [^-\n]*-----.*?(?:-----END [^-\n]*-----|$)", re.DOTALL)
_NKEY_SEED = re.compile(r"\bS[A-Z][A-Z2-7]{50,}\b")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;](?:[A-Za-z0-9_.-]*(?:token|secret|password|passwd|api[_-]?key|signature"
    r"|sig|jwt)[A-Za-z0-9_.-]*)=)[^&#\s]+",
    re.IGNORECASE,
)
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
REDACTED = "[redacted]"


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
    (``nats://user:p@ss@host:4222`` → ``nats://***@host:4222``). ``address``: ``text`` is
    a field of server addresses, where ``user:pass@host`` without a scheme is masked too."""
    if "@" not in text:
        return text
    if address:
        return _ADDRESS_USERINFO.sub("***@", text)
    if "://" not in text:
        return text
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _mask_marked(text: str) -> str:
    """``text`` with the secrets that say what they are replaced (see :data:`_AUTH_SCHEME`
    and the patterns after it); the same object when it holds none."""
    if "earer" in text or "asic" in text:
        text = _AUTH_SCHEME.sub(r"\1 " + REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "-----BEGIN" in text:
        text = _PEM_BLOCK.sub(REDACTED, text)
    if "=" in text:
        text = _SECRET_QUERY.sub(r"\g<name>" + REDACTED, text)
    if len(text) >= 52 and "S" in text:
        text = _NKEY_SEED.sub(REDACTED, text)
    return text


def _text(text: str, address: bool = False) -> str:
    return _cards(_mask_marked(_mask_userinfo(text, address=address)))


def _scrub(value: Any, address: bool = False) -> Any:
    if isinstance(value, str):
        return _text(value, address)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"[{len(value)} bytes omitted]"  # raw bytes are a payload's, or a key's
    if isinstance(value, list | tuple):
        # A (name, value) pair is a header or a field: its name says whether it is secret.
        if len(value) == 2 and isinstance(value[0], str) and _SECRET_NAME.search(value[0]):
            return [value[0], REDACTED] if isinstance(value, list) else (value[0], REDACTED)
        return type(value)(_scrub(v, address) for v in value)
    if isinstance(value, set | frozenset):
        return [_scrub(v, address) for v in value]
    if isinstance(value, Mapping):
        # A nested key is a field name like any other (``cfg={"password": ...}``); any
        # mapping (HTTP headers too) is written as a dict of its scrubbed items.
        return {k: _field(k, v, address) for k, v in value.items()}
    return value


def _field(key: object, value: Any, address: bool = False) -> Any:
    """``value`` as it may be logged under the name ``key``, at any depth."""
    if not isinstance(key, str):
        return _scrub(value, address)
    if _SECRET_NAME.search(key):
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
    """Blank secret-looking fields and payloads; strip credentials out of URLs; mask card
    numbers."""
    for key, value in event_dict.items():
        if key == "event":
            if isinstance(value, str):  # a third-party line's message, too
                event_dict[key] = _text(value)
            else:
                event_dict[key] = _scrub(value)
            continue
        event_dict[key] = _field(key, value)
    return event_dict
