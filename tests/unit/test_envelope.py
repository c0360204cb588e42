"""The mapping from what a client sent to the stored JetStream message."""

from __future__ import annotations

import base64
import string

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import (
    CONTENT_TYPE,
    MAX_HEADER_VALUE_LENGTH,
    NATS_EXPECTED_LAST_SUBJECT_SEQ,
    NATS_MSG_ID,
    NO_WIRE_PREFIX,
    REQUEST_DIGEST,
    SCHEMA_ID,
    SCHEMA_ID_SOURCE,
    WIRE_PREFIX,
    PublishRequest,
    Tenant,
    ce_headers_from_http,
    check_media_type,
    cloudevent_key,
    cloudevent_to_request,
    message_subject,
    parse_schema_id,
    parse_sequence,
    record_to_request,
    request_digest,
    validate_subject,
    wire_schema_id,
)
from broker.errors import BrokerError, InvalidSubject, Unprocessable, UnsupportedMediaType
from projections.base import Event
from projections.replica import MessagesReplica

pytestmark = pytest.mark.unit

TOKEN_CHARS = string.ascii_letters + string.digits + "_-"
tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20)
T = Tenant("acme")


@given(st.lists(tokens, min_size=1, max_size=12))
def test_valid_subjects_are_namespaced_under_the_tenant(parts: list[str]) -> None:
    subject = ".".join(parts)
    assert message_subject(T, subject) == f"msg.acme.{subject}"


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "a..b",
        ".a",
        "a.",
        "a.*",
        "a.>",
        ">",
        "a b",
        "a\tb",
        "ä",
        "a/b",
        "x" * 65,
        "a." * 16 + "a",
    ],
)
def test_invalid_subjects_are_refused(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        validate_subject(subject)


@given(st.text(max_size=300))
def test_any_accepted_subject_is_safe_to_append(subject: str) -> None:
    """Whatever is accepted can never contain wildcards, whitespace or empty tokens."""
    try:
        validate_subject(subject)
    except InvalidSubject:
        return
    assert "*" not in subject
    assert ">" not in subject
    assert all(token for token in subject.split("."))
    assert not any(c.isspace() for c in subject)


def token_by_token(subject: str) -> bool:
    """The rule as written: 1-16 dot-separated tokens of 1-64 [A-Za-z0-9_-], 255 at most."""
    parts = subject.split(".")
    return (
        0 < len(subject) <= 255
        and len(parts) <= 16
        and all(0 < len(p) <= 64 and all(c in TOKEN_CHARS for c in p) for p in parts)
    )


subjects = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=TOKEN_CHARS + ". *>\n", max_size=300),
    st.lists(st.text(alphabet=TOKEN_CHARS, max_size=70), min_size=1, max_size=20).map(".".join),
)


@given(subjects)
def test_a_subject_is_accepted_exactly_when_every_token_is(subject: str) -> None:
    """The whole-subject expression the check tries first accepts what the token-by-token
    rule does, and nothing else (near the limits too: 64-character tokens, 16 tokens)."""
    try:
        accepted = validate_subject(subject) == subject
    except InvalidSubject:
        accepted = False
    assert accepted == token_by_token(subject)


def test_subjects_at_the_limits() -> None:
    assert validate_subject("x" * 64) == "x" * 64
    assert validate_subject(".".join(["a"] * 16)) == ".".join(["a"] * 16)
    longest = ".".join(["y" * 63] * 4)[:255]
    assert validate_subject(longest) == longest
    with pytest.raises(InvalidSubject, match="longer than 255"):
        validate_subject(".".join(["z" * 64] * 4))


def test_a_valid_subject_is_remembered_a_refused_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker import envelope

    monkeypatch.setattr(envelope, "_VALID_SUBJECTS", set())
    for _ in range(2):
        assert validate_subject("orders.created") == "orders.created"
        with pytest.raises(InvalidSubject):
            validate_subject("orders.*")
    assert sorted(envelope._VALID_SUBJECTS) == ["orders.created"]
    for n in range(envelope._VALID_SUBJECTS_KEPT + 10):
        assert validate_subject(f"s.{n}") == f"s.{n}"
    assert len(envelope._VALID_SUBJECTS) == envelope._VALID_SUBJECTS_KEPT
    with pytest.raises(InvalidSubject):  # not remembered, still checked
        validate_subject("s.>")


