"""JetStream's refusals become the broker's 4xx/5xx answers, not a generic 500."""

from __future__ import annotations

import pytest

from broker.publisher import jetstream_error

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("err_code", "status", "error_code"),
    [
        (10097, 413, "payload_too_large"),  # "header size exceeds maximum allowed of 64k"
        (10054, 413, "payload_too_large"),  # "message size exceeds maximum allowed"
        (10071, 409, "sequence_conflict"),  # wrong last sequence
        (10023, 503, "nats_unavailable"),  # insufficient resources
    ],
)
def test_jetstream_refusals_map_to_their_answers(
    err_code: int, status: int, error_code: str
) -> None:
    error = jetstream_error(400, err_code, "refused", "msg.t.a")
    assert (error.status, error.error_code) == (status, error_code)
