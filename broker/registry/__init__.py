"""Agent registry: manifests, commands to events, copy-on-write snapshots."""

from broker.registry.a2a import manifest_from_agent_card
from broker.registry.commands import CommandResult, VersionConflict, delete_agent, put_agent
from broker.registry.events import RegistryEvent, RegistryEventType
from broker.registry.manifest import AgentManifest, ManifestInvalid, parse_manifest
from broker.registry.snapshot import AgentRecord, RegistrySnapshot, RegistryView, fold

__all__ = [
    "AgentManifest",
    "AgentRecord",
    "CommandResult",
    "ManifestInvalid",
    "RegistryEvent",
    "RegistryEventType",
    "RegistrySnapshot",
    "RegistryView",
    "VersionConflict",
    "delete_agent",
    "fold",
    "manifest_from_agent_card",
    "parse_manifest",
    "put_agent",
]