def test_an_accepted_content_type_is_remembered_a_refused_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker import envelope

    monkeypatch.setattr(envelope, "_ACCEPTED", {})
    assert check_media_type(" text/plain; charset=utf-8 ") == "text/plain; charset=utf-8"
    assert check_media_type(" text/plain; charset=utf-8 ") == "text/plain; charset=utf-8"
    for _ in range(2):
        with pytest.raises(UnsupportedMediaType):
            check_media_type("application/x-www-form-urlencoded")
    assert list(envelope._ACCEPTED) == [" text/plain; charset=utf-8 "]
    for n in range(envelope._ACCEPTED_KEPT + 10):
        assert check_media_type(f"application/vnd.n{n}+json") == f"application/vnd.n{n}+json"
    assert len(envelope._ACCEPTED) == envelope._ACCEPTED_KEPT


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "image/png",
        "audio/wav",
        "application/vnd.acme.order+json",
        "application/avro",
        "application/vnd.apache.avro+binary",
        "application/x-protobuf",
        "application/msgpack",
        "application/octet-stream",
    ],
)
def test_accepted_media_types_are_stored_as_given(content_type: str) -> None:
    assert check_media_type(content_type) == content_type


def test_missing_content_type_is_stored_as_octet_stream() -> None:
    assert check_media_type(None) == "application/octet-stream"


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "garbage", "a/", "/b"],
)
def test_unsupported_media_types_are_refused(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        check_media_type(content_type)


def test_wire_prefix_yields_schema_id_for_schema_typed_payloads() -> None:
    framed = b"\x00" + (1234).to_bytes(4, "big") + b"payload"
    assert wire_schema_id("application/avro", framed) == 1234
    assert wire_schema_id("application/json", framed) == 1234
    assert wire_schema_id("application/octet-stream", framed) is None
    assert wire_schema_id("application/avro", b"\x00\x01") is None
    assert wire_schema_id("application/avro", b"\x01" + framed[1:]) is None


def test_headers_map_to_nats_headers() -> None:
    out = PublishRequest(
        subject="orders.created",
        payload=b"\x00\x00\x00\x00\x07rest",
        content_type="application/avro",
        idempotency_key="k-1",
        expected_last_subject_sequence=0,
    ).to_outbound(T)
    assert out.subject == "msg.acme.orders.created"
    assert out.payload == b"\x00\x00\x00\x00\x07rest"
    assert out.headers == {
        CONTENT_TYPE: "application/avro",
        SCHEMA_ID: "7",
        SCHEMA_ID_SOURCE: "wire",
        NATS_MSG_ID: "acme:k-1",
        REQUEST_DIGEST: request_digest(out.subject, out.headers, out.payload),
        NATS_EXPECTED_LAST_SUBJECT_SEQ: "0",
    }


def test_schema_id_header_disagreeing_with_a_json_wire_prefix_is_refused() -> None:
    """JSON text never starts with a zero byte: a zero-led JSON body is framed for sure."""
    request = PublishRequest(
        subject="a", payload=b"\x00\x00\x00\x00\x07{}", content_type="application/json", schema_id=8
    )
    with pytest.raises(Unprocessable, match="disagrees"):
        request.to_outbound(T)


@pytest.mark.parametrize("content_type", ["application/avro", "application/x-protobuf"])
def test_a_raw_binary_body_that_starts_with_a_zero_byte_is_kept_whole_with_a_schema_id(
    content_type: str,
) -> None:
    """With a Schema-Id header, a zero-led Avro or Protobuf body whose next bytes are not that
    id is a raw body (an Avro null or 0 first, a Protobuf message index 0), not a wrong
    prefix: stored as sent, marked so that readers do not cut its first five bytes off."""
    raw = PublishRequest(
        subject="a", payload=b"\x00\x16hello world", content_type=content_type, schema_id=3
    ).to_outbound(T)
    assert raw.payload == b"\x00\x16hello world"
    assert raw.headers[SCHEMA_ID] == "3"
    assert raw.headers[WIRE_PREFIX] == NO_WIRE_PREFIX
    framed = PublishRequest(
        subject="a", payload=b"\x00\x00\x00\x00\x03\x16", content_type=content_type, schema_id=3
    ).to_outbound(T)
    assert WIRE_PREFIX not in framed.headers  # the header and the prefix agree: framed


@pytest.mark.parametrize("value", ["x", "-1", "2147483648", "1.5"])
def test_bad_schema_ids_are_refused(value: str) -> None:
    with pytest.raises(Unprocessable):
        parse_schema_id(value)


@pytest.mark.parametrize("value", ["x", "-1", str(2**64), "0x10"])
def test_bad_sequences_are_refused(value: str) -> None:
    with pytest.raises(Unprocessable):
        parse_sequence(value, field="Expected-Last-Subject-Sequence")


def test_header_values_with_control_characters_are_refused() -> None:
    request = PublishRequest(
        subject="a", payload=b"", content_type="text/plain", idempotency_key="a\nb"
    )
    with pytest.raises(Unprocessable):
        request.to_outbound(T)


CE = {"specversion": "1.0", "id": "e-1", "source": "/sensors/7", "type": "com.acme.reading"}


def test_binary_mode_cloudevent_headers_are_kept() -> None:
    headers = {f"ce-{k}": v for k, v in CE.items()} | {"content-type": "application/json"}
    assert ce_headers_from_http(headers) == {f"ce-{k}": v for k, v in CE.items()}


def test_binary_mode_cloudevent_without_required_attributes_is_refused() -> None:
    with pytest.raises(Unprocessable, match="source"):
        ce_headers_from_http({"ce-specversion": "1.0", "ce-id": "x", "ce-type": "t"})


def test_plain_http_has_no_cloudevent() -> None:
    assert ce_headers_from_http({"content-type": "application/json"}) is None


def test_structured_cloudevent_becomes_binary_mode() -> None:
    event = {**CE, "datacontenttype": "application/json", "data": {"t": 21.5}, "shard": 3}
    request = cloudevent_to_request(event, subject="sensors.readings")
    assert request.payload == orjson.dumps({"t": 21.5})
    assert request.content_type == "application/json"
    assert request.idempotency_key == cloudevent_key("/sensors/7", "e-1")
    assert request.extra_headers == {
        "ce-specversion": "1.0",
        "ce-id": "e-1",
        "ce-source": "/sensors/7",
        "ce-type": "com.acme.reading",
        "ce-shard": "3",
    }


def test_structured_cloudevent_with_base64_data_stores_the_bytes() -> None:
    event = {
        **CE,
        "datacontenttype": "image/png",
        "data_base64": base64.b64encode(b"\x89PNG").decode(),
    }
    request = cloudevent_to_request(event, subject="images")
    assert request.payload == b"\x89PNG"
    assert request.content_type == "image/png"


def test_structured_cloudevent_text_data_is_stored_as_text() -> None:
    event = {**CE, "datacontenttype": "text/plain", "data": "hello"}
    assert cloudevent_to_request(event, subject="t").payload == b"hello"


def test_cloudevent_subject_falls_back_to_the_extension() -> None:
    request = cloudevent_to_request({**CE, "brokersubject": "a.b"}, subject=None)
    assert request.subject == "a.b"
    with pytest.raises(Unprocessable, match="no subject"):
        cloudevent_to_request(CE, subject=None)


@pytest.mark.parametrize(
    "event",
    [
        [],
        {**CE, "specversion": "0.3"},
        {k: v for k, v in CE.items() if k != "id"},
        {**CE, "data": 1, "data_base64": "AA=="},
        {**CE, "data_base64": "!!"},
        {**CE, "Bad-Name": "x"},
        {**CE, "nested": {"a": 1}},
    ],
)
def test_invalid_cloudevents_are_refused(event: object) -> None:
    with pytest.raises(Unprocessable):
        cloudevent_to_request(event, subject="a")


def test_batch_record_data_is_stored_as_compact_json() -> None:
    request = record_to_request({"subject": "a", "data": {"x": [1, 2]}}, default_subject=None)
    assert request.payload == b'{"x":[1,2]}'
    assert request.content_type == "application/json"


def test_batch_record_uses_default_subject_and_base64() -> None:
    request = record_to_request({"data_base64": "AAE="}, default_subject="d.s")
    assert (request.subject, request.payload, request.content_type) == (
        "d.s",
        b"\x00\x01",
        "application/octet-stream",
    )


@pytest.mark.parametrize(
    "record",
    [
        "x",
        {"subject": 3},
        {"subject": "a", "bogus": 1},
        {"subject": "a", "schema_id": "x"},
        {"subject": "a", "idempotency_key": 5},
        {"subject": "a", "content_type": "application/x-www-form-urlencoded"},
        {"subject": "a", "data": 1, "data_base64": "AA=="},
    ],
)
def test_invalid_batch_records_are_refused(record: object) -> None:
    with pytest.raises((Unprocessable, UnsupportedMediaType)):
        record_to_request(record, default_subject=None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)
record_like = st.dictionaries(
    st.sampled_from(
        [
            "subject",
            "data",
            "data_base64",
            "content_type",
            "idempotency_key",
            "schema_id",
            "expected_last_subject_sequence",
            "specversion",
            "id",
            "source",
            "type",
            "datacontenttype",
            "brokersubject",
            "x",
        ]
    ),
    json_values,
)


@given(record_like | json_values)
def test_any_json_record_is_a_request_or_a_clear_4xx(record: object) -> None:
    """Batch records and CloudEvents never fail with anything but a 4xx BrokerError."""
    for parse in (
        lambda: record_to_request(record, default_subject="d"),
        lambda: cloudevent_to_request(record, subject="d"),
    ):
        status = 200
        try:
            parse().to_outbound(T)
        except BrokerError as e:
            status = e.status
        assert status < 500


def test_non_ascii_base64_is_refused() -> None:
    with pytest.raises(Unprocessable, match="base64"):
        record_to_request({"subject": "a", "data_base64": "é"}, default_subject=None)


def test_cloudevent_attributes_are_bounded_together_not_only_one_by_one() -> None:
    """80 extension attributes of 1,000 characters each pass the per-value bound; stored,
    they passed the 64 KiB NATS allows for headers and the publish failed with a 500."""
    many = {f"ext{i}": "x" * 1000 for i in range(80)}
    request = cloudevent_to_request({**CE, "data": {}, **many}, subject="big.event")
    with pytest.raises(Unprocessable, match="headers"):
        request.to_outbound(T)
    fine = cloudevent_to_request({**CE, "data": {}, "ext1": "x" * 1000}, subject="ok.event")
    assert fine.to_outbound(T).headers["ce-ext1"] == "x" * 1000


@pytest.mark.parametrize("content_type", ["text/plain; x=" + "y" * 5000, "text/plain\x00"])
def test_a_batch_records_content_type_is_checked_like_a_header(content_type: str) -> None:
    request = record_to_request(
        {"subject": "a", "data_base64": "AAE=", "content_type": content_type},
        default_subject=None,
    )
    with pytest.raises(Unprocessable):
        request.to_outbound(T)


def test_idempotency_keys_are_stored_per_tenant_and_replicated_as_sent() -> None:
    """JetStream deduplicates a whole stream: two tenants' equal keys must differ there; the
    SQL replica shows the key the client sent."""
    request = PublishRequest(
        subject="x", payload=b"", content_type="text/plain", idempotency_key="k:1"
    )
    a, b = request.to_outbound(Tenant("a")), request.to_outbound(Tenant("b"))
    assert a.headers[NATS_MSG_ID] != b.headers[NATS_MSG_ID]
    event = Event("MESSAGES", 1, a.subject, None, a.headers, a.payload)
    assert MessagesReplica().row(event)["msg_id"] == "k:1"


def test_a_keyed_request_stores_a_digest_of_what_makes_it_that_request() -> None:
    """What tells a retry (same digest) from the key used again for another request."""

    def digest(**changes: object) -> str | None:
        fields: dict[str, object] = {
            "subject": "orders",
            "payload": b'{"id": 1}',
            "content_type": "application/json",
            "idempotency_key": "order-1",
            **changes,
        }
        return PublishRequest(**fields).to_outbound(T).headers.get(REQUEST_DIGEST)  # type: ignore[arg-type]

    first = digest()
    assert first is not None
    assert len(first) == 32
    assert digest() == first
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert digest(extra_headers=trace) == first  # a retry may carry a new trace context
    others = [
        digest(subject="orders.eu"),
        digest(payload=b'{"id": 2}'),
        digest(content_type="text/plain"),
        digest(schema_id=7),
    ]
    assert first not in others
    assert digest(idempotency_key=None) is None
    other_tenant = PublishRequest("orders", b'{"id": 1}', "application/json", "order-1")
    assert other_tenant.to_outbound(Tenant("b")).headers[REQUEST_DIGEST] != first


def test_a_cloudevents_key_is_its_id_within_its_source() -> None:
    """Ids are unique only within a source: two sources numbering alike must not collide."""
    one, other = cloudevent_key("/sensors/7", "1"), cloudevent_key("/sensors/8", "1")
    assert one != other
    assert one == cloudevent_key("/sensors/7", "1")
    assert one.startswith("ce:")
    assert one.endswith(":1")
    long = cloudevent_key("/sensors/7", "x" * MAX_HEADER_VALUE_LENGTH)
    assert len(long) <= MAX_HEADER_VALUE_LENGTH
    assert long != cloudevent_key("/sensors/8", "x" * MAX_HEADER_VALUE_LENGTH)
