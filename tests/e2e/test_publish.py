"""Publishing over real HTTP/2 to a real granian process appends exactly what was sent."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import uuid

import fastavro
import httpx
import orjson
import pytest
from nats.js import JetStreamContext

from broker.envelope import cloudevent_key
from tests.e2e._broker import BrokerProcess
from tests.e2e._h2duplex import DuplexStream

pytestmark = pytest.mark.e2e


def unique(prefix: str = "t") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


async def subject_count(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info("MESSAGES", subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_publish_stores_exact_bytes_and_headers(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = unique()
    payload = bytes(range(256)) * 4
    r = await client.post(
        f"/v1/publish/{subject}",
        content=payload,
        headers={"content-type": "application/octet-stream", "schema-id": "42"},
    )
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200, r.text
    ack = r.json()
    assert ack["stream"] == "MESSAGES"
    assert ack["duplicate"] is False
    stored = await js.get_msg("MESSAGES", ack["seq"])
    assert stored.subject == f"msg.default.{subject}"
    assert stored.data == payload
    assert stored.headers is not None
    assert stored.headers["Content-Type"] == "application/octet-stream"
    assert stored.headers["Broker-Schema-Id"] == "42"


async def test_confluent_wire_prefix_is_recorded_as_schema_id(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    framed = b"\x00" + (77).to_bytes(4, "big") + b"\x02\x04avro"
    r = await client.post(
        f"/v1/publish/{unique()}", content=framed, headers={"content-type": "application/avro"}
    )
    stored = await js.get_msg("MESSAGES", r.json()["seq"])
    assert stored.data == framed
    assert stored.headers is not None
    assert (stored.headers["Broker-Schema-Id"], stored.headers["Broker-Schema-Id-Source"]) == (
        "77",
        "wire",
    )


async def test_a_raw_avro_body_led_by_a_zero_byte_is_decoded_whole_with_a_schema_id(
    client: httpx.AsyncClient,
) -> None:
    """An Avro record whose first field is an optional null (union branch 0) encodes to a
    body starting with 0x00. Sent raw with `Schema-Id`, it used to be refused (422: its
    bytes 1-4 read as a disagreeing wire id), or, had they matched, stored and then decoded
    without its first five bytes."""
    schema = {
        "type": "record",
        "name": "Reading",
        "fields": [
            {"name": "note", "type": ["null", "string"]},
            {"name": "value", "type": "int"},
            {"name": "unit", "type": "string"},
        ],
    }
    registered = await client.post(
        f"/registry/subjects/{unique('raw')}-value/versions",
        json={"schema": orjson.dumps(schema).decode()},
    )
    assert registered.status_code == 200, registered.text
    schema_id = registered.json()["id"]
    record = {"note": None, "value": 21, "unit": "celsius"}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    body = out.getvalue()
    assert body[0] == 0
    subject = unique()
    r = await client.post(
        f"/v1/publish/{subject}",
        content=body,
        headers={"content-type": "application/avro", "schema-id": str(schema_id)},
    )
    assert r.status_code == 200, r.text
    replayed = await client.get(
        "/v1/streams/MESSAGES/messages",
        params={"start_seq": r.json()["seq"], "limit": 1, "decode": "json"},
    )
    (line,) = replayed.text.splitlines()
    assert orjson.loads(line)["value"] == record, line


async def test_idempotent_retry_answers_the_original_sequence(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject, key = unique(), uuid.uuid4().hex
    headers = {"content-type": "application/json", "idempotency-key": key}
    first = (await client.post(f"/v1/publish/{subject}", content=b"{}", headers=headers)).json()
    again = (await client.post(f"/v1/publish/{subject}", content=b"{}", headers=headers)).json()
    assert again == {**first, "duplicate": True}
    assert await subject_count(js, f"msg.default.{subject}") == 1


async def test_a_key_used_again_for_another_body_is_422_and_stores_nothing(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """A single publish, a batch record and a routed message alike: the key's first request
    stays, the other is refused by name, and a true retry is still a duplicate."""
    subject, key = unique(), uuid.uuid4().hex
    url = f"/v1/publish/{subject}"
    headers = {"content-type": "application/json", "idempotency-key": key}
    first = await client.post(url, content=b'{"qty": 1}', headers=headers)
    reused = await client.post(url, content=b'{"qty": 2}', headers=headers)
    retry = await client.post(url, content=b'{"qty": 1}', headers=headers)
    assert first.status_code == 200, first.text
    assert reused.status_code == 422
    assert reused.json()["error_code"] == "idempotency_key_reused"
    assert f"seq {first.json()['seq']}" in reused.json()["message"]
    assert retry.json() == {**first.json(), "duplicate": True}

    records = [
        {"subject": subject, "data": {"qty": 1}, "idempotency_key": f"{key}-b"},
        {"subject": subject, "data": {"qty": 5}, "idempotency_key": f"{key}-b"},
    ]
    batch = await client.post(
        "/v1/publish", content=orjson.dumps(records), headers={"content-type": "application/json"}
    )
    assert batch.status_code == 207, batch.text
    assert [r.get("error_code") for r in batch.json()["results"]] == [
        None,
        "idempotency_key_reused",
    ]
    records.insert(0, {"subject": subject, "data": {"qty": 9}})  # a new one, no key
    again = await client.post(
        "/v1/publish", content=orjson.dumps(records), headers={"content-type": "application/json"}
    )
    kept, retried, reused_again = again.json()["results"]  # the batch sent once more
    assert (kept["duplicate"], retried["duplicate"]) == (False, True)
    assert retried["seq"] == batch.json()["results"][0]["seq"]
    assert reused_again["error_code"] == "idempotency_key_reused"

    routed, keyed = f"/v1/route/{unique('routed')}", {**headers, "idempotency-key": f"{key}-r"}
    kept = await client.post(routed, params={"timeout": "1"}, content=b"a", headers=keyed)
    other = await client.post(routed, params={"timeout": "1"}, content=b"b", headers=keyed)
    assert kept.status_code in (200, 202), kept.text
    assert other.status_code == 422
    assert other.json()["error_code"] == "idempotency_key_reused"
    assert await subject_count(js, f"msg.default.{subject}") == 3


async def test_expected_sequence_mismatch_is_409_and_stores_nothing(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = unique()
    url = f"/v1/publish/{subject}"
    first = await client.post(
        url,
        content=b"1",
        headers={"content-type": "text/plain", "expected-last-subject-sequence": "0"},
    )
    assert first.status_code == 200, first.text
    stale = await client.post(
        url,
        content=b"2",
        headers={"content-type": "text/plain", "expected-last-subject-sequence": "0"},
    )
    assert stale.status_code == 409
    assert stale.json()["error_code"] == "sequence_conflict"
    assert await subject_count(js, f"msg.default.{subject}") == 1
    seq = str(first.json()["seq"])
    ok = await client.post(
        url,
        content=b"3",
        headers={"content-type": "text/plain", "expected-last-subject-sequence": seq},
    )
    assert ok.status_code == 200


async def test_declared_body_over_the_limit_is_413_before_any_byte_is_read(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = unique()
    stream = DuplexStream(
        "127.0.0.1",
        broker.port,
        f"/v1/publish/{subject}",
        {"content-type": "text/plain", "content-length": str(64 * 1024 * 1024)},
    )
    try:
        stream.read_until(lambda s: s.ended)  # the answer comes with no body byte sent
    finally:
        stream.close()
    assert stream.status == 413
    assert orjson.loads(stream.body)["error_code"] == "payload_too_large"
    assert await subject_count(js, f"msg.default.{subject}") == 0


async def test_undeclared_body_over_the_limit_is_413_without_buffering_it_whole(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = unique()
    stream = DuplexStream(
        "127.0.0.1", broker.port, f"/v1/publish/{subject}", {"content-type": "text/plain"}
    )
    sent, chunk = 0, b"y" * 16384
    try:
        while not stream.ended and sent < 64 * 1024 * 1024:
            stream.send(chunk)
            sent += len(chunk)
        stream.read_until(lambda s: s.ended)
    finally:
        stream.close()
    assert stream.status == 413
    # Refused once past the 256 KiB limit: what was sent is bounded by the limit plus the
    # HTTP/2 flow-control window, nowhere near the 64 MiB the client was ready to send.
    assert sent < 4 * 1024 * 1024
    assert await subject_count(js, f"msg.default.{subject}") == 0


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/publish/a.*", {"content-type": "text/plain"}, 422, "invalid_subject"),
        ("/v1/publish/a..b", {"content-type": "text/plain"}, 422, "invalid_subject"),
        (
            "/v1/publish/a",
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        ("/v1/publish/a", {"content-type": "text/plain", "schema-id": "abc"}, 422, "unprocessable"),
        (
            "/v1/publish/a",
            {"content-type": "text/plain", "expected-last-subject-sequence": "-3"},
            422,
            "unprocessable",
        ),
        ("/v1/publish/a", {"content-type": "application/cloudevents+json"}, 400, "bad_request"),
        (
            "/v1/publish/a",
            {"content-type": "text/plain", "ce-specversion": "1.0"},
            422,
            "unprocessable",
        ),
        ("/v1/publish", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        ("/v1/publish", {"content-type": "application/json"}, 400, "bad_request"),
        ("/v1/publish?subject=a.>", {"content-type": "application/json"}, 422, "invalid_subject"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    r = await client.post(path, content=b"not json at all", headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error_code"] == code
    assert r.json()["message"]


async def test_cloudevents_binary_mode_keeps_attributes_and_dedupes_on_ce_id(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject, event_id = unique("ce"), uuid.uuid4().hex
    headers = {
        "content-type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/sensors/7",
        "ce-type": "com.acme.reading",
    }
    first = (
        await client.post(f"/v1/publish/{subject}", content=b'{"t":1}', headers=headers)
    ).json()
    again = (
        await client.post(f"/v1/publish/{subject}", content=b'{"t":1}', headers=headers)
    ).json()
    assert again["seq"] == first["seq"]
    assert again["duplicate"] is True
    stored = await js.get_msg("MESSAGES", first["seq"])
    assert stored.headers is not None
    assert stored.headers["ce-type"] == "com.acme.reading"
    key = cloudevent_key("/sensors/7", event_id)
    assert stored.headers["Nats-Msg-Id"] == f"default:{key}"  # the tenant's key
    # Another source's event with the same id is another event (ids are per source).
    other = {**headers, "ce-source": "/sensors/8"}
    theirs = await client.post(f"/v1/publish/{subject}", content=b'{"t":1}', headers=other)
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["duplicate"] is False
    assert theirs.json()["seq"] != first["seq"]


async def test_cloudevents_structured_mode_stores_data_as_binary_mode(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    event = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "/cameras/1",
        "type": "com.acme.frame",
        "datacontenttype": "image/png",
        "data_base64": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),
    }
    r = await client.post(
        f"/v1/publish/{unique('ce')}",
        content=orjson.dumps(event),
        headers={"content-type": "application/cloudevents+json"},
    )
    assert r.status_code == 200, r.text
    stored = await js.get_msg("MESSAGES", r.json()["seq"])
    assert stored.data == b"\x89PNG\r\n\x1a\n"
    assert stored.headers is not None
    assert stored.headers["Content-Type"] == "image/png"
    assert stored.headers["ce-source"] == "/cameras/1"


async def test_batch_json_array_answers_one_result_per_record_in_order(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = unique("batch")
    records = [{"subject": subject, "data": {"n": n}} for n in range(50)]
    r = await client.post(
        "/v1/publish", content=orjson.dumps(records), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    seqs = [result["seq"] for result in results]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 50
    for n, seq in enumerate(seqs[:5]):
        assert (await js.get_msg("MESSAGES", seq)).data == orjson.dumps({"n": n})


async def test_integers_past_64_bits_in_records_are_stored_with_every_digit(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """A record's ``data`` is parsed and stored again as compact JSON: an integer past 64
    bits was stored as a float (orjson's reading), its last digits lost, in a JSON array,
    an NDJSON batch and a structured CloudEvent alike."""
    subject = unique("bigint")
    big = 2**64 * 10**5 + 7
    record = b'{"subject": "%s", "data": {"id": %d, "ok": true}}' % (subject.encode(), big)
    event = b'{"specversion": "1.0", "id": "e1", "source": "s", "type": "t", "data": {"id": %d}}'
    answers = [
        await client.post(
            "/v1/publish",
            content=b"[" + record + b"]",
            headers={"content-type": "application/json"},
        ),
        await client.post(
            "/v1/publish", content=record + b"\n", headers={"content-type": "application/x-ndjson"}
        ),
        await client.post(
            f"/v1/publish/{subject}",
            content=event % big,
            headers={"content-type": "application/cloudevents+json"},
        ),
    ]
    seqs = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seqs.append(body["results"][0]["seq"] if "results" in body else body["seq"])
    stored = [(await js.get_msg("MESSAGES", seq)).data for seq in seqs]
    assert stored == [b'{"id":%d,"ok":true}' % big] * 2 + [b'{"id":%d}' % big]


async def test_batch_with_bad_records_is_207_and_stores_only_the_good(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = unique("batch")
    body = b"\n".join(
        [
            orjson.dumps({"data": 1}),
            orjson.dumps({"subject": "bad.*", "data": 2}),
            b"{not json",
            orjson.dumps({"data": 3, "content_type": "application/x-www-form-urlencoded"}),
            orjson.dumps({"data_base64": "AAE="}),
        ]
    )
    r = await client.post(
        f"/v1/publish?subject={subject}",
        content=body,
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 207, r.text
    codes = [result.get("error_code") for result in r.json()["results"]]
    assert codes == [None, "invalid_subject", "bad_request", "unsupported_media_type", None]
    assert await subject_count(js, f"msg.default.{subject}") == 2


async def test_cloudevents_batch(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    subject = unique("ceb")
    events = [
        {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "/s",
            "type": "t",
            "data": {"i": i},
        }
        for i in range(3)
    ]
    r = await client.post(
        f"/v1/publish?subject={subject}",
        content=orjson.dumps(events),
        headers={"content-type": "application/cloudevents-batch+json"},
    )
    assert r.status_code == 200, r.text
    again = await client.post(
        f"/v1/publish?subject={subject}",
        content=orjson.dumps(events),
        headers={"content-type": "application/cloudevents-batch+json"},
    )
    assert [x["duplicate"] for x in again.json()["results"]] == [True, True, True]
    assert await subject_count(js, f"msg.default.{subject}") == 3


async def test_batch_over_the_record_limit_is_413_and_stores_nothing(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = unique("limit")
    body = b"\n".join(b'{"data":1}' for _ in range(10_001))
    r = await client.post(
        f"/v1/publish?subject={subject}",
        content=body,
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 413
    assert r.json()["error_code"] == "payload_too_large"
    assert await subject_count(js, f"msg.default.{subject}") == 0


async def test_http1_and_h2c_share_the_port(broker: BrokerProcess) -> None:
    async with httpx.AsyncClient(base_url=broker.base_url, http1=True, http2=False) as h1:
        r = await h1.post(
            f"/v1/publish/{unique()}", content=b"x", headers={"content-type": "text/plain"}
        )
        assert r.http_version == "HTTP/1.1"
        assert r.status_code == 200


def http1_exchange(port: int, request: bytes, *, half_close: bool) -> tuple[int, bytes]:
    """Send ``request`` as raw bytes on a new HTTP/1.1 connection (closing the sending side
    after it, if ``half_close``); the answer's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            data = conn.recv(65536)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("body", "half_close"),
    [
        (b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\nzz\r\n0\r\n\r\n', False),
        (b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n9\r\n{"pa', True),
        (b'Content-Length: 10\r\n\r\n{"a":', True),
    ],
    ids=["malformed chunk", "connection closed mid-chunk", "shorter than content-length"],
)
async def test_a_body_cut_short_is_400_and_stores_nothing(
    broker: BrokerProcess, js: JetStreamContext, body: bytes, half_close: bool
) -> None:
    """granian ends a body that fails as it is read as if it were whole; stored, half a
    message would have been acknowledged with 200."""
    subject = unique()
    request = (
        f"POST /v1/publish/{subject} HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
    ).encode() + body
    status, answer = await asyncio.to_thread(
        http1_exchange, broker.port, request, half_close=half_close
    )
    assert status == 400, answer
    assert orjson.loads(answer)["error_code"] == "bad_request"
    assert await subject_count(js, f"msg.default.{subject}") == 0
    ok = (
        f"POST /v1/publish/{subject} HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
    )
    status, _ = await asyncio.to_thread(
        http1_exchange,
        broker.port,
        ok.encode() + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n',
        half_close=False,
    )
    assert status == 200
    assert await subject_count(js, f"msg.default.{subject}") == 1


async def test_operations_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    # The module's broker runs a router; whether it was waiting for work just now is timing.
    assert ready.pop("routers_live") in (True, False)
    assert ready == {
        "ready": True,
        "nats_connected": True,
        "missing_streams": [],
        "registry_ready": True,
    }
    version = (await client.get("/version")).json()
    assert version["nats_server_version"]
    assert version["version"]
    document = (await client.get("/openapi.json")).json()
    assert {"/v1/publish/{subject}", "/v1/publish", "/readyz"} <= set(document["paths"])


async def test_unknown_paths_and_methods_answer_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error_code"] == "not_found"
    wrong = await client.get("/v1/publish/a")
    assert wrong.status_code == 405
    assert wrong.json()["error_code"] == "method_not_allowed"


@pytest.mark.parametrize("http2", [True, False], ids=["h2c", "http/1.1"])
@pytest.mark.parametrize(
    ("path", "status"),
    [("/healthz", 405), ("/openapi.json", 200), ("/v1/publish/a", 405), ("/v1/status", 405)],
)
async def test_head_is_answered_without_a_body(
    broker: BrokerProcess, path: str, status: int, http2: bool
) -> None:
    """Over HTTP/2 a HEAD answer carrying DATA frames was a protocol error to the client."""
    async with httpx.AsyncClient(base_url=broker.base_url, http1=not http2, http2=http2) as c:
        answer = await c.head(path)
        assert answer.status_code == status
        assert answer.content == b""
        assert (await c.get("/healthz")).status_code == 200  # the connection still serves


async def test_the_client_sends_integers_past_64_bits_and_they_are_stored_as_written(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """orjson does not write such an integer (TypeError): ``publish({"id": 2**70})`` and a
    batch holding one failed in the client before anything was sent."""
    from broker.client import BrokerClient

    subject = unique("bigint-client")
    big = 2**70 + 3
    async with BrokerClient(broker.base_url) as c:
        one = await c.publish(subject, {"id": big, "name": "Zoë"})
        results = await c.publish_batch([{"subject": subject, "data": [big, -big]}])
    assert (await js.get_msg("MESSAGES", one.seq)).data == '{"id":%d,"name":"Zoë"}'.encode() % big
    stored = await js.get_msg("MESSAGES", results[0].ack.seq)
    assert stored.data == b"[%d,%d]" % (big, -big)


async def test_a_batchs_records_carry_the_requests_trace_context(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """A single publish stores the client's ``traceparent``; a batch's records were stored
    without it unless the request was sampled, so the trace broke at the ingress."""
    subject = unique("traced-batch")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    trace = {"traceparent": parent, "tracestate": "vendor=1"}
    records = [{"subject": subject, "data": {"n": n}} for n in range(2)]
    buffered = await client.post(
        "/v1/publish",
        content=orjson.dumps(records),
        headers={"content-type": "application/json", **trace},
    )
    streamed = await client.post(
        "/v1/publish",
        content=b"\n".join(orjson.dumps(r) for r in records) + b"\n",
        headers={
            "content-type": "application/x-ndjson",
            "accept": "application/x-ndjson",
            **trace,
        },
    )
    seqs = [r["seq"] for r in buffered.json()["results"]]
    seqs += [orjson.loads(line)["seq"] for line in streamed.text.splitlines() if line]
    assert len(seqs) == 4
    for seq in seqs:
        stored = (await js.get_msg("MESSAGES", seq)).headers or {}
        assert stored.get("traceparent") == parent
        assert stored.get("tracestate") == "vendor=1"
