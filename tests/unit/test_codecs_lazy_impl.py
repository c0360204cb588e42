"""The C accelerator (``broker.codecs._lazy``) and the Python classes behave alike.

Every behaviour test runs against both implementations of ``LazyValue`` and
``DecodedMessage``: the Python ones (``lazy.PyLazyValue``, ``lazy.PyDecodedMessage``,
always there) and the C ones, skipped only where the extension was not built. A hypothesis
property checks that both give the same value or the same error for random bodies and
content types, and a loop checks that the C objects leak neither references nor memory.
``test_codecs.py`` and ``test_codecs_hostile.py`` run against whichever implementation is
active (``BROKER_PURE_PYTHON=1`` selects the Python one).
"""

from __future__ import annotations

import gc
import importlib.util
import re
import sys
import tracemalloc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace, TracebackType
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codecs import DecodeError, JsonCodec, MsgpackCodec, RawCodec, lazy
from broker.envelope import CONTENT_TYPE, NO_WIRE_PREFIX, SCHEMA_ID, WIRE_PREFIX

_c_lazy: ModuleType | None
try:
    from broker.codecs import _lazy as _c_lazy
except ImportError:  # not built: the C half of every test is skipped
    _c_lazy = None

pytestmark = pytest.mark.unit

NOT_BUILT = "broker.codecs._lazy is not built (no C compiler, or installed without hatch_build.py)"
PREFIX = b"\x00\x00\x00\x00\x07"


@dataclass(frozen=True)
class Impl:
    """One implementation of the lazy wrapper."""

    name: str
    lazy_value: Any
    decoded_message: Any


PYTHON = Impl("python", lazy.PyLazyValue, lazy.PyDecodedMessage)
C = Impl("c", _c_lazy.LazyValue, _c_lazy.DecodedMessage) if _c_lazy is not None else None

requires_c = pytest.mark.skipif(_c_lazy is None, reason=NOT_BUILT)


@pytest.fixture(
    params=[pytest.param("python"), pytest.param("c", marks=requires_c)],
)
def impl(request: pytest.FixtureRequest) -> Impl:
    """The Python classes, then the C ones."""
    if request.param == "python":
        return PYTHON
    assert C is not None
    return C


class CountingCodec:
    """Wraps a codec; counts decode calls and keeps the bodies it was given."""

    name = "counting"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bodies: list[Any] = []

    @property
    def calls(self) -> int:
        return len(self.bodies)

    def decode(self, payload: Any) -> Any:
        self.bodies.append(payload)
        return self.inner.decode(payload)


class RaisingCodec:
    """Raises whatever ``error`` builds, on every call."""

    name = "raising"

    def __init__(self, error: Callable[[], BaseException]) -> None:
        self.error = error
        self.calls = 0

    def decode(self, payload: bytes) -> Any:
        self.calls += 1
        raise self.error()


class StrictDecodeError(DecodeError):
    """A codec's own subclass of DecodeError: cached like DecodeError itself."""


def _frames(tb: TracebackType | None) -> list[str]:
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


# --- which implementation is active ------------------------------------------------------------


def _fresh_lazy_module() -> ModuleType:
    """Execute ``lazy.py`` again into a new module object (sys.modules is left alone)."""
    spec = importlib.util.spec_from_file_location("_lazy_probe", lazy.__file__)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_c
