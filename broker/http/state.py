"""What one ingress process holds: settings, the publisher, cached readiness, build info."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import broker
from broker.auth import current_tenant
from broker.envelope import Tenant
from broker.publisher import Publisher
from broker.registry.schemas.decoders import Decoders
from broker.registry.schemas.service import SchemaRegistry
from broker.registry.snapshot import RegistryView
from broker.settings import Settings
from broker.streams import missing_streams

if TYPE_CHECKING:
    from broker.http.route import RouteWaiters

_READY_CACHE_SECONDS = 1.0


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The git revision of the source tree, ``BROKER_GIT_REVISION``, or ``unknown``."""
    import os

    if rev := os.environ.get("BROKER_GIT_REVISION"):
        return rev
    source = Path(broker.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


@dataclass
class Readiness:
    ready: bool
    nats_connected: bool
    missing_streams: list[str] = field(default_factory=list)
    registry_ready: bool = False


@dataclass
class IngressState:
    settings: Settings
    publisher: Publisher
    registry: RegistryView = field(default_factory=RegistryView)
    schemas: SchemaRegistry = field(init=False)
    decoders: Decoders = field(init=False)
    route_waiters: RouteWaiters = field(init=False)
    _ready_at: float = 0.0
    _ready: Readiness | None = None

    def __post_init__(self) -> None:
        self.schemas = SchemaRegistry(self.publisher)
        self.decoders = Decoders(self.schemas)
        from broker.http.route import RouteWaiters

        self.route_waiters = RouteWaiters(self.publisher)

    @property
    def tenant(self) -> Tenant:
        """The tenant of the request being served (bound by the ingress after auth)."""
        return current_tenant()

    async def readiness(self) -> Readiness:
        """NATS connected and every broker stream present (cached for a second)."""
        now = time.monotonic()
        if self._ready is not None and now - self._ready_at < _READY_CACHE_SECONDS:
            return self._ready
        if not self.publisher.connected:
            result = Readiness(ready=False, nats_connected=False)
        else:
            try:
                missing = await missing_streams(self.publisher.js)
            except Exception:  # a NATS error here means not ready, whatever it is
                result = Readiness(ready=False, nats_connected=self.publisher.connected)
            else:
                registry_ready = self.registry.ready
                result = Readiness(
                    ready=not missing and registry_ready,
                    nats_connected=True,
                    missing_streams=missing,
                    registry_ready=registry_ready,
                )
        self._ready, self._ready_at = result, now
        return result
