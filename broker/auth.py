"""Who is calling, for which tenant, allowed to do what.

With no auth configured the ingress is open: every request acts for ``BROKER_TENANT`` with
every scope (one developer, one laptop). With ``BROKER_AUTH_FILE`` (or the same document
inline in ``BROKER_AUTH_CONFIG``) every ``/v1`` and ``/registry`` request must present an API
key or a JWT bearer token, which binds it to a tenant and a set of scopes::

    api_keys:
      - id: shop-publisher        # what logs show; the key itself never appears anywhere
        sha256: 9f86d081884c7d65…  # hex SHA-256 of the key (or key_env: NAME_OF_VARIABLE)
        tenant: shop              # or tenants: [shop, shop-staging]; the first is the default
        scopes: [publish, consume]
    jwt:
      algorithms: [RS256]         # or HS256 with secret_env
      public_key_file: /etc/broker/jwt.pub
      issuer: https://auth.example.com/
      audience: agent-broker
      tenant_claim: tenant        # a string is one tenant; a list, several (first: default)
      scope_claim: scope          # space-separated string (OAuth) or a list; unknown ignored

Credentials travel as ``Authorization: Bearer <key or JWT>``, ``X-API-Key: <key>``, or HTTP
Basic with the key as the password (what Confluent serializers send to a schema registry).
A request may name its tenant with ``Broker-Tenant``; a tenant the principal does not hold is
``403 tenant_forbidden``, whatever the rest of the request says. Everything a request reads
or writes is then under that tenant's subjects (``msg.<tenant>.…``, ``reg.<tenant>.…``), so
the tenant is never taken from a subject, a body or a path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import jwt
import yaml
from jwt.algorithms import get_default_algorithms
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.envelope import TOKEN, Tenant
from broker.errors import BrokerError, Forbidden, TenantForbidden, Unauthenticated
from broker.settings import Settings
from broker.streams import NO_TENANT, Stream


class Scope(StrEnum):
    """What a principal may do within its tenants."""

    PUBLISH = "publish"  # POST /v1/publish, /v1/route
    CONSUME = "consume"  # replay any stream of the tenant, status
    REGISTRY_ADMIN = "registry:admin"  # register, update and remove agents
    SCHEMA_ADMIN = "schema:admin"  # register and delete schemas, change compatibility


ALL_SCOPES = frozenset(Scope)

#: The request header that picks one of a principal's tenants.
TENANT_HEADER = "broker-tenant"

#: Tenants are one NATS subject token; the names of the streams are reserved, because the
#: DLQ keeps projections' dead letters under ``dlq.<STREAM>.…`` beside ``dlq.<tenant>.route``,
#: and so is ``_``, the token of audit events that belong to no tenant (``audit._.…``).
_RESERVED = frozenset({*(s.value.lower() for s in Stream), NO_TENANT})


class AuthConfigError(ValueError):
    """The auth document is wrong; raised at start-up, never per request."""


def valid_tenant(name: str) -> str:
    """``name`` if it can be a tenant, else :class:`ValueError`."""
    if not TOKEN.fullmatch(name):  # a subject token (``$`` also matched before a newline)
        raise ValueError(f"tenant {name!r} must be 1-64 of A-Z a-z 0-9 _ -")
    if name.lower() in _RESERVED:
        raise ValueError(f"tenant {name!r} is reserved (a stream's name, or _)")
    return name


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a name for logs, its tenants (the first is the default), scopes."""

    name: str
    tenants: tuple[Tenant, ...]
    scopes: frozenset[Scope]

    def tenant(self, requested: str | None = None) -> Tenant:
        """The tenant a request acts for: ``requested`` (``Broker-Tenant``) or the default."""
        if requested is None or requested == "":
            return self.tenants[0]
        for tenant in self.tenants:
            if tenant == requested:
                return tenant
        raise TenantForbidden(f"{self.name!r} may not act for tenant {requested[:64]!r}")

    def require(self, needed: frozenset[Scope]) -> None:
        """Pass when the principal holds any of ``needed`` (an empty set: any principal)."""
        if needed and not (needed & self.scopes):
            wanted = " or ".join(sorted(needed))
            raise Forbidden(f"{self.name!r} lacks the scope {wanted}")


# --- the configuration document --------------------------------------------------------


def _scopes(values: Iterable[str]) -> frozenset[Scope]:
    """The scopes an auth file names; one it does not know is a mistake in the file."""
    found: set[Scope] = set()
    for value in values:
        try:
            found.add(Scope(value))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {value!r} (known: {known})") from None
    return frozenset(found)