def test_the_c_classes_are_active_when_built_unless_pure_python_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the extension built, ``IMPLEMENTATION`` is ``c`` and the public names are its
    classes; ``BROKER_PURE_PYTHON=1`` selects the Python classes instead."""
    assert _c_lazy is not None
    monkeypatch.delenv("BROKER_PURE_PYTHON", raising=False)
    fresh = _fresh_lazy_module()
    assert fresh.IMPLEMENTATION == "c"
    assert fresh.DecodedMessage is _c_lazy.DecodedMessage
    assert fresh.LazyValue is _c_lazy.LazyValue
    monkeypatch.setenv("BROKER_PURE_PYTHON", "1")
    fresh = _fresh_lazy_module()
    assert fresh.IMPLEMENTATION == "python"
    assert fresh.DecodedMessage is fresh.PyDecodedMessage


def test_without_the_extension_the_python_classes_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An install without a C compiler (no ``_lazy`` module) falls back to Python."""
    monkeypatch.delenv("BROKER_PURE_PYTHON", raising=False)
    monkeypatch.setitem(sys.modules, "broker.codecs._lazy", None)  # import raises ImportError
    fresh = _fresh_lazy_module()
    assert fresh.IMPLEMENTATION == "python"
    assert fresh.LazyValue is fresh.PyLazyValue


def test_the_active_implementation_is_what_the_package_exports() -> None:
    """``broker.codecs`` exports the classes ``IMPLEMENTATION`` names."""
    import broker.codecs

    assert lazy.IMPLEMENTATION in {"c", "python"}
    expected = C if lazy.IMPLEMENTATION == "c" else PYTHON
    assert expected is not None
    assert broker.codecs.DecodedMessage is expected.decoded_message
    assert broker.codecs.LazyValue is expected.lazy_value


# --- behaviour, both implementations ----------------------------------------------------------


def test_value_is_decoded_once_on_first_access_and_cached(impl: Impl) -> None:
    """Building decodes nothing; ``.value`` decodes once and returns the same object."""
    codec = CountingCodec(MsgpackCodec())
    value = impl.lazy_value(msgpack.packb({"a": [1, 2]}), codec)
    assert (codec.calls, value.decoded, value.error) == (0, False, None)
    assert value.value == {"a": [1, 2]}
    assert value.value is value.value
    assert (codec.calls, value.decoded, value.error) == (1, True, None)


def test_a_decode_error_is_cached_and_raised_again_without_the_first_traceback(
    impl: Impl,
) -> None:
    """A failed decode runs once: every access raises the same DecodeError, and from the
    second on its traceback no longer runs through the codec."""
    codec = CountingCodec(JsonCodec())
    message = impl.decoded_message(b"{not json", {CONTENT_TYPE: "application/json"}, codec)
    with pytest.raises(DecodeError) as first:
        _ = message.value
    assert "decode" in _frames(first.value.__traceback__)
    with pytest.raises(DecodeError) as second:
        _ = message.value
    assert first.value is second.value is message.error
    assert "decode" not in _frames(second.value.__traceback__)
    assert codec.calls == 1
    assert message.decoded


def test_a_subclass_of_decode_error_is_cached_too(impl: Impl) -> None:
    """``except DecodeError`` semantics: a codec's subclass of it is cached as well."""
    codec = RaisingCodec(lambda: StrictDecodeError("strict", "no"))
    value = impl.lazy_value(b"x", codec)
    for _ in range(2):
        with pytest.raises(StrictDecodeError):
            _ = value.value
    assert codec.calls == 1
    assert isinstance(value.error, StrictDecodeError)


def test_other_exceptions_propagate_and_are_not_cached(impl: Impl) -> None:
    """A codec bug (not a DecodeError) reaches the caller each time; nothing is cached."""
    codec = RaisingCodec(lambda: RuntimeError("codec bug"))
    message = impl.decoded_message(b"{}", {}, codec)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="codec bug"):
            _ = message.value
    assert codec.calls == 2
    assert (message.decoded, message.error) == (False, None)


