"""Listing a stream's consumers, every page of them.

nats-server answers ``CONSUMER.LIST`` in pages of 256 (its API list limit), sorted by name.
nats-py's ``consumers_info`` reads one page and drops the reply's ``total``, so a caller
cannot tell that more follow: past 256 agents' inboxes (``agent-…``) the projections'
(``proj_…``) and routers' consumers would never be seen. :func:`list_consumers` reads them
all, up to a bound, and says how many it left out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.js.errors import APIError, NotFoundError

from broker.envelope import read_number

#: Pages read at most by default: 3,616 consumers, the pages overlapping; a page is about
#: 160 KB of JSON.
MAX_PAGES = 16
#: Consumers each page of the list repeats from the page before (see :func:`list_consumers`).
_PAGE_OVERLAP = 32


@dataclass(frozen=True, slots=True)
class _Page:
    total: int
    limit: int
    consumers: list[dict[str, Any]]


async def _page(nc: NatsClient, stream: str, offset: int, timeout: float) -> _Page:
    """One page of ``CONSUMER.LIST``, asked for as such (the reply's ``total`` kept)."""
    reply = await nc.request(
        f"$JS.API.CONSUMER.LIST.{stream}", orjson.dumps({"offset": offset}), timeout=timeout
    )
    body = orjson.loads(reply.data)
    if not isinstance(body, dict):
        raise APIError(description=f"consumer list of {stream} is not a JSON object")
    error = body.get("error")
    if isinstance(error, dict):
        kind = NotFoundError if error.get("code") == 404 else APIError
        description = error.get("description")
        raise kind(
            code=read_number(error.get("code")),
            err_code=read_number(error.get("err_code")),
            description=description if isinstance(description, str) else None,
        )
    listed = body.get("consumers")
    consumers = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
    return _Page(
        total=read_number(body.get("total")) or 0,
        limit=read_number(body.get("limit")) or len(consumers),
        consumers=consumers,
    )


async def list_consumers(
    nc: NatsClient, stream: str, *, timeout: float = 5.0, max_pages: int = MAX_PAGES
) -> tuple[list[dict[str, Any]], int]:
    """Every consumer of ``stream`` (the server's JSON, one dict each) up to ``max_pages``
    pages, and how many past them were left out. The first page tells how many there are;
    the others are asked for at once, each overlapping the one before by
    :data:`_PAGE_OVERLAP`: a consumer deleted meanwhile (a read ending) shifts those after it
    back, and without the overlap the one that moved onto the page before would be missed.
    ``NotFoundError`` when the stream does not exist."""
    first = await _page(nc, stream, 0, timeout)
    size = first.limit
    if size <= 0 or first.total <= len(first.consumers):
        return first.consumers, 0
    step = size - _PAGE_OVERLAP if size > 2 * _PAGE_OVERLAP else size
    offsets = [step * k for k in range(1, max_pages) if step * k < first.total]
    rest = await asyncio.gather(*(_page(nc, stream, offset, timeout) for offset in offsets))
    by_name = {str(c.get("name")): c for page in (first, *rest) for c in page.consumers}
    total = max(page.total for page in (first, *rest))
    return list(by_name.values()), max(0, total - (offsets[-1] if offsets else 0) - size)
