"""All configuration in one place: a ``pydantic-settings`` class read from ``BROKER_*``.

`broker serve` turns its command-line options into these environment variables before
granian starts its workers, so every worker process reads the same settings.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
#: The longest duration NATS takes (a Go ``time.Duration``: int64 nanoseconds, 292 years):
#: the bound of the settings that become a stream's or a bucket's age, TTL or window.
MAX_NATS_SECONDS = float((2**63 - 1) // 1_000_000_000)


#: What ``BROKER_ROUTING_EMBEDDER`` / ``--routing-embedder`` takes (the settings' and CLIs' help).
EMBEDDER_HELP = (
    "`minilm` (default), `static+hashing`, `static`, `hashing`, `use-multilingual` or "
    "`sentence-transformers:/path/to/model` (`…#<prompt name>`: with one of the model's own "
    "prompts); several joined by `|` blend."
)


class Settings(BaseSettings):
    """Broker settings; every field can be set as ``BROKER_<FIELD>`` in the environment."""

    # No inf or nan in any float setting: every one is a count of seconds that must end (an
    # infinite max age failed at provisioning with an OverflowError and a traceback).
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore", allow_inf_nan=False)

    # --- NATS -----------------------------------------------------------------------
    nats_url: str | None = Field(
        default=None,
        description="NATS URL(s), comma-separated. Unset: start an embedded server.",
    )
    nats_port: int = Field(default=0, ge=0, le=65535, description="Embedded server port; 0 = free.")
    data_dir: Path = Field(default=Path(".broker"), description="Embedded server storage.")
    nats_connect_timeout: float = Field(default=5.0, gt=0)
    publish_timeout: float = Field(default=5.0, gt=0, description="Seconds to wait for a PubAck.")
    nats_tls_ca: Path | None = Field(
        default=None, description="CA bundle that signs the NATS servers' certificates (TLS)."
    )
    nats_tls_cert: Path | None = Field(
        default=None, description="Client certificate for NATS servers that verify clients."
    )
    nats_tls_key: Path | None = Field(default=None, description="Key of nats_tls_cert.")
    nats_creds: Path | None = Field(
        default=None, description="NATS credentials file (JWT + NKey seed) for decentralised auth."
    )
    nats_user: str | None = Field(default=None, description="NATS user (with nats_password).")
    nats_password: SecretStr | None = Field(default=None, description="NATS password.")
    nats_token: SecretStr | None = Field(default=None, description="NATS token authentication.")

    # --- streams --------------------------------------------------------------------
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # Each agent's inbox is a durable consumer of ROUTES, and each replay, projection
    # partition set and router one of MESSAGES; nats-server 2.15 caps a stream that sets no
    # limit at 1,000 consumers (its ``default_max_consumers``).
    stream_max_consumers: int = Field(
        default=100_000, ge=1, description="Consumers one broker stream may have."
    )
    duplicate_window_seconds: float = Field(default=120.0, gt=0, le=MAX_NATS_SECONDS)
    messages_max_age_seconds: float = Field(
        default=0.0, ge=0, le=MAX_NATS_SECONDS, description="0 keeps messages forever."
    )
    messages_max_bytes: int = Field(default=-1, ge=-1, description="-1 = unlimited.")
    # ROUTES and DLQ store another copy of each routed (or dead-lettered) payload; unset,
    # they follow MESSAGES' limits, so bounding MESSAGES bounds every copy.
    routes_max_age_seconds: float | None = Field(
        default=None,
        ge=0,
        le=MAX_NATS_SECONDS,
        description="Unset: as messages_max_age_seconds; 0 keeps forever.",
    )
    routes_max_bytes: int | None = Field(
        default=None, ge=-1, description="Unset: as messages_max_bytes; -1 = unlimited."
    )
    dlq_max_age_seconds: float | None = Field(
        default=None,
        ge=0,
        le=MAX_NATS_SECONDS,
        description="Unset: as messages_max_age_seconds; 0 keeps forever.",
    )
    dlq_max_bytes: int | None = Field(
        default=None, ge=-1, description="Unset: as messages_max_bytes; -1 = unlimited."
    )
    agent_load_ttl_seconds: float = Field(default=15.0, gt=0, le=MAX_NATS_SECONDS)
    stop_deadline_seconds: float = Field(
        default=25.0,
        gt=0,
        le=3600,
        description="A router or projection worker still running this long after SIGTERM or "
        "SIGINT exits with code 1, its tasks and threads' stacks on stderr.",
    )

    # --- projections ----------------------------------------------------------------
    projection_workers: int = Field(
        default=1, ge=0, le=64, description="`broker worker` processes `broker serve` runs."
    )
    replica_url: str | None = Field(
        default=None,
        description="SQL replica: sqlite:///PATH or postgresql://… (default SQLite in data_dir).",
    )

    # --- routing --------------------------------------------------------------------
    routers: int = Field(
        default=1, ge=0, le=64, description="`broker router` processes `broker serve` runs."
    )
    routing_policy: Path | None = Field(
        default=None, description="Routing policy YAML (default: the built-in policy)."
    )
    routing_embedder: str | None = Field(
        default=None,
        description=EMBEDDER_HELP,
    )
    route_decision_timeout: float = Field(
        default=5.0, gt=0, description="How long POST /v1/route waits for the decision."
    )
    route_max_wait: float = Field(
        default=300.0,
        gt=0,
        description="Largest `timeout` POST /v1/route?wait=true accepts (with an "
        "Idempotency-Key: at most duplicate_window_seconds less 1 s).",
    )

    # --- telemetry ------------------------------------------------------------------
    tracing: bool = Field(
        default=False,
        description="Record traces (OTLP, OTEL_* variables); also on when "
        "OTEL_TRACES_EXPORTER names an exporter.",
    )
    metrics: bool = Field(default=True, description="Record Prometheus metrics (/metrics).")
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="`broker worker` / `broker router` started on their own: serve their "
        "/metrics on this port (0: off).",
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address metrics_port binds.")
    metrics_token: SecretStr | None = Field(
        default=None,
        description="When set, /metrics (the ingress's and metrics_port's) answers only "
        "`Authorization: Bearer <token>` (else 401): its labels name tenants and agents.",
    )
    trace_url: str | None = Field(
        default=None,
        description="Trace viewer link for /ui, with {trace_id}: "
        "e.g. http://localhost:16686/trace/{trace_id}.",
    )

    # --- HTTP ingress ---------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    tls_cert: Path | None = Field(default=None, description="Ingress TLS certificate (PEM).")
    tls_key: Path | None = Field(default=None, description="Key of tls_cert (PEM).")
    tls_client_ca: Path | None = Field(
        default=None,
        description="mTLS: require a client certificate signed by this CA (PEM bundle).",
    )
    tls_crl: str | None = Field(
        default=None,
        description="mTLS: revocation lists (PEM, one CRL per file) of the client CAs, "
        "comma-separated files.",
    )
    tenant: str = Field(
        default="default", description="The tenant of every request when no auth is configured."
    )
    auth_file: Path | None = Field(
        default=None,
        description="API keys and JWT settings (YAML); set, every /v1 request must authenticate.",
    )
    auth_config: str | None = Field(
        default=None, description="The same document as auth_file, inline (YAML or JSON)."
    )
    detect_card_numbers: bool = Field(
        default=False,
        description="Find payment card numbers (Luhn-checked) in JSON and text payloads: "
        "redact them in replicas and logs, and record an audit event.",
    )
    max_message_bytes: int = Field(default=1 * MIB, gt=0, description="Largest single payload.")
    max_batch_bytes: int = Field(default=16 * MIB, gt=0, description="Largest batch request body.")
    max_batch_records: int = Field(default=10_000, gt=0)
    max_api_body_bytes: int = Field(
        default=1 * MIB, gt=0, description="Largest body of the other APIs (registry, …)."
    )
    max_header_list_bytes: int = Field(default=64 * 1024, gt=1024)
    max_concurrent_streams: int = Field(default=256, gt=0)
    body_read_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a request body may take to arrive whole (408)."
    )
    stream_idle_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a streaming publish (NDJSON in and out) may send nothing before "
        "it is ended with a `request_timeout` line.",
    )
    retry_after_seconds: int = Field(default=2, ge=1, description="Retry-After on 503.")

    @property
    def tls_crl_files(self) -> list[Path]:
        """``tls_crl``'s files (comma-separated), in order."""
        return [Path(part.strip()) for part in (self.tls_crl or "").split(",") if part.strip()]

    @field_validator("metrics_token")
    @classmethod
    def _a_real_token(cls, token: SecretStr | None) -> SecretStr | None:
        """An empty token (a secret that did not reach the environment) would open
        ``/metrics`` to a bare ``Bearer``: refused, as is one padded with spaces, which no
        ``Authorization`` header could carry."""
        if token is None:
            return None
        value = token.get_secret_value()
        if not value.strip():
            raise ValueError("BROKER_METRICS_TOKEN is empty; unset it to leave /metrics open")
        if any(c.isspace() for c in value):
            raise ValueError("BROKER_METRICS_TOKEN must not contain spaces")
        return token

    @model_validator(mode="after")
    def _windows_within_max_ages(self) -> Settings:
        """JetStream refuses a stream whose duplicate window is longer than its max age
        (error 10052, naming no setting): said at start, by the settings' names."""
        window = self.duplicate_window_seconds
        ages = {
            "messages_max_age_seconds": self.messages_max_age_seconds,
            "routes_max_age_seconds": self.routes_limits[0],
            "dlq_max_age_seconds": self.dlq_limits[0],
        }
        for name, age in ages.items():
            if 0 < age < window:
                raise ValueError(
                    f"{name} ({age:g} s) is shorter than duplicate_window_seconds ({window:g} "
                    "s): JetStream refuses a stream that remembers message ids longer than it "
                    "keeps messages; raise the max age or lower the duplicate window"
                )
        return self

    @property
    def routes_limits(self) -> tuple[float, int]:
        """``ROUTES``' max age and max bytes: its own, or where unset ``MESSAGES``'."""
        return _or(self.routes_max_age_seconds, self.messages_max_age_seconds), _or(
            self.routes_max_bytes, self.messages_max_bytes
        )

    @property
    def dlq_limits(self) -> tuple[float, int]:
        """``DLQ``'s max age and max bytes: its own, or where unset ``MESSAGES``'."""
        return _or(self.dlq_max_age_seconds, self.messages_max_age_seconds), _or(
            self.dlq_max_bytes, self.messages_max_bytes
        )

    @property
    def auth_configured(self) -> bool:
        """An auth document is set (file or inline): requests must authenticate."""
        return self.auth_file is not None or self.auth_config is not None


_T = TypeVar("_T")


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
