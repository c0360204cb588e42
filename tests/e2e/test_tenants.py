"""Tenants and access against a real ``broker serve``: every cross-tenant attempt is refused.

Tenant ``b`` stores a message, an agent, a schema and a routing decision, each carrying a
marker. Tenant ``a`` then calls every operation of the OpenAPI document, aimed at ``b``'s
names, with and without ``Broker-Tenant: b``. A call is *permitted* if its answer shows a
marker of ``b`` or if ``b``'s state differs afterwards; the test counts them and wants 0.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import nats
import orjson
import pytest
from nats.js.api import ConsumerConfig

from broker.auth import Scope
from broker.embedded import NatsServer
from broker.http.replay import Replayable
from tests._wait import await_until
from tests.e2e._agents import manifest
from tests.e2e._broker import BrokerProcess, start_broker
from tests.e2e._browser import DevTools

pytestmark = pytest.mark.e2e

MARKER = "B-SECRET"  # in every payload, description and schema of tenant b
SCHEMA_MARKER = "BSecretRecord"
JWT_SECRET = "j" * 48
METRICS_TOKEN = "scrape-" + "m" * 32


@dataclass(frozen=True)
class Key:
    id: str
    value: str
    tenants: tuple[str, ...]
    scopes: tuple[str, ...]

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.value}"}


EVERY = tuple(s.value for s in Scope)
KEYS = {
    k.id: k
    for k in (
        Key("a-all", "key-a-all-0123456789abcdef", ("a",), EVERY),
        Key("b-all", "key-b-all-0123456789abcdef", ("b",), EVERY),
        Key("a-ab", "key-two-tenants-0123456789", ("a", "b"), ("consume",)),
        *(Key(f"a-{s}", f"key-a-{s}-0123456789", ("a",), (s,)) for s in EVERY),
    )
}


def auth_config() -> str:
    lines = ["api_keys:"]
    for key in KEYS.values():
        lines += [
            f"  - id: {key.id}",
            f"    sha256: {hashlib.sha256(key.value.encode()).hexdigest()}",
            f"    tenants: [{', '.join(key.tenants)}]",
            f"    scopes: [{', '.join(repr(s) for s in key.scopes)}]",
        ]
    lines += ["jwt:", "  algorithms: [HS256]", "  secret_env: TENANTS_TEST_JWT_SECRET"]
    lines += ["  audience: agent-broker"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    env = {
        "BROKER_AUTH_CONFIG": auth_config(),
        "TENANTS_TEST_JWT_SECRET": JWT_SECRET,
        "BROKER_METRICS_TOKEN": METRICS_TOKEN,
    }
    process = start_broker(
        tmp_path_factory.mktemp("tenants"),
        nats_url=module_nats.url,
        env=env,
        args=("--projection-workers", "0"),
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def http(broker: BrokerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=broker.base_url, http1=False, http2=True, timeout=20) as client:
        yield client


def avro(name: str) -> str:
    return orjson.dumps(
        {"type": "record", "name": name, "fields": [{"name": "id", "type": "string"}]}
    ).decode()


@dataclass
class Seeded:
    schema_id: int
    message_seq: int


@pytest.fixture(scope="module")
def seeded(http: httpx.Client) -> Seeded:
    """Tenant b's data: messages, an agent, a schema, a routing decision."""
    b = KEYS["b-all"].headers
    seq = 0
    for n in range(3):
        r = http.post(
            "/v1/publish/orders.created",
            json={"secret": f"{MARKER}-{n}"},
            headers={**b, "idempotency-key": f"b-{n}"},
        )
        assert r.status_code == 200, r.text
        seq = r.json()["seq"]
    r = http.put("/v1/agents/b-agent", json=manifest("b-agent", f"{MARKER} summariser"), headers=b)
    assert r.status_code in (200, 201), r.text
    r = http.post(
        "/registry/subjects/b-value/versions", json={"schema": avro(SCHEMA_MARKER)}, headers=b
    )
    assert r.status_code == 200, r.text
    schema_id = int(r.json()["id"])
    r = http.post(
        "/v1/route/tasks",
        content=f"{MARKER}: summarise this",
        headers={**b, "content-type": "text/plain"},
    )
    assert r.status_code in (200, 202), r.text
    return Seeded(schema_id=schema_id, message_seq=seq)