@pytest.mark.parametrize(
    ("payload", "content_type", "body"),
    [
        (PREFIX + b'{"a": 1}', "application/json", b'{"a": 1}'),
        (PREFIX + b"rest", "application/avro", b"rest"),
        (PREFIX + b"rest", "application/x-protobuf", b"rest"),
        (PREFIX, "application/json", b""),
        (PREFIX + b"rest", "application/msgpack", PREFIX + b"rest"),
        (PREFIX + b"rest", "application/octet-stream", PREFIX + b"rest"),
        (PREFIX + b"rest", None, PREFIX + b"rest"),
        (b"\x00\x00\x00\x07", "application/json", b"\x00\x00\x00\x07"),
        (b"", "application/json", b""),
        (b"\x01\x00\x00\x00\x07rest", "application/json", b"\x01\x00\x00\x00\x07rest"),
        (bytearray(PREFIX + b"rest"), "application/avro", bytearray(b"rest")),
    ],
    ids=[
        "json",
        "avro",
        "protobuf",
        "prefix-only",
        "msgpack-never",
        "octet-stream-never",
        "no-content-type",
        "too-short",
        "empty",
        "not-zero-led",
        "bytearray",
    ],
)
def test_the_wire_prefix_is_stripped_only_for_framed_content_types(
    impl: Impl, payload: Any, content_type: str | None, body: Any
) -> None:
    """A zero-led body of 5+ bytes loses its prefix only where publishing framed it."""
    codec = CountingCodec(RawCodec())
    headers = {} if content_type is None else {CONTENT_TYPE: content_type}
    message = impl.decoded_message(payload, headers, codec)
    _ = message.value
    assert codec.bodies == [body]
    assert type(codec.bodies[0]) is type(body)


def test_a_body_published_raw_keeps_its_first_five_bytes(impl: Impl) -> None:
    """A zero-led Avro body stored with ``Broker-Wire-Prefix: none`` (a raw body sent with a
    Schema-Id header) is decoded whole; without the mark, the same bytes are framed."""
    codec = CountingCodec(RawCodec())
    raw = {CONTENT_TYPE: "application/avro", WIRE_PREFIX: NO_WIRE_PREFIX}
    _ = impl.decoded_message(PREFIX + b"rest", raw, codec).value
    _ = impl.decoded_message(PREFIX + b"rest", {CONTENT_TYPE: "application/avro"}, codec).value
    assert codec.bodies == [PREFIX + b"rest", b"rest"]


def test_a_bare_lazy_value_never_strips_a_prefix(impl: Impl) -> None:
    """Only DecodedMessage knows the content type; LazyValue hands the body over whole."""
    codec = CountingCodec(RawCodec())
    _ = impl.lazy_value(PREFIX + b"rest", codec).value
    assert codec.bodies == [PREFIX + b"rest"]


def test_a_memoryview_body_fails_the_prefix_test_alike(impl: Impl) -> None:
    """``body < b"\\x01"`` is a TypeError for a memoryview in both implementations."""
    message = impl.decoded_message(memoryview(b"{}"), {}, JsonCodec())
    with pytest.raises(TypeError):
        _ = message.value
    assert not message.decoded


def test_headers_subject_and_sequence_are_kept_and_decode_nothing(impl: Impl) -> None:
    """The metadata is what the reader passed (the same objects); reading it decodes nothing."""
    codec = CountingCodec(JsonCodec())
    headers = {CONTENT_TYPE: "application/json", SCHEMA_ID: "12"}
    payload = b'{"a": 1}'
    message = impl.decoded_message(payload, headers, codec, subject="msg.t.x", sequence=9)
    assert message.headers is headers
    assert message.payload is payload
    assert message.codec is codec
    assert (message.subject, message.sequence) == ("msg.t.x", 9)
    assert (message.content_type, message.schema_id) == ("application/json", 12)
    assert (codec.calls, message.decoded) == (0, False)
    bare = impl.decoded_message(payload, {}, codec)
    assert (bare.subject, bare.sequence, bare.content_type, bare.schema_id) == (
        None,
        None,
        None,
        None,
    )