class _Tenanted(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str | None = None
    tenants: list[str] | None = None

    def tenant_list(self) -> tuple[Tenant, ...]:
        names = [self.tenant] if self.tenant is not None else list(self.tenants or [])
        if not names:  # a principal without a tenant could act for none: refused at start
            raise ValueError("tenants: give at least one tenant")
        return tuple(Tenant(valid_tenant(n)) for n in names)


class ApiKeyConfig(_Tenanted):
    id: str = Field(min_length=1, max_length=128)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    key_env: str | None = None
    scopes: list[str]

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.sha256 is None) == (self.key_env is None):
            raise ValueError(f"api key {self.id!r}: give exactly one of sha256 and key_env")
        if (self.tenant is None) == (self.tenants is None):
            raise ValueError(f"api key {self.id!r}: give exactly one of tenant and tenants")
        self.tenant_list()
        _scopes(self.scopes)
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key_env is not None
        value = os.environ.get(self.key_env)
        if not value:
            raise AuthConfigError(f"api key {self.id!r}: ${self.key_env} is not set")
        return hashlib.sha256(value.encode()).digest()


class JwtConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithms: list[str] = Field(min_length=1)
    secret_env: str | None = None
    public_key_file: Path | None = None
    issuer: str | None = None
    audience: str | None = None
    tenant_claim: str = "tenant"
    scope_claim: str = "scope"
    leeway_seconds: float = Field(default=30.0, ge=0, le=600)

    @model_validator(mode="after")
    def _one_key(self) -> JwtConfig:
        if (self.secret_env is None) == (self.public_key_file is None):
            raise ValueError("jwt: give exactly one of secret_env and public_key_file")
        hmac_algs = {a for a in self.algorithms if a.startswith("HS")}
        if self.secret_env is not None and hmac_algs != set(self.algorithms):
            raise ValueError("jwt: secret_env goes with HS256/HS384/HS512 only")
        if self.public_key_file is not None and hmac_algs:
            raise ValueError("jwt: a public key cannot verify HS* tokens; use secret_env")
        return self


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    jwt: JwtConfig | None = None

    @model_validator(mode="after")
    def _something(self) -> AuthConfig:
        if not self.api_keys and self.jwt is None:
            raise ValueError("auth config has neither api_keys nor jwt")
        ids = [k.id for k in self.api_keys]
        if len(ids) != len(set(ids)):
            raise ValueError("api key ids must be unique")
        return self


def load_config(settings: Settings) -> AuthConfig | None:
    """The auth document the settings name, or ``None`` (open ingress)."""
    if settings.auth_file is not None and settings.auth_config is not None:
        raise AuthConfigError("set BROKER_AUTH_FILE or BROKER_AUTH_CONFIG, not both")
    if settings.auth_file is not None:
        try:
            text = settings.auth_file.read_text()
        except OSError as e:
            raise AuthConfigError(f"cannot read auth file {settings.auth_file}: {e}") from e
    elif settings.auth_config is not None:
        text = settings.auth_config
    else:
        return None
    try:
        document = yaml.safe_load(text)
        return AuthConfig.model_validate(document)
    except yaml.YAMLError as e:
        raise AuthConfigError(f"auth config is not YAML: {e}") from e
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}"
            for err in e.errors()
        )
        raise AuthConfigError(f"auth config: {problems}") from e


# --- authenticating a request ----------------------------------------------------------


class HeaderLookup(Protocol):
    """A request's headers by lower-case name (granian's ``Headers``, a ``dict``)."""

    def get(self, key: str, default: Any = None) -> Any: ...


_JWT_CACHE_SIZE = 4096


