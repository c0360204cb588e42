"""An event-sourced agent broker on NATS JetStream."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agent-broker")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
