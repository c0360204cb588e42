"""Any object logged as a field is written by its ``repr`` (the JSON and console renderers
both do so after every processor): that text is scrubbed like any other, so a dataclass or a
model with a ``password`` field, or an object holding a URL with a password, does not put the
secret in the line."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from broker.telemetry.logfields import redact_secrets

pytestmark = pytest.mark.unit

SECRET = "hunter2-s3cret"


@dataclasses.dataclass
class Login:
    user: str
    password: str


class NatsOptions(BaseModel):
    servers: list[str]
    token: str


class Connection:
    def __repr__(self) -> str:
        return f"<Connection nats://admin:{SECRET}@nats-1:4222>"


def line(**fields: Any) -> str:
    """The fields as redact_secrets leaves them, rendered as structlog's JSON renderer does
    (an object it does not know by its ``repr``)."""
    return orjson.dumps(
        redact_secrets(None, "info", {"event": "x", **fields}), default=repr
    ).decode()


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (Login("bob", SECRET), "Login(user='bob', password="),
        (
            NatsOptions(servers=["nats://n1"], token=SECRET),
            "NatsOptions(servers=['nats://n1'], token=",
        ),
        (Connection(), "<Connection nats://***@nats-1:4222>"),
    ],
    ids=["dataclass", "pydantic", "repr-with-url"],
)
def test_an_object_logged_as_a_field_is_written_without_its_secrets(value: Any, kept: str) -> None:
    written = line(login=value)

    assert SECRET not in written, written
    assert kept in written, written


def test_numbers_and_plain_values_stay_what_they_are() -> None:
    fields = redact_secrets(None, "info", {"event": "x", "n": 3, "f": 0.5, "ok": True, "no": None})

    assert fields == {"event": "x", "n": 3, "f": 0.5, "ok": True, "no": None}
