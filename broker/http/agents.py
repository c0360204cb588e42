"""``/v1/agents``: the registry API. Handlers translate; decisions live in broker.registry."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field

from broker.errors import NotFound, PayloadTooLarge, Unprocessable
from broker.http.datetimes import EXAMPLES, parse_date_time
from broker.http.models import ErrorBody
from broker.http.state import IngressState
from broker.registry.commands import (
    IfMatch,
    agent_history,
    delete_agent,
    put_agent,
    registry_as_of,
)
from broker.registry.events import RegistryEvent
from broker.registry.manifest import AGENT_NAME_PATTERN, manifest_is_yaml, parse_manifest
from broker.registry.pages import agent_page
from broker.registry.snapshot import AgentRecord

MAX_MANIFEST_BYTES = 256 * 1024
AgentPath = Annotated[str, Path(pattern=AGENT_NAME_PATTERN, description="Agent name.")]
_IF_MATCH_HELP = (
    'The agent\'s seq in quotes, e.g. "12" (its ETag); "*" (any version, if registered); '
    "or a comma-separated list of entity tags, matched if any matches. Compared strongly "
    '(RFC 9110, section 13.1.1): a weak tag (W/"12") never matches.'
)
#: One member of an If-Match list: OWS, an entity-tag (RFC 9110, section 8.8.3) or nothing
#: (empty list members are allowed and ignored), OWS. ``W/`` is case-sensitive.
_LIST_MEMBER = re.compile(r'[ \t]*(?:(W/)?"([\x21\x23-\x7e\x80-\xff]*)")?[ \t]*')
#: Before entity tags, the header took a bare seq (``If-Match: 12``); it still does.
_BARE_SEQ = re.compile(r"[0-9]{1,20}")
#: What the OpenAPI document gives as the header's pattern: a bare seq, ``*``, or a list of
#: entity tags, all of which :func:`parse_if_match` takes (it also takes empty list members).
_IF_MATCH_PATTERN = r'^[ \t]*(\*|[0-9]{1,20}|(W/)?"[!#-~]*"([ \t]*,[ \t]*(W/)?"[!#-~]*")*)?[ \t]*$'
_IF_MATCH_HEADER = Header(
    description=_IF_MATCH_HELP, json_schema_extra={"pattern": _IF_MATCH_PATTERN}
)
_BAD_IF_MATCH = 'If-Match must be "*" or entity tags: the agent\'s seq in quotes, e.g. "12"'

_BAD_AS_OF = f"as_of is a stream sequence or an RFC 3339 date-time with an offset, {EXAMPLES}"


class AgentBody(BaseModel):
    name: str
    tenant: str
    version: str = Field(description="The manifest's own semantic version.")
    seq: int = Field(description="Stream sequence of the agent's last event: send it in If-Match.")
    registered_seq: int
    updated_at: datetime | None
    manifest: dict[str, Any]


class AgentChange(BaseModel):
    seq: int = Field(description="The agent's version after the command.")
    changed: bool = Field(description="False when the command was a no-op (nothing appended).")
    event: str | None = Field(description="AgentRegistered, AgentUpdated, AgentDeregistered.")
    agent: AgentBody | None


class AgentList(BaseModel):
    seq: int = Field(description="Registry stream sequence this view includes.")
    as_of: str | None
    agents: list[AgentBody]
    next_after: str | None = Field(
        default=None,
        description="The last name of this page: send it as `?after=` for the next page; "
        "null when these are the last.",
    )


#: Agents one list page holds at most, as a history page holds events.
MAX_LIST_PAGE = 100
#: The longest ``after`` a list page takes (agent names are 64 characters today).
MAX_CURSOR = 1024
#: Manifest bytes (as JSON) past which a list page or a history page stops, whatever
#: ``limit`` says: 100 manifests of up to 256 KiB would be a 25 MiB answer. A page always
#: holds one agent or event, however large.
MAX_PAGE_BYTES = 1024 * 1024


class HistoryEvent(BaseModel):
    type: str
    seq: int
    at: datetime | None
    manifest: dict[str, Any] | None


class AgentHistory(BaseModel):
    name: str
    events: list[HistoryEvent]
    next_from_seq: int | None = Field(
        default=None,
        description="Where the next page starts (`?from_seq=`); null when these are the last.",
    )


#: Events one history page holds at most (fewer when their manifests pass MAX_PAGE_BYTES).
MAX_HISTORY_PAGE = 100


def _body(record: AgentRecord) -> AgentBody:
    return AgentBody(
        name=record.name,
        tenant=record.tenant,
        version=record.manifest.version,
        seq=record.seq,
        registered_seq=record.registered_seq,
        updated_at=record.updated_at,
        manifest=record.manifest.model_dump(mode="json"),
    )


def parse_if_match(value: str) -> IfMatch | None:
    """The ``If-Match`` header (RFC 9110, section 13.1.1) as a condition; ``None`` when it is
    absent or empty. A value that is neither ``*`` nor a list of entity tags is 422."""
    text = value.strip(" \t")
    if not text:
        return None
    if text == "*":
        return IfMatch(wildcard=True)
    if _BARE_SEQ.fullmatch(text):
        return IfMatch.seq(int(text))
    strong: set[str] = set()
    members = 0
    position = 0
    while True:
        member = _LIST_MEMBER.match(text, position)
        if member is None:  # never: every part of a member is optional
            raise Unprocessable(_BAD_IF_MATCH)
        if member.group(2) is not None:
            members += 1
            if member.group(1) is None:
                strong.add(member.group(2))
        position = member.end()
        if position == len(text):
            break
        if text[position] != ",":
            raise Unprocessable(_BAD_IF_MATCH)
        position += 1
    if not members:
        raise Unprocessable(_BAD_IF_MATCH)
    return IfMatch(tags=frozenset(strong))


def parse_as_of(value: str) -> tuple[int | None, datetime | None]:
    """``as_of`` as a stream sequence (ASCII digits) or an RFC 3339 date-time; 422 else."""
    if value.isascii() and value.isdigit():
        return int(value), None
    return None, parse_date_time(value, name="as_of", expected=_BAD_AS_OF)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (404, 409, 413, 415, 422, 503)
}
_MANIFEST_BODY = {
    "requestBody": {
        "required": True,
        "description": f"An agent manifest as JSON or YAML (at most {MAX_MANIFEST_BYTES} bytes).",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AgentManifest"}},
            "application/yaml": {"schema": {"type": "string"}},
        },
    }
}


def agents_router(state: IngressState) -> APIRouter:
    router = APIRouter(prefix="/v1/agents", tags=["agents"], responses=_ERRORS)

    @router.put(
        "/{name}",
        response_model=AgentChange,
        openapi_extra=_MANIFEST_BODY,
        responses={
            200: {"description": "Updated, or unchanged (changed=false)."},
            201: {"model": AgentChange, "description": "Registered."},
        },
    )
    async def put(
        name: AgentPath,
        request: Request,
        response: Response,
        if_match: Annotated[str, _IF_MATCH_HEADER] = "",
    ) -> AgentChange:
        """Register or update an agent. Identical re-apply: 200, nothing appended."""
        body = await request.body()
        if len(body) > MAX_MANIFEST_BYTES:
            raise PayloadTooLarge(f"manifest exceeds {MAX_MANIFEST_BYTES} bytes")
        content_type = request.headers.get("content-type")
        manifest_is_yaml(content_type)  # 415 before any parsing
        # Off the event loop: a YAML manifest near the size limit takes seconds to parse
        # and validate (pure Python), and every other request would wait for it.
        manifest = await asyncio.to_thread(parse_manifest, body, content_type)
        if manifest.name != name:
            raise Unprocessable(f"manifest name {manifest.name!r} differs from the path {name!r}")
        result = await put_agent(
            state.publisher, state.tenant, manifest, if_match=parse_if_match(if_match)
        )
        await state.registry.wait_for(result.seq, timeout=2.0)  # read-your-writes here
        record = state.registry.snapshot.agent(state.tenant, name)
        response.headers["ETag"] = f'"{result.seq}"'
        if result.event is not None and result.event.type == "AgentRegistered":
            response.status_code = 201
        return AgentChange(
            seq=result.seq,
            changed=result.changed,
            event=str(result.event.type) if result.event else None,
            agent=_body(record) if record else None,
        )

    @router.delete("/{name}", response_model=AgentChange)
    async def delete(
        name: AgentPath,
        if_match: Annotated[str, _IF_MATCH_HEADER] = "",
    ) -> AgentChange:
        """Deregister an agent (its history stays in the stream). Routers then route what
        its inbox still holds to the next candidate, or dead-letter it with the reason.
        Repeated with the `If-Match` it was deregistered from (a retry whose answer was
        lost): 200 with `changed: false` and the deregistration's seq."""
        result = await delete_agent(
            state.publisher, state.tenant, name, if_match=parse_if_match(if_match)
        )
        await state.registry.wait_for(result.seq, timeout=2.0)
        return AgentChange(
            seq=result.seq,
            changed=result.changed,
            event="AgentDeregistered" if result.changed else None,
            agent=None,
        )

    @router.get("", response_model=AgentList)
    async def list_agents(
        as_of: Annotated[
            str | None,
            Query(description="A stream sequence or an RFC 3339 time: the registry as it was."),
        ] = None,
        after: Annotated[
            str | None,
            Query(
                # Any text: names are compared as strings, and one an older release (or a
                # raw NATS writer) stored outside today's pattern is a page's last name too,
                # which a pattern here would refuse as the next page's cursor, for good.
                min_length=1,
                max_length=MAX_CURSOR,
                description="Start after this name (the `next_after` of the page before); "
                "it need not be registered.",
            ),
        ] = None,
        limit: Annotated[
            int, Query(ge=1, le=MAX_LIST_PAGE, description="Agents in this page at most.")
        ] = MAX_LIST_PAGE,
    ) -> AgentList:
        """The tenant's agents by name, now or as they were at `as_of` (rebuilt from the
        stream, and kept a minute for the next pages, asked for as of the first page's
        `seq`), a page at a time: `next_after` is the `after` of the next
        page (null after the last). A page also stops before the manifest that would take
        it past 1 MiB, so it may hold fewer than `limit` agents before the last page. Each
        page of the live list is the registry when that page is read; pages read with the
        same `as_of` are of one registry when it is already past (a seq the stream has
        reached, or a time before the first page: the first page's `seq` pins it)."""
        if as_of is None:
            snapshot = state.registry.snapshot
        else:
            seq, moment = parse_as_of(as_of)
            snapshot = await registry_as_of(
                state.publisher.js, state.tenant, seq=seq, time=moment, rebuilt=state.rebuilt
            )
        page = agent_page(
            snapshot.agents(state.tenant), after=after, limit=limit, max_bytes=MAX_PAGE_BYTES
        )
        return AgentList(
            seq=snapshot.last_seq,
            as_of=as_of,
            agents=[_body(r) for r in page.agents],
            next_after=page.next_after,
        )

    @router.get("/{name}", response_model=AgentBody)
    async def get(name: AgentPath, response: Response) -> AgentBody:
        record = state.registry.snapshot.agent(state.tenant, name)
        if record is None:
            raise NotFound(f"agent {name} is not registered")
        response.headers["ETag"] = f'"{record.seq}"'
        return _body(record)

    @router.get("/{name}/history", response_model=AgentHistory)
    async def history(
        name: AgentPath,
        from_seq: Annotated[
            int,
            Query(ge=1, le=2**63 - 1, description="The first stream sequence to include."),
        ] = 1,
        limit: Annotated[
            int,
            Query(ge=1, le=MAX_HISTORY_PAGE, description="Events in this page at most."),
        ] = MAX_HISTORY_PAGE,
    ) -> AgentHistory:
        """The agent's events from the stream, oldest first, a page at a time:
        `next_from_seq` is where the next page starts (null after the last). A page also
        stops before the event whose manifest would take it past 1 MiB (it always holds
        one), so it may hold fewer than `limit` events before the last page."""
        events, after = await agent_history(
            state.publisher.js,
            state.tenant,
            name,
            from_seq=from_seq,
            limit=limit,
            max_bytes=MAX_PAGE_BYTES,
        )
        if not events and from_seq == 1:
            raise NotFound(f"agent {name} has no history")
        return AgentHistory(name=name, events=[_event(e) for e in events], next_from_seq=after)

    return router


def _event(event: RegistryEvent) -> HistoryEvent:
    return HistoryEvent(
        type=str(event.type),
        seq=event.seq,
        at=event.at,
        manifest=event.manifest.model_dump(mode="json") if event.manifest else None,
    )