def state_of_b(http: httpx.Client) -> dict[str, Any]:
    """Everything tenant b can read: its streams, agents and schemas."""
    b = KEYS["b-all"].headers
    state: dict[str, Any] = {}
    for stream in Replayable:
        r = http.get(f"/v1/streams/{stream}/messages", headers=b)
        assert r.status_code == 200, r.text
        state[stream.value] = [
            (rec["seq"], rec["subject"]) for rec in map(orjson.loads, r.text.splitlines())
        ]
    # the list's own ``seq`` is the REGISTRY stream's position, shared by every tenant
    state["agents"] = http.get("/v1/agents", headers=b).json()["agents"]
    subjects = http.get("/registry/subjects", headers=b).json()
    state["schemas"] = {
        s: http.get(f"/registry/subjects/{s}/versions", headers=b).json() for s in subjects
    }
    state["config"] = http.get("/registry/config", headers=b).json()
    return state


def operations(document: dict[str, Any], seeded: Seeded) -> list[tuple[str, str, dict[str, Any]]]:
    """Every operation of the API, aimed at tenant b's names, with a body that would pass."""
    params = {
        "subject": "orders.created",
        "name": "b-agent",
        "schema_id": str(seeded.schema_id),
        "version": "1",
    }
    found: list[tuple[str, str, dict[str, Any]]] = []
    for template, methods in document["paths"].items():
        for method in methods:
            path = template
            if template.startswith("/registry/"):
                path = path.replace("{subject}", "b-value")
            paths = (
                [path.replace("{stream}", s.value) for s in Replayable]
                if "{stream}" in path
                else [path]
            )
            for one in paths:
                concrete = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], one)
                found.append((method.upper(), concrete, request_body(method, concrete)))
    found.append(("GET", "/v1/status", {}))
    return found


def request_body(method: str, path: str) -> dict[str, Any]:
    if method == "post" and path == "/v1/publish":
        return {"json": [{"subject": "orders.created", "data": {"from": "a"}}]}
    if method == "post" and path.startswith("/v1/publish/"):
        return {"json": {"from": "a"}}
    if method == "post" and path.startswith("/v1/route/"):
        return {"content": b"from a", "headers": {"content-type": "text/plain"}}
    if method == "put" and path.startswith("/v1/agents/"):
        return {"json": manifest(path.rsplit("/", 1)[1], "tenant a's agent")}
    if method == "post" and path.startswith("/registry/"):
        return {"json": {"schema": avro("FromTenantA")}}
    if method == "put" and path.startswith("/registry/config"):
        return {"json": {"compatibility": "NONE"}}
    return {}


