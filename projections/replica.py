"""SQL replicas: the broker's streams as plain, queryable tables (SQLite or PostgreSQL).

Four projections, each a fold of one stream into tables any SQL client can read:

======================  ============  ===============================================
:class:`MessagesReplica`  ``MESSAGES``  ``replica_messages``: one row per message, the
                                        JSON payload decoded (under the codec bounds)
:class:`AgentsReplica`    ``REGISTRY``  ``replica_agents`` (registered now),
                                        ``replica_agent_history`` (every event)
:class:`SchemasReplica`   ``SCHEMAS``   ``replica_schema_versions``,
                                        ``replica_compatibility``
:class:`RoutesReplica`    ``ROUTES``    ``replica_routes``: one row per route event
======================  ============  ===============================================

Writes are batched: append-only tables get one ``INSERT … ON CONFLICT DO NOTHING`` per
batch; keyed state is folded in memory first, then written with one upsert and one delete
per table. Applying a batch again changes nothing. With ``changes=True`` each changed row
also becomes a change event in :data:`outbox`, in the same transaction, which
:mod:`projections.outbox` relays to NATS.

With ``detect_cards=True`` (``BROKER_DETECT_CARD_NUMBERS``) the message and route replicas
mask payment card numbers (:mod:`broker.sensitive`) in what they store — the decoded JSON
payload, the subject and the message id — and record one ``card_redacted`` audit record per
message that held any, in :data:`audit` and the outbox, in the same transaction as the row
(relayed to ``audit.<tenant>.card_redacted`` in the ``AUDIT`` stream). Text payloads
(``text/*``, XML, forms) and JSON that does not decode are not stored, but are scanned for
the audit all the same; other media types (msgpack, Avro, Protobuf, binary) are neither
stored nor scanned. The stream keeps the payload as sent: replaying it returns the number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa

from broker.codecs import DecodedMessage, DecodeError, DecodeLimits, JsonCodec
from broker.codecs.base import CodecKind, kind_for, split_wire_prefix
from broker.envelope import CONTENT_TYPE, NATS_MSG_ID, idempotency_key, media_type
from broker.registry import events as agent_events
from broker.registry.events import RegistryEventType
from broker.registry.schemas import events as schema_events
from broker.registry.schemas.events import SchemaVersionDeleted, SchemaVersionRegistered
from broker.sensitive import (
    Scan,
    find_cards,
    json_may_hold_card,
    redact_text,
    redact_value,
    text_may_hold_card,
)
from broker.settings import get_settings
from broker.streams import Stream
from projections._replica_tables import (
    ChangeLog,
    Row,
    append_rows,
    audit,
    create,
    empty,
    ensure_outbox,
    existing,
    holds_nul,
    json_value,
    metadata,
    outbox,
    record_audits,
    replica_agent_history,
    replica_agents,
    replica_compatibility,
    replica_messages,
    replica_routes,
    replica_schema_versions,
    stored_seqs,
    text,
    write_state,
)
from projections.base import Event, Projection

__all__ = [
    "CARD_AUDIT",
    "REPLICAS",
    "AgentsReplica",
    "MessagesReplica",
    "RoutesReplica",
    "SchemasReplica",
    "audit",
    "ensure_outbox",
    "metadata",
    "outbox",
    "replica_projections",
]

_MAX_SCHEMA_ID = 2**31 - 1
#: Replicas store decoded JSON and orjson re-encodes it (JSON columns, change events); it
#: refuses values nested over 254 levels, so replicas read JSON no deeper than 64.
REPLICA_LIMITS = DecodeLimits(max_depth=64)


#: The audit kind of a message whose card numbers a replica masked.
CARD_AUDIT = "card_redacted"
#: At most this many findings are listed in one audit record (``count`` has them all).
MAX_AUDIT_FINDINGS = 100
#: Media types scanned as text for the audit (nothing of them is stored in a replica).
_TEXT_TYPES = frozenset({"application/xml", "application/x-www-form-urlencoded"})


def _tokens(subject: str) -> list[str]:
    """``prefix.tenant.rest`` as three parts (missing parts empty)."""
    parts = subject.split(".", 2)
    return parts + [""] * (3 - len(parts))


def _is_text(content_type: str | None) -> bool:
    bare = media_type(content_type)
    return bare.startswith("text/") or bare.endswith("+xml") or bare in _TEXT_TYPES


class _CardScan:
    """What one row's card scan found, field by field, for its audit record."""

    __slots__ = ("count", "findings", "truncated")

    def __init__(self) -> None:
        self.findings: list[dict[str, Any]] = []
        self.count = 0
        self.truncated = False

    def add(self, where: str, scan: Scan) -> None:
        self.count += scan.count
        self.truncated = self.truncated or scan.truncated
        room = max(0, MAX_AUDIT_FINDINGS - len(self.findings))
        self.findings += ({"field": where, **f.to_dict()} for f in scan.findings[:room])

    def text(self, where: str, value: str) -> str:
        """``value`` (a text column) with card numbers masked."""
        if not text_may_hold_card(value):
            return value
        done = redact_text(value)
        self.add(where, done.scan)
        return done.value

    def payload(self, where: str, raw: bytes, body: bytes | None, value: Any) -> Any:
        """The stored JSON ``value`` of ``raw`` with card numbers masked; ``body`` is the
        JSON text ``value`` was decoded from, ``None`` when the payload is not stored but
        scanned as text."""
        if body is None:
            self.add(where, find_cards(raw.decode("latin-1")))
            return value
        if not json_may_hold_card(body):  # the common case: a few passes over the bytes
            return value
        done = redact_value(value, source=body)  # a float's digits as written
        self.add(where, done.scan)
        return done.value