class Authenticator:
    """Turns a request's headers into a :class:`Principal` (or raises 401)."""

    def __init__(self, config: AuthConfig | None, *, default_tenant: str) -> None:
        self.enabled = config is not None
        try:
            default = Tenant(valid_tenant(default_tenant))
        except ValueError as e:  # a setting, refused at start like the auth document
            raise AuthConfigError(f"BROKER_TENANT: {e}") from None
        self._open = Principal("anonymous", (default,), ALL_SCOPES)
        self._keys: dict[bytes, Principal] = {}
        self._jwt: JwtConfig | None = None
        self._jwt_key: Any = None
        self._jwt_cache: dict[str, tuple[Principal, float]] = {}
        if config is None:
            return
        for key in config.api_keys:
            principal = Principal(key.id, key.tenant_list(), _scopes(key.scopes))
            digest = key.digest()
            if digest in self._keys:
                raise AuthConfigError(f"api key {key.id!r} has the same key as another")
            self._keys[digest] = principal
        if config.jwt is not None:
            self._jwt = config.jwt
            self._jwt_key = _jwt_key(config.jwt)
            _check_algorithms(config.jwt, self._jwt_key)

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        return cls(load_config(settings), default_tenant=settings.tenant)

    def authenticate(self, headers: HeaderLookup) -> Principal:
        """The caller of a request with these (lower-case) headers."""
        if not self.enabled:
            return self._open
        if (api_key := headers.get("x-api-key")) is not None:
            return self._api_key(api_key)
        authorization = headers.get("authorization")
        if not authorization:
            raise Unauthenticated("this broker requires an API key or a bearer token")
        kind, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        kind = kind.lower()
        if kind == "bearer" and credential:
            if credential.count(".") == 2 and self._jwt is not None:
                return self._bearer_key_or_jwt(credential)
            return self._api_key(credential)
        if kind == "basic" and credential:
            return self._api_key(_basic_password(credential))
        raise Unauthenticated("Authorization must be 'Bearer <token>' or 'Basic <credentials>'")

    def _api_key(self, key: str) -> Principal:
        principal = self._key_principal(key)
        if principal is None:
            raise Unauthenticated("unknown API key")
        return principal

    def _key_principal(self, key: str) -> Principal | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        # The dict lookup compares digests, not keys: its timing tells nothing of a key.
        return self._keys.get(digest)

    def _bearer_key_or_jwt(self, credential: str) -> Principal:
        """A bearer value shaped like a JWT (two dots) that is a configured API key is that
        key, as it is in ``X-API-Key``; any other goes to JWT verification, whose answer
        (and 401 message) it gets. Every such value pays the same digest lookup first, and
        only a key's exact digest or a verified token yields a principal."""
        principal = self._key_principal(credential)
        if principal is not None:
            return principal
        return self._bearer_jwt(credential)

    def _bearer_jwt(self, token: str) -> Principal:
        now = time.time()
        cached = self._jwt_cache.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        assert self._jwt is not None
        principal, expires = self._verify_jwt(token, self._jwt)
        if len(self._jwt_cache) >= _JWT_CACHE_SIZE:
            self._jwt_cache.clear()
        self._jwt_cache[token] = (principal, expires)
        return principal

    def _verify_jwt(self, token: str, config: JwtConfig) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=config.algorithms,
                issuer=config.issuer,
                audience=config.audience,
                leeway=config.leeway_seconds,
                options={
                    "require": ["exp"],
                    "verify_aud": config.audience is not None,
                    "verify_iss": config.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        except (TypeError, ValueError):
            # What PyJWT raises for input it did not foresee (text that is not UTF-8, a key
            # its algorithm cannot use) is the token's fault too: a 401, never a 500.
            raise Unauthenticated("invalid token: it cannot be read") from None
        tenants = _tenant_claim(claims.get(config.tenant_claim))
        if not tenants:
            raise Unauthenticated(f"the token has no {config.tenant_claim!r} claim")
        try:
            tenant_tuple = tuple(Tenant(valid_tenant(t)) for t in tenants)
        except ValueError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        scopes = _granted_scopes(claims.get(config.scope_claim))
        name = str(claims.get("sub") or "jwt")[:128]
        # PyJWT took ``int(exp)`` for the expiry; one past any float (``10**400``) is a far
        # future one like any other: cached, as every token, for five minutes at most.
        expires = float(min(int(claims["exp"]), time.time() + 300.0))
        return Principal(name, tenant_tuple, scopes), expires


def _basic_password(credential: str) -> str:
    try:
        decoded = base64.b64decode(credential, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("Basic credentials are not base64 of 'user:key'") from None
    return decoded.partition(":")[2]


def _tenant_claim(value: Any) -> list[str]:
    """The tenants a token's tenant claim names: a string is one tenant, whatever it holds
    (``"acme corp"`` is refused as a tenant name, not read as ``acme`` and ``corp``); a list
    of strings is several. Anything else names none."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


def _granted_scopes(value: Any) -> frozenset[Scope]:
    """The broker's scopes among those a token's scope claim grants: a space-separated
    string (OAuth's ``scope``) or a list of strings. An identity provider puts its own
    scopes beside the broker's (``openid profile publish``): the ones the broker does not
    know grant nothing here and are left out, so they neither refuse the token nor widen it."""
    if isinstance(value, str):
        names: list[str] = value.split()
    elif isinstance(value, list):
        names = [v for v in value if isinstance(v, str)]
    else:
        names = []
    known = {s.value: s for s in Scope}
    return frozenset(known[n] for n in names if n in known)


def _jwt_key(config: JwtConfig) -> Any:
    if config.secret_env is not None:
        secret = os.environ.get(config.secret_env)
        if not secret:
            raise AuthConfigError(f"jwt: ${config.secret_env} is not set")
        if len(secret) < 32:
            raise AuthConfigError("jwt: an HMAC secret must be at least 32 characters")
        return secret.encode()
    assert config.public_key_file is not None
    try:
        pem = config.public_key_file.read_bytes()
    except OSError as e:
        raise AuthConfigError(f"jwt: cannot read {config.public_key_file}: {e}") from e
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(pem)
    except ValueError as e:
        raise AuthConfigError(f"jwt: {config.public_key_file} is not a PEM public key") from e


def _check_algorithms(config: JwtConfig, key: Any) -> None:
    """Refuse an algorithm that cannot verify with ``key`` (ES256 beside an RSA key, an EC
    key of another curve, a name PyJWT does not know): otherwise each token naming it would
    find out, a 500 or a 401 for every token instead of one refusal at start."""
    source = f"${config.secret_env}" if config.secret_env else str(config.public_key_file)
    kind = _key_kind(key)
    for name in config.algorithms:
        try:
            algorithm = jwt.get_algorithm_by_name(name)
        except NotImplementedError:
            known = ", ".join(sorted(get_default_algorithms().keys() - {"none"}))
            raise AuthConfigError(f"jwt: unknown algorithm {name!r} (known: {known})") from None
        try:
            algorithm.prepare_key(key)
        except (jwt.PyJWTError, TypeError, ValueError) as e:
            raise AuthConfigError(
                f"jwt: algorithm {name!r} cannot verify with the {kind} of {source}: {e}"
            ) from None


def _key_kind(key: Any) -> str:
    """What ``key`` is, for a message: ``RSA key``, ``EC key (secp256r1)``, ``HMAC secret``."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, bytes):
        return "HMAC secret"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC key ({key.curve.name})"
    return "key"


# --- which request needs what -----------------------------------------------------------

#: Reachable without credentials: liveness, readiness, build info, the API's description,
#: the Prometheus scrape and the status page's (static) HTML. Everything else, including
#: paths that do not exist, needs a principal: an unknown path must not answer 404 to strangers.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/version", "/openapi.json", "/docs", "/metrics", "/ui"}
)
_ANY: frozenset[Scope] = frozenset()
_PUBLISH = frozenset({Scope.PUBLISH})
_CONSUME = frozenset({Scope.CONSUME})
_REGISTRY_ADMIN = frozenset({Scope.REGISTRY_ADMIN})
_SCHEMA_ADMIN = frozenset({Scope.SCHEMA_ADMIN})


def required_scopes(method: str, path: str) -> frozenset[Scope] | None:
    """The scopes of which a request needs one (empty: any principal), or ``None``: public."""
    if path in PUBLIC_PATHS:
        return None
    if path.startswith(("/v1/publish", "/v1/route/")):
        return _PUBLISH
    if path.startswith("/v1/streams/") or path == "/v1/status":
        return _CONSUME
    reading = method in {"GET", "HEAD", "OPTIONS"}
    if path.startswith("/v1/agents"):
        return _ANY if reading else _REGISTRY_ADMIN
    if path.startswith("/registry/"):
        # Confluent's API reads with POST too: looking a schema up under a subject and
        # testing compatibility change nothing.
        looking_up = method == "POST" and not path.rstrip("/").endswith("/versions")
        checking = method == "POST" and path.startswith("/registry/compatibility/")
        return _ANY if reading or looking_up or checking else _SCHEMA_ADMIN
    return _ANY


# --- the request being served -----------------------------------------------------------

_current: ContextVar[tuple[Principal, Tenant]] = ContextVar("broker_principal")


def bind(principal: Principal, tenant: Tenant) -> None:
    """Make ``principal`` acting for ``tenant`` the caller of the request this task serves."""
    _current.set((principal, tenant))


def current_tenant() -> Tenant:
    """The tenant of the request being served; fails closed when none was bound."""
    try:
        return _current.get()[1]
    except LookupError:
        raise BrokerError("no tenant bound to this request") from None


def current_principal() -> Principal:
    try:
        return _current.get()[0]
    except LookupError:
        raise BrokerError("no principal bound to this request") from None


def key_digest(key: str) -> str:
    """The ``sha256`` value an auth file stores for ``key`` (``broker auth hash-key``)."""
    return hashlib.sha256(key.encode()).hexdigest()