def call(
    http: httpx.Client, method: str, path: str, spec: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    extra = spec.get("headers", {})
    kwargs = {k: v for k, v in spec.items() if k != "headers"}
    return http.request(method, path, headers={**headers, **extra}, **kwargs)


_B_SUBJECT = re.compile(r"\b(msg|reg|route|dlq|schema)\.b\.")


def shows_b(text: str) -> bool:
    """Tenant b's data in an answer: a marker in clear or in base64, or one of b's subjects."""
    encoded = [base64.b64encode(pad + MARKER.encode()).decode()[4:12] for pad in (b"", b"x", b"xx")]
    return (
        MARKER in text
        or SCHEMA_MARKER in text
        or any(e in text for e in encoded)
        or _B_SUBJECT.search(text) is not None
    )


def is_public(path: str) -> bool:
    return path in {"/healthz", "/readyz", "/version"}


def test_no_cross_tenant_operation_is_permitted(http: httpx.Client, seeded: Seeded) -> None:
    document = http.get("/openapi.json").json()
    ops = [op for op in operations(document, seeded) if not is_public(op[1])]
    assert len(ops) >= 30  # the whole API, not a sample
    before = state_of_b(http)
    # b really has data to leak, and the detector sees it
    assert MARKER in orjson.dumps(before["agents"]).decode()
    assert shows_b(orjson.dumps(before).decode())

    a = KEYS["a-all"].headers
    leaked, refused, statuses = [], 0, []
    for method, path, spec in ops:
        # Naming tenant b: refused before anything is read or written.
        r = call(http, method, path, spec, {**a, "broker-tenant": "b"})
        if (r.status_code == 403 and "tenant_forbidden" in r.text) or r.json().get(
            "error_code"
        ) == 40301:
            refused += 1
        else:
            leaked.append((method, path, "Broker-Tenant: b", r.status_code))
        # Aimed at b's names from tenant a: whatever it answers, nothing of b's shows.
        r = call(http, method, path, spec, a)
        statuses.append(r.status_code)
        if shows_b(r.text):
            leaked.append((method, path, "tenant a", r.status_code))
    after = state_of_b(http)
    changed = [k for k in before if before[k] != after[k]]
    print(f"{len(ops)} operations; {refused} refused naming tenant b; {sorted(set(statuses))}")
    assert leaked == []
    assert changed == [], [(before[k], after[k]) for k in changed]
    assert refused == len(ops)
    # Tenant a's calls did work on tenant a: they were not just all refused.
    assert statuses.count(200) >= 10


def test_tenant_a_sees_only_its_own_data(http: httpx.Client, seeded: Seeded) -> None:
    a = KEYS["a-all"].headers
    http.post("/v1/publish/orders.created", json={"mine": "a"}, headers=a).raise_for_status()
    records = [
        orjson.loads(line)
        for line in http.get("/v1/streams/MESSAGES/messages", headers=a).text.splitlines()
    ]
    assert records
    assert all(rec["subject"].startswith("msg.a.") for rec in records)
    assert http.get("/v1/agents/b-agent", headers=a).status_code == 404
    # schema ids are counted per tenant: a's id may exist, but it is never b's schema
    assert (
        SCHEMA_MARKER not in http.get(f"/registry/schemas/ids/{seeded.schema_id}", headers=a).text
    )
    status = http.get("/v1/status", headers=a).json()
    assert status["broker"]["tenant"] == "a"
    assert not shows_b(orjson.dumps(status).decode())
    assert all(not d["subject"].startswith("dlq.b.") for d in status["dlq"])


async def test_status_lists_only_the_tenants_own_agent_consumers(
    broker: BrokerProcess, module_nats: NatsServer, seeded: Seeded
) -> None:
    """An agent's consumer is named after the agent: a's status must not list b's."""
    nc = await nats.connect(module_nats.url)
    try:
        for tenant in ("a", "b"):
            config = ConsumerConfig(
                durable_name=f"agent-{tenant}~{tenant}-payroll",
                filter_subject=f"route.{tenant}.{tenant}-payroll",
            )
            await nc.jetstream().add_consumer("ROUTES", config)
    finally:
        await nc.close()
    await asyncio.sleep(1.1)  # the status is cached for a second
    for tenant in ("a", "b"):
        async with httpx.AsyncClient(base_url=broker.base_url, http2=True) as client:
            answer = await client.get("/v1/status", headers=KEYS[f"{tenant}-all"].headers)
        names = {c["name"] for c in answer.json()["consumers"]}
        assert f"agent-{tenant}~{tenant}-payroll" in names
        assert not [n for n in names if "payroll" in n and not n.startswith(f"agent-{tenant}~")]
        assert "router" in names  # the broker's own stay


async def test_the_streaming_publish_carries_the_clients_credentials(
    broker: BrokerProcess,
) -> None:
    from broker.client import BrokerClient

    async def records() -> AsyncIterator[dict[str, object]]:
        yield {"data": {"streamed": True}}

    async with BrokerClient(broker.base_url, api_key=KEYS["a-all"].value) as client:
        results = [r async for r in client.publish_stream(records(), subject="streamed.in")]
    assert [r.ok for r in results] == [True]


def test_idempotency_keys_are_the_tenants_own(http: httpx.Client, seeded: Seeded) -> None:
    """b stored a message with the key ``b-0``: a's message with that key is stored too (not
    answered as b's duplicate, which would also tell a that b used the key)."""
    a = KEYS["a-all"].headers
    sent = [
        http.post(
            "/v1/publish/orders.created",
            json={"mine": "a"},
            headers={**a, "idempotency-key": "b-0"},
        )
        for _ in range(2)
    ]
    assert [r.status_code for r in sent] == [200, 200]
    assert [r.json()["duplicate"] for r in sent] == [False, True]
    assert sent[0].json()["seq"] != seeded.message_seq
    assert sent[1].json()["seq"] == sent[0].json()["seq"]


def test_a_key_with_two_tenants_picks_one_with_broker_tenant(
    http: httpx.Client, seeded: Seeded
) -> None:
    ab = KEYS["a-ab"].headers
    replay = "/v1/streams/MESSAGES/messages?decode=json"
    as_b = http.get(replay, headers={**ab, "broker-tenant": "b"})
    as_default = http.get(replay, headers=ab)
    assert MARKER in as_b.text
    assert shows_b(as_b.text)
    assert as_default.status_code == 200
    assert not shows_b(as_default.text)
    r = http.get("/v1/streams/MESSAGES/messages", headers={**ab, "broker-tenant": "c"})
    assert r.status_code == 403
    assert r.json()["error_code"] == "tenant_forbidden"


def test_every_scope_opens_its_operations_only(http: httpx.Client, seeded: Seeded) -> None:
    """Each single-scope key against every operation: 403 exactly where the scope is missing."""
    from broker.auth import required_scopes

    document = http.get("/openapi.json").json()
    wrong = []
    for method, path, spec in operations(document, seeded):
        needed = required_scopes(method, path)
        for scope in EVERY:
            r = call(http, method, path, spec, KEYS[f"a-{scope}"].headers)
            should_refuse = needed is not None and bool(needed) and scope not in needed
            refused = r.status_code == 403
            if refused != should_refuse:
                wrong.append((method, path, scope, r.status_code))
    assert wrong == []


def test_without_credentials_only_health_and_docs_answer(
    http: httpx.Client, seeded: Seeded
) -> None:
    document = http.get("/openapi.json").json()
    for method, path, spec in operations(document, seeded):
        r = call(http, method, path, spec, {})
        if is_public(path):
            assert r.status_code != 401, path
        else:
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
            code = r.json()["error_code"]
            assert code == (40101 if path.startswith("/registry/") else "unauthenticated")
    for public in ("/healthz", "/ui", "/openapi.json"):
        assert http.get(public).status_code == 200, public
    assert http.get("/no/such/thing").status_code == 401


def test_metrics_answer_only_the_scrape_token(http: httpx.Client, seeded: Seeded) -> None:
    """Their labels name every tenant and agent: with ``BROKER_METRICS_TOKEN`` set neither a
    stranger nor a tenant's own API key reads them."""
    for headers in ({}, KEYS["a-all"].headers, {"authorization": "Bearer wrong"}):
        r = http.get("/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error_code"] == "unauthenticated"
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = http.get("/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200
    assert "broker_http_requests_total" in r.text


def test_jwt_bearer_tokens(http: httpx.Client, seeded: Seeded) -> None:
    def token(**claims: Any) -> dict[str, str]:
        body = {"aud": "agent-broker", "exp": int(time.time()) + 60, **claims}
        return {"authorization": "Bearer " + jwt.encode(body, JWT_SECRET, algorithm="HS256")}

    r = http.get(
        "/v1/streams/MESSAGES/messages?decode=json", headers=token(tenant="b", scope="consume")
    )
    assert r.status_code == 200
    assert MARKER in r.text
    r = http.post("/v1/publish/x", json={}, headers=token(tenant="b", scope="consume"))
    assert r.status_code == 403
    for bad in (
        token(tenant="b", scope="consume", exp=int(time.time()) - 3600),
        token(tenant="b", scope="consume", aud="other"),
        token(scope="consume"),
    ):
        r = http.get("/v1/streams/MESSAGES/messages", headers=bad)
        assert r.status_code == 401, r.text


def test_confluent_clients_authenticate_with_basic(broker: BrokerProcess, seeded: Seeded) -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    key = KEYS["b-all"].value
    client = SchemaRegistryClient(
        {"url": broker.base_url + "/registry", "basic.auth.user.info": f"b-all:{key}"}
    )
    assert "b-value" in client.get_subjects()
    assert SCHEMA_MARKER in client.get_schema(seeded.schema_id).schema_str
    other = SchemaRegistryClient(
        {
            "url": broker.base_url + "/registry",
            "basic.auth.user.info": "x:" + base64.b64encode(b"nope").decode(),
        }
    )
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    with pytest.raises(SchemaRegistryError) as caught:
        other.get_subjects()
    assert caught.value.http_status_code == 401


async def test_status_page_asks_for_a_key_and_shows_the_keys_tenant(
    page: DevTools, broker: BrokerProcess, seeded: Seeded
) -> None:
    await page.call("Page.navigate", url=f"{broker.base_url}/ui")

    async def asking() -> bool:
        return bool(
            await page.evaluate(
                "!!document.getElementById('login') && !document.getElementById('login').hidden"
            )
        )

    assert await await_until(asking, timeout=20, interval=0.2)
    assert "401" in await page.evaluate("document.getElementById('error').innerText")
    key = KEYS["b-all"].value
    await page.evaluate(
        f"document.getElementById('key').value = {key!r};"
        "document.getElementById('login').requestSubmit()"
    )

    async def shown() -> bool:
        text = await page.evaluate("document.querySelector('#agents tbody').innerText")
        return "b-agent" in str(text)

    assert await await_until(shown, timeout=20, interval=0.2)
    assert "tenant b" in await page.evaluate("document.getElementById('build').innerText")
    assert await page.evaluate("document.getElementById('login').hidden")
    # the page's own 401 is the browser's network log, not a script error
    assert [e for e in page.errors if "401" not in e] == []