class _Replica:
    """What every replica shares: its tables, change events, setup and reset."""

    name: str
    stream: str
    subjects: Sequence[str]
    partitions: int
    tables: tuple[sa.Table, ...] = ()

    def __init__(self, *, changes: bool = False, detect_cards: bool = False) -> None:
        self.changes = changes
        self.detect_cards = detect_cards

    @property
    def uses_outbox(self) -> bool:
        """Whether this replica writes outbox rows (change events or audit events), which a
        worker must then relay."""
        return self.changes or self.detect_cards

    def _changes(self) -> ChangeLog | None:
        return ChangeLog(self.name, self.stream) if self.changes else None

    def _audit(self, event: Event, tenant: str, subject: str, found: _CardScan) -> Row:
        """The ``card_redacted`` audit record of ``event`` (``subject`` already masked)."""
        return {
            "kind": CARD_AUDIT,
            "stream": event.stream,
            "seq": event.seq,
            "tenant": tenant,
            "subject": subject,
            "projection": self.name,
            "count": found.count,
            "findings": found.findings,
            "truncated": found.truncated,
            "time": event.time,
        }

    def apply(self, batch: Sequence[Event], tx: sa.Connection) -> None:
        raise NotImplementedError

    def setup(self, tx: sa.Connection) -> None:
        """Create the replica's tables (and the outbox, with change events or card
        detection on, and the audit table with card detection on)."""
        create(tx, self.tables, self.changes, self.detect_cards)

    def reset(self, tx: sa.Connection) -> None:
        """Empty the replica's own tables (the outbox and other replicas are left alone)."""
        empty(tx, self.tables)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(changes={self.changes}, detect_cards={self.detect_cards})"


