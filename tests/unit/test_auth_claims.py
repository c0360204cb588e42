"""How a JWT's claims become a principal: the scopes an identity provider adds beside the
broker's, and a tenant claim given as a string or as a list."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from broker.auth import AuthConfigError, Authenticator, Principal, Scope, load_config
from broker.envelope import Tenant
from broker.errors import Forbidden, Unauthenticated
from broker.settings import Settings

pytestmark = pytest.mark.unit

SECRET = "c" * 40
CONFIG = "jwt:\n  algorithms: [HS256]\n  secret_env: CLAIMS_TEST_JWT_SECRET"


@pytest.fixture
def auth(monkeypatch: pytest.MonkeyPatch) -> Authenticator:
    monkeypatch.setenv("CLAIMS_TEST_JWT_SECRET", SECRET)
    return Authenticator.from_settings(Settings(auth_config=CONFIG))


def bearer(claims: dict[str, Any]) -> dict[str, str]:
    token = jwt.encode({"exp": int(time.time()) + 60, **claims}, SECRET, algorithm="HS256")
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "scope",
    ["openid profile publish", ["openid", "publish", "email"], "publish offline_access"],
)
def test_scopes_the_broker_does_not_know_are_ignored(auth: Authenticator, scope: Any) -> None:
    """An identity provider's own scopes used to refuse the whole token (401 unknown scope)."""
    principal = auth.authenticate(bearer({"sub": "svc", "tenant": "shop", "scope": scope}))
    assert principal == Principal("svc", (Tenant("shop"),), frozenset({Scope.PUBLISH}))


@pytest.mark.parametrize("claims", [{"scope": "openid profile"}, {"scope": ["email"]}, {}])
def test_a_token_with_no_known_scope_is_valid_but_grants_no_scope(
    auth: Authenticator, claims: dict[str, Any]
) -> None:
    """Left with no scope the broker knows, a token is what a token without a scope claim
    is: a caller of its tenant that holds no scope, refused (403) whatever needs one."""
    principal = auth.authenticate(bearer({"tenant": "shop", **claims}))
    assert (principal.tenants, principal.scopes) == ((Tenant("shop"),), frozenset())
    principal.require(frozenset())  # what any caller may do (reading agents, schemas)
    with pytest.raises(Forbidden, match="lacks the scope publish"):
        principal.require(frozenset({Scope.PUBLISH}))


def test_an_unknown_scope_in_the_auth_file_is_still_refused_at_start() -> None:
    """API keys are configuration: a scope the broker does not know there is a typo."""
    text = (
        "api_keys:\n  - id: k\n    sha256: " + "ab" * 32 + "\n    tenant: a\n    scopes: [openid]"
    )
    with pytest.raises(AuthConfigError, match="unknown scope 'openid'"):
        load_config(Settings(auth_config=text))


def test_a_string_tenant_claim_is_one_tenant(auth: Authenticator) -> None:
    """``tenant: "acme corp"`` used to be split like a scope string and grant ``acme`` and
    ``corp``; as one tenant it is no valid name, and the token is refused with a clear 401."""
    with pytest.raises(Unauthenticated, match="invalid token: tenant 'acme corp' must be 1-64"):
        auth.authenticate(bearer({"tenant": "acme corp", "scope": "publish"}))
    principal = auth.authenticate(bearer({"tenant": "acme", "scope": "publish"}))
    assert principal.tenants == (Tenant("acme"),)


def test_a_list_tenant_claim_is_several_tenants_the_first_the_default(
    auth: Authenticator,
) -> None:
    principal = auth.authenticate(bearer({"tenant": ["acme", "corp"], "scope": "publish"}))
    assert principal.tenants == (Tenant("acme"), Tenant("corp"))
    assert (principal.tenant(), principal.tenant("corp")) == ("acme", "corp")
    with pytest.raises(Unauthenticated, match="must be 1-64"):
        auth.authenticate(bearer({"tenant": ["acme", "acme corp"], "scope": "publish"}))


@pytest.mark.parametrize("tenant", ["", [], 7, {"name": "acme"}])
def test_a_tenant_claim_naming_no_tenant_is_refused(auth: Authenticator, tenant: Any) -> None:
    with pytest.raises(Unauthenticated, match="no 'tenant' claim"):
        auth.authenticate(bearer({"tenant": tenant, "scope": "publish"}))
