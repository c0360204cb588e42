"""Write the ingress OpenAPI document to ``schemas/openapi.json``.

Run ``python -m broker.openapi_export`` after changing the HTTP API.
"""

from __future__ import annotations

import sys
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
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_PATH
    target.write_bytes(render())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
