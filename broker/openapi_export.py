"""Write the ingress OpenAPI document to ``schemas/openapi.json``.

Run ``python -m broker.openapi_export`` after changing the HTTP API.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document the ingress serves at ``/openapi.json``."""
    from broker.http.app import BrokerApp
    from broker.settings import Settings

    return BrokerApp(Settings()).meta.openapi()


def render() -> bytes:
    return (
        orjson.dumps(openapi_document(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m broker.openapi_export",
        description="Write the ingress OpenAPI document (what /openapi.json serves).",
    )
    parser.add_argument(
        "target", nargs="?", type=Path, default=SCHEMA_PATH, help=f"default: {SCHEMA_PATH}"
    )
    target: Path = parser.parse_args().target
    target.write_bytes(render())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
