"""Credentials and auth configuration the authenticator used to crash on or misread: an
algorithm its key cannot verify, an expiry past any float, a bearer API key with two dots,
an invalid ``BROKER_TENANT``, and ``broker auth new-key`` ids beyond U+FFFF."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from typer.testing import CliRunner

from broker.auth import AuthConfigError, Authenticator, Principal, Scope
from broker.cli import app
from broker.envelope import Tenant
from broker.errors import Unauthenticated
from broker.settings import Settings

pytestmark = pytest.mark.unit

SECRET = "f" * 40
DOTTED_KEY = "ops.key.0123456789abcdef"  # an operator's key (key_env): any text, dots too
JWT_WITH_KEY = (
    "api_keys:\n  - id: dotted\n    key_env: FIXES_DOTTED_KEY\n    tenant: a\n"
    "    scopes: [publish]\n"
    "jwt:\n  algorithms: [HS256]\n  secret_env: FIXES_JWT_SECRET\n"
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIXES_DOTTED_KEY", DOTTED_KEY)
    monkeypatch.setenv("FIXES_JWT_SECRET", SECRET)


def authenticator(text: str) -> Authenticator:
    return Authenticator.from_settings(Settings(auth_config=text))


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")


def public_pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_config(algorithms: str, key_file: Path) -> str:
    return f"jwt:\n  algorithms: {algorithms}\n  public_key_file: {key_file}\n"


# --- algorithms the key cannot verify ---------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "curve", "refused"),
    [
        ("[RS256, ES256]", None, "ES256"),  # the reviewer's: ES256 tokens answered 500
        ("[ES256]", None, "ES256"),  # the only algorithm: every token answered 500
        ("[EdDSA, RS256]", None, "EdDSA"),
        ("[ES384]", ec.SECP256R1(), "ES384"),  # an EC key of another curve
        ("[RS256]", ec.SECP256R1(), "RS256"),
        ("[RS257]", None, "RS257"),  # a name PyJWT does not know
        ("[RS256, none]", None, "none"),
    ],
)
def test_an_algorithm_the_key_cannot_verify_is_refused_at_start(
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    algorithms: str,
    curve: ec.EllipticCurve | None,
    refused: str,
) -> None:
    """It used to start cleanly; a token naming that algorithm then made PyJWT raise a
    TypeError, answered 500 with a traceback to a caller with no credentials."""
    private = rsa_key if curve is None else ec.generate_private_key(curve)
    key_file = public_pem(private, tmp_path / "jwt.pub")
    with pytest.raises(AuthConfigError, match=rf"jwt: .*algorithm '{refused}'"):
        authenticator(key_config(algorithms, key_file))


def test_an_hmac_secret_that_is_a_public_key_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """PyJWT refuses such a secret for HS256 on every token (each one a 401)."""
    pem = public_pem(rsa_key, tmp_path / "jwt.pub").read_text()
    monkeypatch.setenv("FIXES_PEM_SECRET", pem)
    refusal = "algorithm 'HS256' cannot verify with the HMAC secret of \\$FIXES_PEM_SECRET"
    with pytest.raises(AuthConfigError, match=refusal):
        authenticator("jwt:\n  algorithms: [HS256]\n  secret_env: FIXES_PEM_SECRET\n")


def test_every_algorithm_that_fits_the_key_verifies_its_tokens(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    auth = authenticator(key_config("[RS256, PS256]", public_pem(rsa_key, tmp_path / "k.pub")))
    for algorithm in ("RS256", "PS256"):
        claims = {"exp": int(time.time()) + 60, "tenant": "a", "sub": algorithm}
        token = jwt.encode(claims, rsa_key, algorithm=algorithm)
        assert auth.authenticate(bearer(token)).name == algorithm
    p256 = ec.generate_private_key(ec.SECP256R1())
    auth = authenticator(key_config("[ES256]", public_pem(p256, tmp_path / "ec.pub")))
    token = jwt.encode({"exp": int(time.time()) + 60, "tenant": "a"}, p256, algorithm="ES256")
    assert auth.authenticate(bearer(token)).tenants == (Tenant("a"),)


@pytest.mark.parametrize(
    "token",
    [
        "\udcff.e30.c2ln",  # a header byte that is not UTF-8 (surrogate-escaped)
        "eyJhbGciOiJIUzI1NiJ9.e30.\udc80",
    ],
)
def test_a_token_pyjwt_cannot_read_is_401_not_a_crash(env: None, token: str) -> None:
    """PyJWT raises ValueError/TypeError for input it did not foresee; they used to escape
    ``authenticate`` (a 500 with a traceback) instead of refusing the token."""
    with pytest.raises(Unauthenticated, match="invalid token") as caught:
        authenticator(JWT_WITH_KEY).authenticate(bearer(token))
    assert caught.value.status == 401


# --- an expiry past any float -----------------------------------------------------------


def test_an_expiry_past_any_float_is_a_far_future_one(env: None) -> None:
    """``exp=10**400`` is a valid JSON integer that PyJWT accepts; turning it into a float
    raised OverflowError (500). It is a far-future expiry: the token is valid, and cached
    for five minutes as every token is."""
    auth = authenticator(JWT_WITH_KEY)
    token = hs256({"tenant": "a", "scope": "publish", "sub": "svc", "exp": 10**400})
    expected = Principal("svc", (Tenant("a"),), frozenset({Scope.PUBLISH}))
    assert auth.authenticate(bearer(token)) == expected
    assert auth.authenticate(bearer(token)) == expected  # from the cache


def test_an_infinite_expiry_is_401_not_a_crash(env: None) -> None:
    """JSON's ``Infinity`` (Python's json reads it) as ``exp``: refused by PyJWT, a 401 (a
    guard beside the ``10**400`` case, which is a valid integer)."""
    auth = authenticator(JWT_WITH_KEY)
    token = hs256({"tenant": "a", "scope": "publish", "sub": "svc", "exp": float("inf")})
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer(token))


# --- an API key with two dots as a bearer -----------------------------------------------


def test_an_api_key_with_two_dots_works_as_a_bearer_beside_jwt(env: None) -> None:
    """It used to go to JWT verification only (401 'invalid token'), while the same key
    worked in X-API-Key."""
    auth = authenticator(JWT_WITH_KEY)
    assert auth.authenticate({"x-api-key": DOTTED_KEY}).name == "dotted"
    assert auth.authenticate(bearer(DOTTED_KEY)).name == "dotted"
    assert auth.authenticate(bearer(hs256({"tenant": "b", "sub": "svc"}))).name == "svc"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (DOTTED_KEY + "x", "invalid token"),  # not the key, not a JWT
        (hs256({"tenant": "a"}, secret="x" * 40), "Signature verification failed"),
        (hs256({"tenant": "a", "exp": int(time.time()) - 3600}), "expired"),
        (jwt.encode({"tenant": "a", "exp": 2**40}, "", algorithm="none"), "invalid token"),
    ],
)
def test_a_dotted_bearer_that_is_no_key_gets_the_tokens_refusal(
    env: None, value: str, message: str
) -> None:
    """The key lookup comes first and yields a principal only for a configured key's exact
    digest: a bad, expired or unsigned token is still refused as a token."""
    with pytest.raises(Unauthenticated, match=message):
        authenticator(JWT_WITH_KEY).authenticate(bearer(value))


# --- BROKER_TENANT ----------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["messages", "DLQ", "_", "a.b", ""])
def test_an_invalid_broker_tenant_is_an_auth_config_error(tenant: str) -> None:
    """``broker serve`` refuses an AuthConfigError cleanly (exit 2); a plain ValueError
    from here was a traceback."""
    with pytest.raises(AuthConfigError, match="BROKER_TENANT: tenant"):
        Authenticator.from_settings(Settings(tenant=tenant))


# --- broker auth new-key ----------------------------------------------------------------


@pytest.mark.parametrize(
    "key_id", ["ops😀", "😀" * 128, "日本語", "line\u2028sep", "nel\x85", "bom\ufeff", "tab\t"]
)
def test_new_key_entry_round_trips_through_the_auth_file(tmp_path: Path, key_id: str) -> None:
    """JSON wrote ``ops😀`` as ``"ops\\ud83d\\ude00"``, which YAML reads as two lone
    surrogates, and ``broker serve --auth-file`` then refused the file."""
    args = ["auth", "new-key", "--id", key_id, "--tenant", "shop", "--scope", "publish"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    key = result.stderr.split("API key (shown once): ", 1)[1].strip()
    auth_file = tmp_path / "auth.yaml"
    auth_file.write_text("api_keys:\n" + result.stdout, encoding="utf-8")
    auth = Authenticator.from_settings(Settings(auth_file=auth_file))  # what serve loads
    principal = auth.authenticate({"x-api-key": key})
    assert principal == Principal(key_id, (Tenant("shop"),), frozenset({Scope.PUBLISH}))


def test_new_key_refuses_an_id_that_is_not_utf8() -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates, which no
    auth file can hold: refused before a key is made."""
    args = ["auth", "new-key", "--id", "ops\udcff", "--tenant", "shop", "--scope", "publish"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--id" in result.output
    assert "UTF-8" in result.output
    assert "API key" not in result.output
