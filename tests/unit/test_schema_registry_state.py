"""The schema registry's rules without a server: events fold into state, commands decide."""

from __future__ import annotations

import re
from typing import TypeVar

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import Tenant
from broker.errors import (
    IncompatibleSchema,
    InvalidSchema,
    InvalidVersion,
    SubjectConfigNotFound,
    SubjectNotFound,
    SubjectSoftDeleted,
    VersionNotFound,
    VersionNotSoftDeleted,
    VersionSoftDeleted,
)
from broker.registry.schemas import decisions
from broker.registry.schemas.decisions import Decision, SchemaCatalog, SchemaRequest
from broker.registry.schemas.events import (
    CompatibilityChanged,
    SchemaEvent,
    SchemaId,
    SchemaReference,
    SchemaVersionDeleted,
    SchemaVersionRegistered,
    decode,
    encode,
    subject_token,
)
from broker.registry.schemas.state import SchemaRegistryState, TenantSchemas, parse_version
from broker.registry.schemas.types import CompatibilityLevel, SchemaType

pytestmark = pytest.mark.unit
A = TypeVar("A")
T = Tenant("t1")


def record(*fields: str) -> SchemaRequest:
    body = {"type": "record", "name": "R", "fields": [{"name": f, "type": "int"} for f in fields]}
    return SchemaRequest(SchemaType.AVRO, orjson.dumps(body).decode())


class Registry:
    """A state and a catalog, with every decided event applied at the next sequence."""

    def __init__(self) -> None:
        self.state = SchemaRegistryState()
        self.catalog = SchemaCatalog()

    @property
    def reg(self) -> TenantSchemas:
        return self.state.tenant(T)

    def run(self, decision: Decision[A]) -> A:
        if decision.event is not None:
            self.apply(decision.event)
        return decision.answer

    def apply(self, event: SchemaEvent) -> None:
        stored = decode(encode(event).payload, subject="x", seq=self.state.last_seq + 1, at=None)
        self.state.apply(stored)

    def register(self, subject: str, request: SchemaRequest) -> SchemaId:
        return self.run(decisions.register(self.catalog, self.reg, T, subject, request))


def test_identical_schema_is_a_no_op_and_keeps_its_id_across_subjects() -> None:
    r = Registry()
    first = r.register("a", record("x"))
    assert r.run(decisions.register(r.catalog, r.reg, T, "a", record("x"))) == first
    assert r.state.last_seq == 1  # nothing decided the second time
    assert r.register("b", record("x")) == first
    assert [v.version for v in r.reg.versions("a")] == [1]


def test_versions_keep_growing_after_a_soft_delete() -> None:
    r = Registry()
    r.run(decisions.set_level(r.reg, T, None, CompatibilityLevel.NONE))
    r.register("s", record("a"))
    r.register("s", record("b"))
    assert r.run(decisions.delete_version(r.reg, T, "s", "2", permanent=False)) == 2
    with pytest.raises(VersionSoftDeleted):
        decisions.delete_version(r.reg, T, "s", "2", permanent=False)
    r.register("s", record("c"))
    assert [v.version for v in r.reg.versions("s")] == [1, 3]
    assert [v.version for v in r.reg.versions("s", deleted=True)] == [1, 2, 3]
    # The soft-deleted schema registered again is a new version with its old id.
    assert r.register("s", record("b")) == SchemaId(2)
    assert r.reg.version("s", "latest").version == 4


def test_a_soft_deleted_subject_answers_40404_until_permanently_deleted() -> None:
    r = Registry()
    r.register("s", record("a"))
    assert r.run(decisions.delete_subject(r.reg, T, "s", permanent=False)) == [1]
    with pytest.raises(SubjectSoftDeleted):
        decisions.delete_subject(r.reg, T, "s", permanent=False)
    with pytest.raises(SubjectNotFound):
        r.reg.versions("s")
    assert r.reg.subject_names(deleted=True) == ["s"]
    assert r.run(decisions.delete_subject(r.reg, T, "s", permanent=True)) == [1]
    assert r.reg.subject_names(deleted=True) == []
    with pytest.raises(SubjectNotFound):
        decisions.delete_subject(r.reg, T, "s", permanent=True)