def test_every_argument_may_be_passed_by_keyword(impl: Impl) -> None:
    """``payload``, ``headers`` and ``codec`` are positional-or-keyword, as in Python."""
    codec = JsonCodec()
    message = impl.decoded_message(sequence=3, codec=codec, headers={}, payload=b"[1]", subject="s")
    assert (message.value, message.subject, message.sequence) == ([1], "s", 3)
    assert impl.lazy_value(codec=codec, payload=b"2").value == 2


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((b"{}", {}), {}),
        ((b"{}", {}, JsonCodec(), "subject"), {}),
        ((b"{}", {}, JsonCodec()), {"unknown": 1}),
        ((b"{}", {}, JsonCodec()), {"payload": b"{}"}),
        ((b"{}", {}, JsonCodec()), {"subject": "a", **{"subject": "b"}, "codec": None}),
    ],
    ids=["too-few", "subject-positional", "unknown-keyword", "twice", "codec-twice"],
)
def test_bad_arguments_are_a_type_error(
    impl: Impl, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Calls the Python ``__init__`` refuses, the C type refuses too."""
    with pytest.raises(TypeError):
        impl.decoded_message(*args, **kwargs)
    with pytest.raises(TypeError):
        impl.lazy_value(b"{}")


def test_a_codec_is_anything_with_a_decode_attribute(impl: Impl) -> None:
    """``codec.decode`` is looked up on the object, instance attributes included."""
    codec = SimpleNamespace(decode=lambda payload: payload[::-1])
    assert impl.decoded_message(b"abc", {}, codec).value == b"cba"


def test_attributes_are_writable_and_no_others_can_be_added(impl: Impl) -> None:
    """Slots: the public attributes can be set; anything else is an AttributeError."""
    message = impl.decoded_message(b"1", {}, JsonCodec())
    message.subject = "msg.t.y"
    message.payload = b"2"
    assert (message.subject, message.value) == ("msg.t.y", 2)
    with pytest.raises(AttributeError):
        message.other = 1


def test_calling_init_again_resets_the_cached_value(impl: Impl) -> None:
    """``__init__`` stores its arguments and forgets the value, in both implementations."""
    codec = JsonCodec()
    message = impl.decoded_message(b"1", {}, codec)
    assert message.value == 1
    message.__init__(b"2", {}, codec, sequence=5)
    assert (message.decoded, message.value, message.sequence) == (False, 2, 5)


def test_both_classes_can_be_subclassed(impl: Impl) -> None:
    """A subclass with its own ``__init__`` and attributes keeps ``.value`` and isinstance."""

    class Tagged(impl.decoded_message):  # type: ignore[name-defined,misc]
        def __init__(self, payload: bytes, tag: str) -> None:
            super().__init__(payload, {CONTENT_TYPE: "application/json"}, JsonCodec())
            self.tag = tag

    message = Tagged(PREFIX + b'{"a": 1}', "t")
    assert (message.tag, message.value, message.decoded) == ("t", {"a": 1}, True)
    assert isinstance(message, impl.lazy_value)
    assert issubclass(impl.decoded_message, impl.lazy_value)


def test_the_repr_and_names_are_the_python_ones(impl: Impl) -> None:
    """Both show as ``broker.codecs.lazy.DecodedMessage`` (the default object repr)."""
    message = impl.decoded_message(b"1", {}, JsonCodec())
    assert re.fullmatch(
        r"<broker\.codecs\.lazy\.DecodedMessage object at 0x[0-9a-f]+>", repr(message)
    )
    assert impl.decoded_message.__module__ == impl.lazy_value.__module__ == "broker.codecs.lazy"
    assert (impl.decoded_message.__name__, impl.lazy_value.__name__) == (
        "DecodedMessage",
        "LazyValue",
    )


def test_a_cycle_through_the_decoded_value_is_collected(impl: Impl) -> None:
    """The garbage collector sees the C objects' references (tp_traverse / tp_clear)."""

    class Node:
        message: Any = None

    node = Node()
    message = impl.decoded_message(
        b"x", {}, SimpleNamespace(decode=lambda payload, node=node: node)
    )
    node.message = message
    assert message.value is node
    alive = weakref.ref(node)
    del node, message
    gc.collect()
    assert alive() is None


# --- the same results for any input -----------------------------------------------------------

CONTENT_TYPES = [
    None,
    "application/json",
    "application/cloudevents+json",
    "application/avro",
    "application/x-protobuf",
    "application/msgpack",
    "application/octet-stream",
    "text/plain; charset=utf-8",
    "Application/JSON; charset=utf-8",
]
CODECS = [JsonCodec(), MsgpackCodec(), RawCodec()]


def _outcome(message: Any) -> tuple[Any, ...]:
    try:
        value = message.value
    except DecodeError as e:
        return ("error", type(e), str(e), message.error is e, message.decoded)
    return ("value", value, message.error, message.decoded)


@requires_c
@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=24) | st.binary(max_size=24).map(lambda b: b"\x00" + b),
    content_type=st.sampled_from(CONTENT_TYPES),
    codec_index=st.integers(0, len(CODECS) - 1),
    as_bytearray=st.booleans(),
)
def test_both_implementations_agree_on_any_body_and_content_type(
    body: bytes, content_type: str | None, codec_index: int, as_bytearray: bool
) -> None:
    """Same body seen by the codec, same value or same error, same flags after."""
    assert C is not None
    payload = bytearray(body) if as_bytearray else body
    headers = {} if content_type is None else {CONTENT_TYPE: content_type}
    outcomes = []
    for implementation in (PYTHON, C):
        codec = CountingCodec(CODECS[codec_index])
        message = implementation.decoded_message(payload, headers, codec, sequence=1)
        outcomes.append((_outcome(message), _outcome(message), codec.bodies))
    assert outcomes[0] == outcomes[1]


