"""Ingress defects found in review, against a real ``broker serve`` over HTTP/2.

Header values granian cannot read, conditional records retried in batches and streams,
structured CloudEvents with conditions, whitespace-bordered keys, CloudEvent batch
subjects, and a streaming publish whose acks the ingress cannot see being read.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from broker.embedded import NatsServer
from tests.e2e._agents import manifest
from tests.e2e._broker import BrokerProcess, start_broker
from tests.e2e.test_limits import H2Client

pytestmark = pytest.mark.e2e

KEY = "key-fixes-a-0123456789abcdef"
#: A stream then carries at most 10 x 100 records.
MAX_BATCH_RECORDS = 100
STREAM_RECORDS = 10 * MAX_BATCH_RECORDS


def auth_config() -> str:
    return "\n".join(
        [
            "api_keys:",
            "  - id: a",
            "    key_env: FIXES_TEST_KEY",
            "    tenants: [a]",
            "    scopes: [publish, consume, 'registry:admin', 'schema:admin']",
        ]
    )


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    env = {
        "BROKER_AUTH_CONFIG": auth_config(),
        "FIXES_TEST_KEY": KEY,
        "BROKER_MAX_BATCH_RECORDS": str(MAX_BATCH_RECORDS),
    }
    process = start_broker(
        tmp_path_factory.mktemp("fixes"),
        nats_url=module_nats.url,
        env=env,
        args=("--projection-workers", "0"),
    )
    yield process
    process.stop()


@pytest_asyncio.fixture
async def http(broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=broker.base_url,
        http1=False,
        http2=True,
        timeout=20,
        headers={"x-api-key": KEY},
    ) as client:
        yield client


def unique(prefix: str = "fix") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


async def stored(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info("MESSAGES", subjects_filter=f"msg.a.{subject}")
    return sum((info.state.subjects or {}).values())


def raw(
    broker: BrokerProcess, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> tuple[int | None, bytes]:
    """One request whose header values go on the wire as UTF-8, as sent."""
    client = H2Client(broker.port)
    try:
        stream = client.request(method, path, [("x-api-key", KEY), *headers], end=False)
        client.send(stream, body, end=True)
        client.read_until(stream)
        return client.streams[stream].status, client.streams[stream].body
    finally:
        client.close()


# --- header values granian cannot read --------------------------------------------------


async def test_a_non_ascii_idempotency_key_is_refused_and_nothing_stored(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """granian answers ``None`` for it: read as absent, every retry stored a copy."""
    subject = unique()
    for _ in range(2):
        status, body = raw(
            broker,
            "POST",
            f"/v1/publish/{subject}",
            [("content-type", "text/plain"), ("idempotency-key", "commande-\u00e9-42")],
            b"order-42",
        )
        assert status == 400, body
        answer = orjson.loads(body)
        assert answer["error_code"] == "bad_request"
        assert "idempotency-key" in answer["message"]
    assert await stored(js, subject) == 0


async def test_a_full_width_expected_sequence_is_refused_not_ignored(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = unique()
    status, body = raw(
        broker,
        "POST",
        f"/v1/publish/{subject}",
        [("content-type", "text/plain"), ("expected-last-subject-sequence", "\uff15")],
        b"x",
    )
    assert status == 400, body
    assert "expected-last-subject-sequence" in orjson.loads(body)["message"]
    assert await stored(js, subject) == 0


async def test_a_non_ascii_broker_tenant_is_refused_not_the_default_tenant(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = unique()
    status, body = raw(
        broker,
        "POST",
        f"/v1/publish/{subject}",
        [("content-type", "text/plain"), ("broker-tenant", "b\u00e9")],
        b"1",
    )
    assert status == 400, body
    assert "broker-tenant" in orjson.loads(body)["message"]
    assert await stored(js, subject) == 0


async def test_a_non_ascii_if_match_is_refused_on_the_fastapi_routes(
    broker: BrokerProcess, http: httpx.AsyncClient
) -> None:
    """Agents come through the ASGI bridge: an unreadable ``If-Match`` made the write
    unconditional."""
    name = f"fix-{uuid.uuid4().hex[:8]}"
    assert (await http.put(f"/v1/agents/{name}", json=manifest(name, "one"))).status_code in (
        200,
        201,
    )
    second = await http.put(f"/v1/agents/{name}", json=manifest(name, "two"))
    assert second.status_code == 200, second.text
    status, body = raw(
        broker,
        "PUT",
        f"/v1/agents/{name}",
        [("content-type", "application/json"), ("if-match", '"1", "\u00e9"')],
        orjson.dumps(manifest(name, "stale write")),
    )
    assert status == 400, body
    assert "if-match" in orjson.loads(body)["message"]
    # nothing was appended: the agent is still at the second write's sequence
    third = await http.put(
        f"/v1/agents/{name}",
        json=manifest(name, "three"),
        headers={"if-match": f'"{second.json()["seq"]}"'},
    )
    assert third.status_code == 200, third.text


def test_a_non_ascii_header_on_a_registry_path_answers_an_integer_code(
    broker: BrokerProcess,
) -> None:
    status, body = raw(
        broker, "GET", "/registry/subjects", [("authorization", "Bearer \u00e9")], b""
    )
    assert status == 400, body
    assert orjson.loads(body)["error_code"] == 400


async def test_a_non_ascii_header_the_broker_does_not_read_is_still_served(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = unique()
    status, body = raw(
        broker,
        "POST",
        f"/v1/publish/{subject}",
        [("content-type", "text/plain"), ("x-note", "prix: 5 \u20ac")],
        b"1",
    )
    assert status == 200, body
    assert await stored(js, subject) == 1


# --- a client's trace context ------------------------------------------------------------

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_trace_context_never_refuses_a_publish_and_is_stored_bounded(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """Two ``tracestate`` headers are one list, cut to 512 characters at a member's end (2 400
    characters were refused with 422); a ``traceparent`` that does not parse is left out with
    its ``tracestate`` and the message stored."""
    members = [f"vendor{i}={'x' * 70}" for i in range(30)]
    subject = unique()
    status, body = raw(
        broker,
        "POST",
        f"/v1/publish/{subject}",
        [
            ("content-type", "text/plain"),
            ("traceparent", TRACEPARENT),
            ("tracestate", ",".join(members[:15])),
            ("tracestate", ",".join(members[15:])),
        ],
        b"1",
    )
    assert status == 200, body
    headers = (await js.get_msg("MESSAGES", orjson.loads(body)["seq"])).headers or {}
    assert headers["traceparent"] == TRACEPARENT
    assert headers["tracestate"] == ",".join(members[:6])  # 6 x 78 - 1 = 467; 7 are 545

    malformed = unique()
    status, body = raw(
        broker,
        "POST",
        f"/v1/publish/{malformed}",
        [("content-type", "text/plain"), ("traceparent", "00-xyz"), ("tracestate", "a=1")],
        b"1",
    )
    assert status == 200, body
    headers = (await js.get_msg("MESSAGES", orjson.loads(body)["seq"])).headers or {}
    assert "traceparent" not in headers
    assert "tracestate" not in headers


# --- structured CloudEvents with conditions ---------------------------------------------


async def test_a_structured_cloudevent_honours_expected_sequence_and_schema_id(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = unique()
    first = await http.post(
        f"/v1/publish/{subject}", content=b"{}", headers={"content-type": "text/plain"}
    )
    seq = first.json()["seq"]
    event = {"specversion": "1.0", "source": "s", "type": "t", "data": {"x": 1}}
    ce = "application/cloudevents+json"
    stale = await http.post(
        f"/v1/publish/{subject}",
        content=orjson.dumps({**event, "id": "e1"}),
        headers={"content-type": ce, "expected-last-subject-sequence": str(seq + 1000)},
    )
    assert stale.status_code == 409, stale.text
    assert stale.json()["error_code"] == "sequence_conflict"
    assert await stored(js, subject) == 1
    current = await http.post(
        f"/v1/publish/{subject}",
        content=orjson.dumps({**event, "id": "e2"}),
        headers={"content-type": ce, "expected-last-subject-sequence": str(seq), "schema-id": "77"},
    )
    assert current.status_code == 200, current.text
    message = await js.get_msg("MESSAGES", current.json()["seq"])
    assert (message.headers or {})["Broker-Schema-Id"] == "77"
    assert (message.headers or {})["ce-id"] == "e2"


# --- retried conditional records ----------------------------------------------------------


async def test_a_retried_conditional_batch_answers_duplicates_not_conflicts(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """Two chained conditional records on one subject, the batch sent twice (its answer
    lost): the retry finds both stored where their conditions put them."""
    subject = unique()
    records = [
        {
            "subject": subject,
            "data": 1,
            "idempotency_key": "K1",
            "expected_last_subject_sequence": 0,
        },
    ]
    first = await http.post("/v1/publish", json=records)
    assert first.status_code == 200, first.text
    seq = first.json()["results"][0]["seq"]
    records.append(
        {
            "subject": subject,
            "data": 2,
            "idempotency_key": "K2",
            "expected_last_subject_sequence": seq,
        }
    )
    assert (await http.post("/v1/publish", json=records[1:])).status_code == 200
    retry = await http.post("/v1/publish", json=records)
    assert retry.status_code == 200, retry.text
    results = retry.json()["results"]
    assert [r.get("duplicate") for r in results] == [True, True]
    assert results[0]["seq"] == seq
    assert await stored(js, subject) == 2


async def test_a_retried_conditional_stream_record_answers_duplicate(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    subject = unique()
    record = {
        "subject": subject,
        "data": 1,
        "idempotency_key": "K3",
        "expected_last_subject_sequence": 0,
    }
    answers = []
    for _ in range(2):
        status, body = raw(
            broker,
            "POST",
            "/v1/publish",
            [("content-type", "application/x-ndjson"), ("accept", "application/x-ndjson")],
            orjson.dumps(record) + b"\n",
        )
        assert status == 200, body
        answers.append(orjson.loads(body))
    assert answers[1] == {**answers[0], "duplicate": True}
    assert await stored(js, subject) == 1


# --- whitespace NATS would trim ------------------------------------------------------------


async def test_keys_with_surrounding_whitespace_are_refused_not_collapsed(
    broker: BrokerProcess, http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = unique()
    keys = ["k", "k ", " k", "k\t", "\tk"]
    records = [{"subject": subject, "data": i, "idempotency_key": k} for i, k in enumerate(keys)]
    r = await http.post("/v1/publish", json=records)
    assert r.status_code == 207, r.text
    results = r.json()["results"]
    assert results[0]["duplicate"] is False
    assert [res.get("error_code") for res in results[1:]] == ["unprocessable"] * 4
    status, body = raw(
        broker,
        "POST",
        "/v1/publish",
        [("content-type", "application/x-ndjson"), ("accept", "application/x-ndjson")],
        orjson.dumps(records[1]) + b"\n",
    )
    assert status == 200, body
    assert orjson.loads(body)["error_code"] == "unprocessable"
    assert await stored(js, subject) == 1


# --- CloudEvent batches ---------------------------------------------------------------------


async def test_a_cloudevent_batch_keeps_each_events_own_subject_over_the_default(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    base = unique()
    events = [
        {
            "specversion": "1.0",
            "id": f"{base}-0",
            "source": "x",
            "type": "t",
            "data": 0,
            "brokersubject": f"{base}.own",
        },
        {"specversion": "1.0", "id": f"{base}-1", "source": "x", "type": "t", "data": 1},
    ]
    r = await http.post(
        "/v1/publish",
        params={"subject": f"{base}.default"},
        content=orjson.dumps(events),
        headers={"content-type": "application/cloudevents-batch+json"},
    )
    assert r.status_code == 200, r.text
    assert await stored(js, f"{base}.own") == 1
    assert await stored(js, f"{base}.default") == 1


# --- streaming publish: acks nobody reads -----------------------------------------------------


async def test_a_stream_ends_after_its_record_limit_and_stores_nothing_past_it(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """granian queues every ack line until the client reads it and cannot say how far it
    has: a stream is bounded instead. The client here reads nothing until it has sent all."""
    subject = unique()
    body = b"".join(orjson.dumps({"data": i}) + b"\n" for i in range(STREAM_RECORDS + 200))
    client = H2Client(broker.port)
    try:
        stream = client.request(
            "POST",
            f"/v1/publish?subject={subject}",
            [
                ("x-api-key", KEY),
                ("content-type", "application/x-ndjson"),
                ("accept", "application/x-ndjson"),
            ],
            end=False,
        )
        client.send(stream, body, end=True)
        client.read_until(stream, timeout=60)
        answer = client.streams[stream]
    finally:
        client.close()
    assert answer.status == 200
    lines = [orjson.loads(line) for line in answer.body.splitlines() if line]
    assert len(lines) == STREAM_RECORDS + 1
    assert all("seq" in line for line in lines[:STREAM_RECORDS])
    last = lines[-1]
    assert last["index"] == STREAM_RECORDS
    assert last["error_code"] == "stream_full"
    assert str(STREAM_RECORDS) in last["message"]
    assert await stored(js, subject) == STREAM_RECORDS


async def test_the_client_goes_on_in_a_new_stream_when_one_is_full(
    broker: BrokerProcess, js: JetStreamContext
) -> None:
    """``publish_stream`` sends the records the broker did not read (those already sent
    included) in a new stream: every record gets its result, in order, and is stored once.
    The source is slow at the cut, so a pull of it is under way when a stream ends."""
    from broker.client import BrokerClient

    subject = unique()
    total = 2 * STREAM_RECORDS + 150

    async def records() -> AsyncIterator[dict[str, object]]:
        for i in range(total):
            if i % STREAM_RECORDS == STREAM_RECORDS - 1:
                await asyncio.sleep(0.2)
            yield {"data": {"i": i}, "idempotency_key": f"{subject}-{i}"}

    results = []
    async with BrokerClient(broker.base_url, api_key=KEY) as client:
        async for result in client.publish_stream(records(), subject=subject):
            results.append(result)
    assert len(results) == total
    assert all(r.ok and r.ack is not None and not r.ack.duplicate for r in results)
    seqs = [r.ack.seq for r in results if r.ack is not None]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == total
    assert await stored(js, subject) == total