class MessagesReplica(_Replica):
    """``MESSAGES`` as ``replica_messages``: headers as columns, JSON payloads decoded.

    A JSON payload (``application/json``, ``*+json``) that decodes within ``limits`` lands
    in ``payload_json``; one that does not gets ``NULL`` and the reason in ``decode_error``.
    Other media types are not decoded (both columns ``NULL``). With ``detect_cards`` card
    numbers in ``payload_json``, ``subject`` and ``msg_id`` are masked and audited.
    """

    name = "replica_messages"
    stream = Stream.MESSAGES.value
    partitions = 16
    tables = (replica_messages,)

    def __init__(
        self,
        *,
        changes: bool = False,
        limits: DecodeLimits = REPLICA_LIMITS,
        detect_cards: bool = False,
    ) -> None:
        super().__init__(changes=changes, detect_cards=detect_cards)
        self.subjects = ["msg.>"]
        self._json = JsonCodec(limits=limits)

    def _payload(self, message: DecodedMessage) -> tuple[Any, str | None]:
        """The decoded JSON payload, or ``None`` and why not."""
        if kind_for(message.content_type) is not CodecKind.JSON:
            return None, None
        try:
            value = message.value
        except DecodeError as e:
            return None, e.message
        if b"\\u0000" in message.payload and holds_nul(orjson.dumps(value)):
            return None, "json payload could not be stored: it holds U+0000"
        return value, None

    def row(self, event: Event) -> Row:
        """The ``replica_messages`` row of one message (card numbers masked, with
        ``detect_cards``)."""
        return self.scanned_row(event)[0]

    def scanned_row(self, event: Event) -> tuple[Row, Row | None]:
        """The ``replica_messages`` row of one message, and its audit record if card
        detection is on and found any."""
        _, tenant, subject = _tokens(event.subject)
        message = DecodedMessage(event.data, event.headers, self._json)
        content_type = message.content_type
        msg_id = event.headers.get(NATS_MSG_ID)
        if msg_id is not None:
            msg_id = idempotency_key(tenant, msg_id)
        schema_id = message.schema_id
        payload, error = self._payload(message)
        row = {
            "seq": event.seq,
            "stream": event.stream,
            "tenant": text(tenant),
            "subject": text(subject),
            "time": event.time,
            "msg_id": text(msg_id) if msg_id is not None else None,
            "content_type": text(content_type) if content_type is not None else None,
            "schema_id": schema_id
            if schema_id is not None and schema_id <= _MAX_SCHEMA_ID
            else None,
            "size": len(event.data),
            "payload_json": payload,
            "decode_error": error,
        }
        if not self.detect_cards:
            return row, None
        found = _CardScan()
        is_json = kind_for(content_type) is CodecKind.JSON
        if is_json and error is None:
            body = split_wire_prefix(event.data, content_type)[1]
            row["payload_json"] = found.payload("payload_json", event.data, body, payload)
        elif is_json or _is_text(content_type):
            found.payload("payload", event.data, None, None)
        row["subject"] = found.text("subject", row["subject"])
        if row["msg_id"] is not None:
            row["msg_id"] = found.text("msg_id", row["msg_id"])
        if row["content_type"] is not None:  # its parameters are the client's free text
            row["content_type"] = found.text("content_type", row["content_type"])
        if not found.count:
            return row, None
        full_subject = ".".join(p for p in ("msg", row["tenant"], row["subject"]) if p)
        return row, self._audit(event, row["tenant"], full_subject, found)

    def apply(self, batch: Sequence[Event], tx: sa.Connection) -> None:
        changes = self._changes()
        scanned = [self.scanned_row(e) for e in batch]
        append_rows(tx, replica_messages, [row for row, _ in scanned], changes)
        if changes is not None:
            changes.flush(tx)
        record_audits(tx, [record for _, record in scanned if record is not None])


class AgentsReplica(_Replica):
    """``REGISTRY`` as ``replica_agents`` (the agents registered now; deregistered ones are
    deleted) and ``replica_agent_history`` (every event). Events already in the history are
    skipped, so a batch applied again changes nothing."""

    name = "replica_agents"
    stream = Stream.REGISTRY.value
    partitions = 1
    tables = (replica_agents, replica_agent_history)

    def __init__(self, *, changes: bool = False) -> None:
        super().__init__(changes=changes)
        self.subjects = ["reg.>"]

    def apply(self, batch: Sequence[Event], tx: sa.Connection) -> None:
        events = [
            agent_events.decode(e.data, subject=e.subject, seq=e.seq, at=e.time) for e in batch
        ]
        seen = stored_seqs(tx, replica_agent_history, [e.seq for e in events])
        events = [e for e in events if e.seq not in seen]
        if not events:
            return
        changes = self._changes()
        history: list[Row] = []
        keys = {(text(e.tenant), text(e.name)) for e in events}
        before = existing(tx, replica_agents, ("tenant", "name"), keys)
        state: dict[tuple[Any, ...], Row | None] = {k: before.get(k) for k in keys}
        sources: dict[tuple[Any, ...], int] = {}
        for event in events:
            key = (text(event.tenant), text(event.name))
            manifest = (
                json_value(event.manifest.model_dump(mode="json")) if event.manifest else None
            )
            history.append(
                {
                    "seq": event.seq,
                    "tenant": key[0],
                    "name": key[1],
                    "type": str(event.type),
                    "manifest": manifest,
                    "time": event.at,
                }
            )
            current = state[key]
            if current is not None and current["seq"] >= event.seq:
                continue
            if event.type is RegistryEventType.DEREGISTERED or event.manifest is None:
                state[key] = None
            else:
                state[key] = {
                    "tenant": key[0],
                    "name": key[1],
                    "version": text(event.manifest.version),
                    "description": text(event.manifest.description),
                    "manifest": manifest,
                    "seq": event.seq,
                    "registered_seq": current["registered_seq"] if current else event.seq,
                    "updated_at": event.at,
                }
            sources[key] = event.seq
        append_rows(tx, replica_agent_history, history, changes)
        write_state(
            tx,
            replica_agents,
            ("tenant", "name"),
            before=before,
            after=state,
            sources=sources,
            changes=changes,
        )
        if changes is not None:
            changes.flush(tx)


