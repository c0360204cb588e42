"""What one ingress process holds: settings, the publisher, cached readiness, build info."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import broker
from broker.auth import current_tenant
from broker.envelope import Tenant
from broker.http.readiness import ReadinessCheck
from broker.publisher import Publisher
from broker.registry.schemas.decoders import Decoders
from broker.registry.schemas.service import SchemaRegistry
from broker.registry.snapshot import RebuiltRegistries, RegistryView
from broker.settings import Settings

if TYPE_CHECKING:
    from broker.http.route import RouteWaiters


@lru_cache(maxsize=1)
def git_revision() -> str:
    """``BROKER_GIT_REVISION``, else the revision of the checkout the ``broker`` package is
    run from, else ``unknown``. Only a checkout whose top level holds the package counts:
    an installed package inside some other repository (a virtualenv in an application's
    tree) would otherwise report that application's commit."""
    import os

    if rev := os.environ.get("BROKER_GIT_REVISION"):
        return rev
    source = Path(broker.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--show-toplevel", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != source:
        return "unknown"
    return lines[1]


@dataclass
class IngressState:
    settings: Settings
    publisher: Publisher
    registry: RegistryView = field(default_factory=RegistryView)
    #: Registries rebuilt for ``GET /v1/agents?as_of=``, kept for the list's next pages.
    rebuilt: RebuiltRegistries = field(default_factory=RebuiltRegistries)
    schemas: SchemaRegistry = field(init=False)
    decoders: Decoders = field(init=False)
    route_waiters: RouteWaiters = field(init=False)
    readiness: ReadinessCheck = field(init=False)

    def __post_init__(self) -> None:
        self.schemas = SchemaRegistry(self.publisher)
        self.decoders = Decoders(self.schemas)
        from broker.http.route import RouteWaiters

        self.route_waiters = RouteWaiters(self.publisher)
        self.readiness = ReadinessCheck(self.publisher, self.registry)

    @property
    def tenant(self) -> Tenant:
        """The tenant of the request being served (bound by the ingress after auth)."""
        return current_tenant()