def test_levels_fall_back_from_subject_to_global_to_backward() -> None:
    r = Registry()
    assert r.reg.level("s") is CompatibilityLevel.BACKWARD
    with pytest.raises(SubjectConfigNotFound):
        r.reg.subject_level("s", default_to_global=False)
    r.run(decisions.set_level(r.reg, T, None, CompatibilityLevel.FULL))
    assert r.reg.subject_level("s", default_to_global=True) is CompatibilityLevel.FULL
    r.run(decisions.set_level(r.reg, T, "s", CompatibilityLevel.NONE))
    assert r.reg.level("s") is CompatibilityLevel.NONE
    before = r.state.last_seq
    r.run(decisions.set_level(r.reg, T, "s", CompatibilityLevel.NONE))
    assert r.state.last_seq == before  # setting the same level again appends nothing
    assert r.run(decisions.clear_level(r.reg, T, "s")) is CompatibilityLevel.NONE
    assert r.reg.level("s") is CompatibilityLevel.FULL


def test_register_refuses_incompatible_and_invalid_schemas_and_missing_references() -> None:
    r = Registry()
    r.register("s", record("a"))
    with pytest.raises(IncompatibleSchema, match="BACKWARD"):
        r.register("s", record("a", "b"))
    with pytest.raises(InvalidSchema):
        r.register("s", SchemaRequest(SchemaType.AVRO, '{"type": "nope"}'))
    dangling = SchemaReference("R", "missing", 1)
    with pytest.raises(InvalidSchema, match="does not exist"):
        r.register("t", SchemaRequest(SchemaType.AVRO, '"string"', (dangling,)))
    assert r.state.last_seq == 1


@pytest.mark.parametrize(
    ("spec", "expected"), [("latest", None), ("-1", None), ("1", 1), (" 7 ", 7)]
)
def test_version_ids_parse(spec: str, expected: int | None) -> None:
    assert parse_version(spec) == expected


@pytest.mark.parametrize("spec", ["0", "zero", "²", "2147483648", "-2", ""])
def test_invalid_version_ids_answer_42202(spec: str) -> None:
    with pytest.raises(InvalidVersion):
        parse_version(spec)


def test_missing_versions_answer_40402() -> None:
    r = Registry()
    r.register("s", record("a"))
    with pytest.raises(VersionNotFound):
        r.reg.version("s", "2")


def test_latest_is_the_newest_live_version_whatever_deleted_says() -> None:
    """As Confluent's ``get(subject, -1, returnDeleted)``: a soft-deleted version is found by
    its number only."""
    r = Registry()
    r.run(decisions.set_level(r.reg, T, None, CompatibilityLevel.NONE))
    r.register("s", record("a"))
    r.register("s", record("b"))
    r.run(decisions.delete_version(r.reg, T, "s", "2", permanent=False))
    assert r.reg.version("s", "latest", deleted=True).version == 1
    assert r.reg.version("s", "2", deleted=True).deleted
    with pytest.raises(VersionNotSoftDeleted):
        decisions.delete_version(r.reg, T, "s", "latest", permanent=True)
    assert r.run(decisions.delete_version(r.reg, T, "s", "latest", permanent=False)) == 1
    with pytest.raises(SubjectNotFound):
        r.reg.version("s", "latest")
    with pytest.raises(VersionNotFound):
        r.reg.version("s", "-1", deleted=True)
    with pytest.raises(VersionNotFound):
        decisions.delete_version(r.reg, T, "s", "latest", permanent=False)


events = st.one_of(
    st.builds(
        SchemaVersionRegistered,
        tenant=st.just(T),
        subject=st.text(min_size=1, max_size=40),
        version=st.integers(1, 2**31 - 1),
        schema_id=st.integers(1, 2**31 - 1).map(SchemaId),
        schema_type=st.sampled_from(SchemaType),
        schema=st.text(max_size=200),
        references=st.lists(
            st.builds(
                SchemaReference, st.text(max_size=20), st.text(max_size=20), st.integers(1, 9)
            ),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(
        SchemaVersionDeleted,
        tenant=st.just(T),
        subject=st.text(min_size=1, max_size=40),
        version=st.none() | st.integers(1, 2**31 - 1),
        permanent=st.booleans(),
    ),
    st.builds(
        CompatibilityChanged,
        tenant=st.just(T),
        subject=st.none() | st.text(min_size=1, max_size=40),
        level=st.none() | st.sampled_from(CompatibilityLevel),
    ),
)


@given(events)
def test_every_event_survives_its_message_mapping(event: SchemaEvent) -> None:
    out = encode(event)
    assert decode(out.payload, subject=out.subject, seq=0, at=None) == event
    assert re.fullmatch(r"schema\.t1\.(config|subject\.[A-Za-z0-9_-]+)", out.subject)


@given(st.text(min_size=1, max_size=100))
def test_subject_tokens_are_distinct_nats_tokens(subject: str) -> None:
    token = subject_token(subject)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert subject_token(subject + "x") != token