class SchemasReplica(_Replica):
    """``SCHEMAS`` as ``replica_schema_versions`` and ``replica_compatibility``, by the
    rules of :mod:`broker.registry.schemas.state`: a soft delete marks versions deleted, a
    permanent one removes them (``version`` ``None``: every version of the subject), and a
    cleared level removes its row (``subject`` ``''`` is the tenant's global level).

    Each row keeps the sequence of the event that last changed it; an event no newer than
    that is skipped, so a batch applied again changes nothing. (A row that is gone keeps no
    sequence: replaying an *older* batch after a later one removed rows would bring them
    back. The runtime never does, since the checkpoint commits with the rows.)"""

    name = "replica_schemas"
    stream = Stream.SCHEMAS.value
    partitions = 1
    tables = (replica_schema_versions, replica_compatibility)
    _VERSION_KEY = ("tenant", "subject", "version")
    _LEVEL_KEY = ("tenant", "subject")

    def __init__(self, *, changes: bool = False) -> None:
        super().__init__(changes=changes)
        self.subjects = ["schema.>"]

    def apply(self, batch: Sequence[Event], tx: sa.Connection) -> None:
        events = [
            schema_events.decode(e.data, subject=e.subject, seq=e.seq, at=e.time) for e in batch
        ]
        subjects = {
            (text(e.tenant), text(e.subject))
            for e in events
            if isinstance(e, SchemaVersionRegistered | SchemaVersionDeleted)
        }
        levels = {
            (text(e.tenant), text(e.subject or ""))
            for e in events
            if not isinstance(e, SchemaVersionRegistered | SchemaVersionDeleted)
        }
        old_versions = existing(
            tx, replica_schema_versions, self._VERSION_KEY, subjects, by=("tenant", "subject")
        )
        old_levels = existing(tx, replica_compatibility, self._LEVEL_KEY, levels)
        versions: dict[tuple[Any, ...], Row | None] = dict(old_versions)
        compat: dict[tuple[Any, ...], Row | None] = {k: old_levels.get(k) for k in levels}
        sources: dict[tuple[Any, ...], int] = {}
        for event in events:
            if isinstance(event, SchemaVersionRegistered):
                key = (text(event.tenant), text(event.subject), event.version)
                current = versions.get(key)
                if current is None or current["seq"] < event.seq:
                    versions[key] = {
                        "tenant": key[0],
                        "subject": key[1],
                        "version": event.version,
                        "schema_id": int(event.schema_id),
                        "schema_type": str(event.schema_type),
                        "schema": text(event.schema),
                        "references": json_value([r.to_dict() for r in event.references]),
                        "deleted": False,
                        "seq": event.seq,
                    }
                    sources[key] = event.seq
            elif isinstance(event, SchemaVersionDeleted):
                self._delete(event, versions, sources)
            else:
                level_key = (text(event.tenant), text(event.subject or ""))
                level = compat[level_key]
                if level is None or level["seq"] < event.seq:
                    compat[level_key] = (
                        None
                        if event.level is None
                        else {
                            "tenant": level_key[0],
                            "subject": level_key[1],
                            "level": str(event.level),
                            "seq": event.seq,
                        }
                    )
                    sources[level_key] = event.seq
        changes = self._changes()
        for table, key_columns, before, after in (
            (replica_schema_versions, self._VERSION_KEY, old_versions, versions),
            (replica_compatibility, self._LEVEL_KEY, old_levels, compat),
        ):
            write_state(
                tx, table, key_columns, before=before, after=after, sources=sources, changes=changes
            )
        if changes is not None:
            changes.flush(tx)

    @staticmethod
    def _delete(
        event: SchemaVersionDeleted,
        versions: dict[tuple[Any, ...], Row | None],
        sources: dict[tuple[Any, ...], int],
    ) -> None:
        subject = (text(event.tenant), text(event.subject))
        if event.version is not None:
            targets = [(*subject, event.version)]
        else:
            targets = [k for k, row in versions.items() if k[:2] == subject and row is not None]
        for key in targets:
            current = versions.get(key)
            if current is None or current["seq"] >= event.seq:
                continue
            if event.permanent:
                if current["deleted"] or event.version is not None:
                    versions[key] = None
                    sources[key] = event.seq
            elif not current["deleted"]:
                versions[key] = {**current, "deleted": True, "seq": event.seq}
                sources[key] = event.seq