# --- no leaks ---------------------------------------------------------------------------------


def _exercise(decoded_message: Any, lazy_value: Any, rounds: int) -> None:
    """Every path: positional and keyword builds, value, cached value, failure, re-raise,
    a codec bug, a stripped prefix, the generic (tuple/dict) constructor path."""
    json_codec, failing = JsonCodec(), RaisingCodec(lambda: RuntimeError("bug"))
    headers = {CONTENT_TYPE: "application/json", SCHEMA_ID: "4"}
    good, bad, framed = b'{"a": [1, 2, 3]}', b"{not json", PREFIX + b"[1]"
    for _ in range(rounds):
        message = decoded_message(good, headers, json_codec, subject="s", sequence=1)
        _ = message.value, message.value, message.content_type, message.schema_id
        _ = decoded_message(framed, headers, json_codec).value
        _ = decoded_message(payload=good, headers=headers, codec=json_codec).value
        failed = lazy_value(bad, json_codec)
        for _ in range(2):
            with pytest.raises(DecodeError):
                _ = failed.value
        with pytest.raises(RuntimeError):
            _ = lazy_value(good, failing).value
        with pytest.raises(TypeError):
            decoded_message(good, headers)


@requires_c
def test_the_c_objects_leak_no_references_and_no_memory() -> None:
    """References to the arguments come back to where they were; traced memory stays flat."""
    assert C is not None
    _exercise(C.decoded_message, C.lazy_value, 200)  # warm caches (interned names, _framed)
    gc.collect()
    tracemalloc.start()
    try:
        _exercise(C.decoded_message, C.lazy_value, 200)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        _exercise(C.decoded_message, C.lazy_value, 5_000)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"traced memory grew by {growth} bytes over 5000 rounds"

    payload, headers, codec = b"[1, 2]", {CONTENT_TYPE: "application/json"}, JsonCodec()
    counts = [sys.getrefcount(x) for x in (payload, headers, codec)]
    for _ in range(10_000):
        _ = C.decoded_message(payload, headers, codec, subject="s", sequence=2).value
        _ = C.lazy_value(payload, codec).value
    assert [sys.getrefcount(x) for x in (payload, headers, codec)] == counts
