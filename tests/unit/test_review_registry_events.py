"""Registry events a reviewer found read wrongly: a stored manifest that this release can
read but not serialize (nested deeper than pydantic and orjson write) was taken as a
registration, so every reader that answers it (the agent list of its whole tenant, the
agent, its history, ``as_of``) failed with 500, and a ``PUT`` over it with 422."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.registry.events import UnreadableEvent, decode
from broker.registry.manifest import canonical_json

pytestmark = pytest.mark.unit

SUBJECT = "reg.t.agent.deep"


def nested(depth: int, *, array: bool = False) -> str:
    """A JSON value ``depth`` objects (or arrays) deep, as text: no encoder's limit applies."""
    return "[" * depth + "]" * depth if array else '{"a":' * depth + "{}" + "}" * depth


def stored_event(input_schema: str, event_type: str = "AgentRegistered") -> bytes:
    """What an agent allowed to publish on its own subject can store, byte for byte."""
    manifest = (
        '{"name":"deep","version":"1.0.0","description":"d",'
        f'"capabilities":[{{"action":"x","input_schema":{input_schema}}}]}}'
    )
    return (f'{{"type":"{event_type}","tenant":"t","name":"deep","manifest":{manifest}}}').encode()


@pytest.mark.parametrize("depth", [300, 1000])
@pytest.mark.parametrize("array", [False, True])
def test_a_manifest_too_deep_to_serialize_is_unreadable_not_a_registration(
    depth: int, array: bool
) -> None:
    schema = nested(depth, array=array) if not array else f'{{"a":{nested(depth, array=True)}}}'
    with pytest.raises(UnreadableEvent, match="cannot be serialized") as unreadable:
        decode(stored_event(schema), subject=SUBJECT, seq=7, at=None)
    assert unreadable.value.seq == 7


def test_a_deep_manifest_that_still_serializes_is_read_as_stored() -> None:
    """Stored events are facts: a manifest deeper than today's API takes (72 levels), as an
    earlier release may have stored it, is still read, and serializes."""
    event = decode(stored_event(nested(200)), subject=SUBJECT, seq=3, at=None)
    assert event.manifest is not None
    assert canonical_json(event.manifest)


_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(schema=_JSON, depth=st.integers(0, 400))
def test_every_registration_read_from_the_stream_can_be_served(schema: Any, depth: int) -> None:
    """Whatever an input schema holds, and however deep it is wrapped: decoding it gives an
    event whose manifest serializes (what every reader does with it), or UnreadableEvent."""
    text = orjson.dumps(schema).decode()
    wrapped = '{"a":' * depth + text + "}" * depth
    try:
        event = decode(stored_event(wrapped), subject=SUBJECT, seq=1, at=None)
    except UnreadableEvent:
        return
    assert event.manifest is not None
    canonical_json(event.manifest)