class RoutesReplica(_Replica):
    """``ROUTES`` as ``replica_routes``: one generic row per event on
    ``route.<tenant>.<agent>…``, with its body when that is JSON (``NULL`` otherwise).

    A route event carries the routed message's payload, so with ``detect_cards`` its body
    and subject are masked and audited like a message's (under the ``ROUTES`` sequence)."""

    name = "replica_routes"
    stream = Stream.ROUTES.value
    partitions = 16
    tables = (replica_routes,)

    def __init__(
        self,
        *,
        changes: bool = False,
        limits: DecodeLimits = REPLICA_LIMITS,
        detect_cards: bool = False,
    ) -> None:
        super().__init__(changes=changes, detect_cards=detect_cards)
        self.subjects = ["route.>"]
        self._json = JsonCodec(limits=limits)

    def _body(self, event: Event) -> tuple[Any, bool]:
        """The JSON body (``None`` if there is none) and whether it was decoded."""
        content_type = event.headers.get(CONTENT_TYPE)
        if content_type is not None and kind_for(content_type) is not CodecKind.JSON:
            return None, False
        try:
            value = self._json.decode(event.data)
        except DecodeError:
            return None, False
        if b"\\u0000" in event.data and holds_nul(orjson.dumps(value)):
            return None, False
        return value, True

    def row(self, event: Event) -> Row:
        """The ``replica_routes`` row of one route event (card numbers masked, with
        ``detect_cards``)."""
        return self.scanned_row(event)[0]

    def scanned_row(self, event: Event) -> tuple[Row, Row | None]:
        """The ``replica_routes`` row of one route event, and its audit record if card
        detection is on and found any."""
        _, tenant, rest = _tokens(event.subject)
        body, decoded = self._body(event)
        row = {
            "seq": event.seq,
            "tenant": text(tenant),
            "agent": text(rest.split(".", 1)[0]),
            "subject": text(event.subject),
            "time": event.time,
            "body": body,
        }
        if not self.detect_cards:
            return row, None
        found = _CardScan()
        content_type = event.headers.get(CONTENT_TYPE)
        if decoded:
            row["body"] = found.payload("body", event.data, event.data, body)
        elif content_type is not None and (
            kind_for(content_type) is CodecKind.JSON or _is_text(content_type)
        ):  # JSON that did not decode, or text: scanned, not stored
            found.payload("payload", event.data, None, None)
        row["subject"] = found.text("subject", row["subject"])
        if not found.count:
            return row, None
        return row, self._audit(event, row["tenant"], row["subject"], found)

    def apply(self, batch: Sequence[Event], tx: sa.Connection) -> None:
        changes = self._changes()
        scanned = [self.scanned_row(e) for e in batch]
        append_rows(tx, replica_routes, [row for row, _ in scanned], changes)
        if changes is not None:
            changes.flush(tx)
        record_audits(tx, [record for _, record in scanned if record is not None])


#: Every replica, by projection name.
REPLICAS: dict[str, type[_Replica]] = {
    cls.name: cls for cls in (MessagesReplica, AgentsReplica, SchemasReplica, RoutesReplica)
}


def replica_projections(
    changes: bool = False, *, detect_cards: bool | None = None
) -> list[Projection]:
    """One of each replica, with change events on or off; card detection in the message
    and route replicas as ``detect_cards`` says (``None``: the ``detect_card_numbers``
    setting, ``BROKER_DETECT_CARD_NUMBERS``)."""
    if detect_cards is None:
        detect_cards = get_settings().detect_card_numbers
    return [
        cls(changes=changes, detect_cards=detect_cards)
        if cls in {MessagesReplica, RoutesReplica}
        else cls(changes=changes)
        for cls in REPLICAS.values()
    ]
