"""Authentication and the access policy, without a server: keys, JWTs, tenants, scopes."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.auth import (
    ALL_SCOPES,
    AuthConfigError,
    Authenticator,
    Principal,
    Scope,
    load_config,
    required_scopes,
    valid_tenant,
)
from broker.envelope import Tenant
from broker.errors import Forbidden, TenantForbidden, Unauthenticated
from broker.settings import Settings

pytestmark = pytest.mark.unit

SECRET = "s" * 40
KEY_A = "key-of-tenant-a-0123456789"
KEY_AB = "key-of-two-tenants-0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def document(**jwt_config: Any) -> str:
    lines = [
        "api_keys:",
        "  - id: a-publisher",
        f"    sha256: {sha(KEY_A)}",
        "    tenant: a",
        "    scopes: [publish]",
        "  - id: platform",
        "    key_env: TEST_PLATFORM_KEY",
        "    tenants: [a, b]",
        "    scopes: [publish, consume, 'registry:admin', 'schema:admin']",
    ]
    if jwt_config:
        lines.append("jwt:")
        lines += [f"  {k}: {v}" for k, v in jwt_config.items()]
    return "\n".join(lines)


@pytest.fixture
def platform_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_PLATFORM_KEY", KEY_AB)
    monkeypatch.setenv("TEST_JWT_SECRET", SECRET)
    return KEY_AB


def authenticator(text: str) -> Authenticator:
    return Authenticator.from_settings(Settings(auth_config=text))


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")


def test_without_config_every_request_is_the_default_tenant_with_every_scope() -> None:
    auth = Authenticator.from_settings(Settings(tenant="acme"))
    principal = auth.authenticate({})
    assert principal.tenants == (Tenant("acme"),)
    assert principal.scopes == ALL_SCOPES
    assert principal.tenant() == "acme"
    with pytest.raises(TenantForbidden):
        principal.tenant("other")


def test_api_key_in_each_carrier(platform_key: str) -> None:
    auth = authenticator(document())
    basic = base64.b64encode(f"whoever:{KEY_A}".encode()).decode()
    for headers in (
        {"x-api-key": KEY_A},
        {"authorization": f"Bearer {KEY_A}"},
        {"authorization": f"bearer   {KEY_A} "},
        {"authorization": f"Basic {basic}"},
    ):
        principal = auth.authenticate(headers)
        assert principal.name == "a-publisher"
        assert principal.tenants == ("a",)
        assert principal.scopes == {Scope.PUBLISH}
    assert auth.authenticate({"x-api-key": platform_key}).tenants == ("a", "b")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "requires an API key"),
        ({"authorization": ""}, "requires an API key"),
        ({"x-api-key": "wrong"}, "unknown API key"),
        ({"authorization": "Bearer wrong"}, "unknown API key"),
        ({"authorization": "Token abc"}, "must be 'Bearer"),
        ({"authorization": "Basic !!!"}, "not base64"),
        ({"authorization": "Bearer"}, "must be 'Bearer"),
    ],
)
def test_missing_or_wrong_credentials_are_401(
    platform_key: str, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message) as caught:
        authenticator(document()).authenticate(headers)
    assert caught.value.status == 401
    assert ("www-authenticate", 'Bearer realm="agent-broker"') in caught.value.headers


_HYPOTHESIS_AUTH = Authenticator.from_settings(
    Settings(
        auth_config=f"api_keys:\n  - id: a-publisher\n    sha256: {sha(KEY_A)}\n"
        "    tenant: a\n    scopes: [publish]\n"
    )
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["authorization", "x-api-key", "other"]),
        st.one_of(
            st.text(),
            st.sampled_from(["Bearer ", "Basic ", "bearer a.b.c", f"Bearer {KEY_A}x"]).map(
                lambda p: p + "z"
            ),
        ),
    )
)
def test_any_header_value_is_the_one_key_or_a_401(headers: dict[str, str]) -> None:
    try:
        principal = _HYPOTHESIS_AUTH.authenticate(headers)
    except Unauthenticated:
        return
    assert principal.name == "a-publisher"  # only the one configured key gets through


def test_principal_tenant_and_scopes() -> None:
    p = Principal("p", (Tenant("a"), Tenant("b")), frozenset({Scope.CONSUME}))
    assert p.tenant() == "a"
    assert p.tenant("b") == "b"
    assert p.tenant("") == "a"
    with pytest.raises(TenantForbidden) as caught:
        p.tenant("c")
    assert caught.value.status == 403
    p.require(frozenset())
    p.require(frozenset({Scope.CONSUME, Scope.PUBLISH}))
    with pytest.raises(Forbidden, match="lacks the scope publish"):
        p.require(frozenset({Scope.PUBLISH}))


def test_hs256_token(platform_key: str) -> None:
    auth = authenticator(document(algorithms="[HS256]", secret_env="TEST_JWT_SECRET"))
    token = hs256({"sub": "svc-1", "tenant": "b", "scope": "consume publish"})
    principal = auth.authenticate({"authorization": f"Bearer {token}"})
    assert principal == Principal(
        "svc-1", (Tenant("b"),), frozenset({Scope.CONSUME, Scope.PUBLISH})
    )
    # a cached token gives the same principal; API keys still work beside JWTs
    assert auth.authenticate({"authorization": f"Bearer {token}"}) == principal
    assert auth.authenticate({"authorization": f"Bearer {KEY_A}"}).name == "a-publisher"


@pytest.mark.parametrize(
    ("claims", "secret", "message"),
    [
        ({"tenant": "a", "exp": int(time.time()) - 3600}, SECRET, "expired"),
        ({"tenant": "a"}, "x" * 40, "Signature verification failed"),
        ({"scope": "publish"}, SECRET, "no 'tenant' claim"),
        ({"tenant": "a b/c"}, SECRET, "must be 1-64"),
        ({"tenant": "MESSAGES"}, SECRET, "reserved"),
    ],
)
def test_bad_tokens_are_401(
    platform_key: str, claims: dict[str, Any], secret: str, message: str
) -> None:
    auth = authenticator(document(algorithms="[HS256]", secret_env="TEST_JWT_SECRET"))
    with pytest.raises(Unauthenticated, match=message):
        auth.authenticate({"authorization": f"Bearer {hs256(claims, secret)}"})


def test_token_without_expiry_is_refused(platform_key: str) -> None:
    auth = authenticator(document(algorithms="[HS256]", secret_env="TEST_JWT_SECRET"))
    token = jwt.encode({"tenant": "a"}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthenticated, match="exp"):
        auth.authenticate({"authorization": f"Bearer {token}"})


def test_rs256_token_with_issuer_and_audience(platform_key: str, tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "jwt.pub").write_bytes(public_pem)
    auth = authenticator(
        document(
            algorithms="[RS256]",
            public_key_file=str(tmp_path / "jwt.pub"),
            issuer="https://issuer.test/",
            audience="agent-broker",
            tenant_claim="org",
            scope_claim="scopes",
        )
    )

    def token(**claims: Any) -> str:
        base = {"exp": int(time.time()) + 60, "iss": "https://issuer.test/", "aud": "agent-broker"}
        return jwt.encode({**base, **claims}, private, algorithm="RS256")

    good = token(sub="agent-7", org=["b"], scopes=["schema:admin"])
    principal = auth.authenticate({"authorization": f"Bearer {good}"})
    assert principal.tenants == ("b",)
    assert principal.scopes == {Scope.SCHEMA_ADMIN}
    for bad in (
        token(org="b", aud="someone-else"),
        token(org="b", iss="https://evil.test/"),
        jwt.encode({"exp": int(time.time()) + 60, "org": "b"}, "h" * 40, algorithm="HS256"),
    ):
        with pytest.raises(Unauthenticated):
            auth.authenticate({"authorization": f"Bearer {bad}"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api_keys: []", "neither api_keys nor jwt"),
        ("[1, 2", "not YAML"),
        ("api_keys:\n  - id: x\n    tenant: a\n    scopes: [publish]", "exactly one of sha256"),
        (
            f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    scopes: [publish]",
            "exactly one of tenant and tenants",
        ),
        (
            f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    tenant: a\n    scopes: [root]",
            "unknown scope",
        ),
        (
            f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    tenant: dlq\n    scopes: []",
            "reserved",
        ),
        (
            f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    tenant: a\n    scopes: []\n"
            f"  - id: x\n    sha256: {sha('j')}\n    tenant: a\n    scopes: []",
            "unique",
        ),
        (
            f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    tenant: a\n    scopes: []\n"
            f"  - id: y\n    sha256: {sha('k')}\n    tenant: b\n    scopes: []",
            "same key as another",
        ),
        (
            "api_keys:\n  - id: x\n    key_env: UNSET_VARIABLE_XYZ\n    tenant: a\n    scopes: []",
            "not set",
        ),
        (
            f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    tenants: []\n    scopes: []",
            "at least one tenant",
        ),
        (
            f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    tenant: ''\n    scopes: []",
            "must be 1-64",
        ),
        ("jwt:\n  algorithms: [HS256]", "exactly one of secret_env"),
        ("jwt:\n  algorithms: [HS256]\n  public_key_file: /x", "cannot verify HS"),
        ("jwt:\n  algorithms: [RS256]\n  secret_env: S", "HS256/HS384/HS512 only"),
        ("jwt:\n  algorithms: [RS256]\n  public_key_file: /nonexistent.pem", "cannot read"),
        ("nonsense: 1", "Extra inputs"),
    ],
)
def test_broken_config_is_refused_at_start(text: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        authenticator(text)


def test_short_hmac_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_SECRET", "too-short")
    with pytest.raises(AuthConfigError, match="at least 32"):
        authenticator("jwt:\n  algorithms: [HS256]\n  secret_env: SHORT_SECRET")


def test_config_from_file_or_inline_not_both(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(f"api_keys:\n  - id: x\n    sha256: {sha('k')}\n    tenant: a\n    scopes: []")
    assert load_config(Settings(auth_file=path)) is not None
    assert load_config(Settings()) is None
    with pytest.raises(AuthConfigError, match="not both"):
        load_config(Settings(auth_file=path, auth_config="api_keys: []"))
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_config(Settings(auth_file=tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "/healthz", None),
        ("GET", "/metrics", None),
        ("GET", "/openapi.json", None),
        ("GET", "/ui", None),
        ("POST", "/v1/publish", {Scope.PUBLISH}),
        ("POST", "/v1/publish/orders.created", {Scope.PUBLISH}),
        ("POST", "/v1/route/tasks", {Scope.PUBLISH}),
        ("GET", "/v1/streams/MESSAGES/messages", {Scope.CONSUME}),
        ("GET", "/v1/status", {Scope.CONSUME}),
        ("GET", "/v1/agents", set()),
        ("GET", "/v1/agents/x", set()),
        ("PUT", "/v1/agents/x", {Scope.REGISTRY_ADMIN}),
        ("DELETE", "/v1/agents/x", {Scope.REGISTRY_ADMIN}),
        ("GET", "/registry/subjects", set()),
        ("POST", "/registry/subjects/s", set()),  # look a schema up
        ("POST", "/registry/subjects/s/versions", {Scope.SCHEMA_ADMIN}),
        ("POST", "/registry/subjects/s/versions/", {Scope.SCHEMA_ADMIN}),
        ("POST", "/registry/compatibility/subjects/s/versions", set()),
        ("POST", "/registry/compatibility/subjects/s/versions/latest", set()),
        ("PUT", "/registry/config", {Scope.SCHEMA_ADMIN}),
        ("DELETE", "/registry/subjects/s", {Scope.SCHEMA_ADMIN}),
        ("GET", "/no/such/path", set()),  # unknown paths are not public
        ("GET", "/healthz/", set()),
    ],
)
def test_required_scopes(method: str, path: str, needed: set[Scope] | None) -> None:
    assert required_scopes(method, path) == (None if needed is None else frozenset(needed))


@pytest.mark.parametrize(
    "name", ["", "a.b", "a*", ">", "x" * 65, "ROUTES", "dlq", "a b", "_", "acme\n"]
)
def test_invalid_tenant_names(name: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        valid_tenant(name)


def test_new_key_command_makes_a_working_auth_entry() -> None:
    from typer.testing import CliRunner

    from broker.cli import app

    result = CliRunner().invoke(
        app,
        [
            "auth",
            "new-key",
            "--id",
            "ops",
            "--tenant",
            "shop",
            "--tenant",
            "billing",
            "--scope",
            "consume",
            "--scope",
            "registry:admin",
        ],
    )
    assert result.exit_code == 0, result.output
    key = result.stderr.split("API key (shown once): ", 1)[1].strip()
    auth = authenticator("api_keys:\n" + result.stdout)
    principal = auth.authenticate({"x-api-key": key})
    assert principal.tenants == ("shop", "billing")
    assert principal.scopes == {Scope.CONSUME, Scope.REGISTRY_ADMIN}
    assert key not in result.stdout  # only its digest goes in the file
    refused = CliRunner().invoke(
        app, ["auth", "new-key", "--id", "x", "--tenant", "a", "--scope", "root"]
    )
    assert refused.exit_code == 2


@pytest.mark.parametrize(
    "key_id",
    ["yes", "123", "null", "a: b", "#ops", "- x", "[x]", 'q"uote', "tab\tand\\", "ü" * 128],
)
def test_new_key_entry_keeps_any_id_as_the_string_it_was(key_id: str) -> None:
    """The entry is YAML appended to a file: an id YAML would read as a bool, a number, a
    mapping or a comment must come back as the same string, or the file must not break."""
    from typer.testing import CliRunner

    from broker.cli import app

    args = ["auth", "new-key", "--id", key_id, "--tenant", "shop", "--scope", "publish"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    key = result.stderr.split("API key (shown once): ", 1)[1].strip()
    principal = authenticator("api_keys:\n" + result.stdout).authenticate({"x-api-key": key})
    assert principal.name == key_id


@pytest.mark.parametrize("key_id", ["", "x" * 129])
def test_new_key_refuses_an_id_the_auth_file_would_refuse(key_id: str) -> None:
    from typer.testing import CliRunner

    from broker.cli import app

    args = ["auth", "new-key", "--id", key_id, "--tenant", "shop", "--scope", "publish"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--id" in result.output
    assert "API key" not in result.output
