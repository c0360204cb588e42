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
        (10002, 503, "nats_unavailable"),  # resource limits exceeded for account
        (10047, 503, "nats_unavailable"),  # insufficient storage resources available
        (10028, 503, "nats_unavailable"),  # insufficient memory resources available
    ],
)
def test_jetstream_refusals_map_to_their_answers(
    err_code: int, status: int, error_code: str
) -> None:
    error = jetstream_error(400, err_code, "refused", "msg.t.a")
    assert (error.status, error.error_code) == (status, error_code)


@pytest.mark.parametrize("err_code", [10002, 10047, 10028, 10023])
def test_a_full_store_is_retryable_not_a_refusal_of_the_message(err_code: int) -> None:
    """A full account or server store passes: the router must hand the message back, not
    terminate it after three deliveries as a message that can never be stored."""
    error = jetstream_error(400, err_code, "resource limits exceeded for account", "msg.t.a")
    assert error.retryable
