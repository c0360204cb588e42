"""What the ingress stores from request values: whitespace NATS would trim, CloudEvent subjects."""

from __future__ import annotations

import pytest

from broker.envelope import (
    PublishRequest,
    Tenant,
    cloudevent_to_request,
    record_to_request,
)
from broker.errors import Unprocessable

pytestmark = pytest.mark.unit

CE = {"specversion": "1.0", "id": "e1", "source": "s", "type": "t", "data": 1}


@pytest.mark.parametrize("key", ["k ", " k", "k\t", "\tk", "  "])
def test_a_key_with_surrounding_whitespace_is_refused(key: str) -> None:
    """NATS trims stored header values: "k " would be stored as, and collide with, "k"."""
    request = record_to_request(
        {"subject": "a", "data": 1, "idempotency_key": key}, default_subject=None
    )
    with pytest.raises(Unprocessable, match="whitespace"):
        request.to_outbound(Tenant("t"))


def test_inner_whitespace_in_a_key_is_kept() -> None:
    request = PublishRequest(
        subject="a", payload=b"", content_type="text/plain", idempotency_key="a b\tc"
    )
    assert request.to_outbound(Tenant("t")).headers["Nats-Msg-Id"] == "t:a b\tc"


def test_a_cloudevent_attribute_with_surrounding_whitespace_is_refused() -> None:
    request = cloudevent_to_request({**CE, "source": "s "}, subject="a")
    with pytest.raises(Unprocessable, match="ce-source starts or ends with whitespace"):
        request.to_outbound(Tenant("t"))


def test_a_batched_cloudevent_keeps_its_own_subject_over_the_default() -> None:
    own = cloudevent_to_request({**CE, "brokersubject": "own.s"}, default_subject="dflt")
    assert own.subject == "own.s"
    assert cloudevent_to_request(CE, default_subject="dflt").subject == "dflt"


def test_a_single_cloudevent_goes_to_its_path_subject() -> None:
    request = cloudevent_to_request({**CE, "brokersubject": "own.s"}, subject="path.s")
    assert request.subject == "path.s"
