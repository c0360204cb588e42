"""schemathesis against the served OpenAPI document: no input makes the ingress fail (5xx).

Every generated request, valid or not, must get a status below 500; error answers carry
``{"error_code", "message"}``; documented responses match their schema. (Driven through
hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.auths import apply_basic_auth
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from broker.embedded import NatsServer
from tests.e2e._broker import BrokerProcess, start_broker
from tests.e2e.conftest import E2E_ENV

pytestmark = pytest.mark.e2e

#: The broker under test requires credentials: every generated request carries this key (all
#: scopes), and schemathesis' ``ignored_auth`` check re-sends requests without it (401).
API_KEY = "fuzz-key-0123456789abcdef"
AUTH = (
    "api_keys:\n  - id: fuzz\n"
    f"    sha256: {hashlib.sha256(API_KEY.encode()).hexdigest()}\n"
    "    tenant: fuzz\n"
    "    scopes: [publish, consume, 'registry:admin', 'schema:admin']\n"
)


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    env = {**E2E_ENV, "BROKER_AUTH_CONFIG": AUTH}
    process = start_broker(tmp_path_factory.mktemp("fuzz"), nats_url=module_nats.url, env=env)
    yield process
    process.stop()


EXAMPLES_PER_OPERATION = 60
#: Operations with a constraint across fields that a schema cannot state: a PUT manifest's
#: name must equal the path's, an as_of time must be a real date, a replay starts at a
#: sequence or a time. Schema-valid requests
#: may be refused there (422); every other check still applies.
CROSS_FIELD = {
    ("PUT", "/v1/agents/{name}"),
    ("GET", "/v1/agents"),
    ("GET", "/v1/streams/{stream}/messages"),  # start_seq and start_time exclude each other
    ("POST", "/v1/route/{subject}"),  # a Broker-Embedding must have the router's dimension
}
#: The schema registry's bodies hold schemas (Avro, Protobuf, JSON Schema): languages of their
#: own that an OpenAPI string cannot describe, so a schema-valid body may be an invalid schema
#: (42201) or an incompatible one (409), and a version id may be out of range (42202).
CROSS_FIELD_PREFIXES = ("/registry/",)
#: Routing outcomes that are answers, not failures: no agent runs during this test, so a
#: routed request with wait=true is dead-lettered (503 no_route) or, with a tiny timeout,
#: runs out of time (504 deadline_exceeded).
ROUTE_OUTCOMES = {503: "no_route", 504: "deadline_exceeded"}
#: The generator draws the same few idempotency keys (``Idempotency-Key``, a CloudEvent's
#: ``id``) again with other bodies: the broker refuses such a request, which depends on what
#: an earlier one stored, a state no schema states.
STATEFUL_REFUSAL = (422, "idempotency_key_reused")


def _error_code(response: Any) -> object:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error_code") if isinstance(body, dict) else None


def test_api_answers_every_generated_request_without_server_errors(broker: BrokerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{broker.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/publish/{subject}", "/v1/publish", "/readyz"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            apply_basic_auth(case, "fuzz", API_KEY)  # the key as Basic's password
            response = case.call(timeout=15)
            outcome = ROUTE_OUTCOMES.get(response.status_code)
            routed = case.path == "/v1/route/{subject}" and outcome is not None
            assert response.status_code < 500 or (
                routed and response.json()["error_code"] == outcome
            ), (
                case.path,
                response.status_code,
                response.text[:300],
            )
            if response.status_code >= 400:
                assert {"error_code", "message"} <= set(response.json()), response.text[:300]
            stateful = (response.status_code, _error_code(response)) == STATEFUL_REFUSAL
            excluded = (
                [positive_data_acceptance]
                if (case.method.upper(), case.path) in CROSS_FIELD
                or case.path.startswith(CROSS_FIELD_PREFIXES)
                or stateful
                else None
            )
            if routed:
                excluded = [*(excluded or []), not_a_server_error]
            case.validate_response(response, excluded_checks=excluded)

        check()
