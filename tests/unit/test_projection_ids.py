"""Worker ids name consumers one-to-one: two workers never share (and delete) a consumer."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import TOKEN
from projections.runtime import RESET_WORKER, consumer_name
from projections.worker import valid_worker_id

pytestmark = pytest.mark.unit

#: What nats-server accepts in a durable consumer name (no dots, wildcards, separators,
#: whitespace).
_CONSUMER = re.compile(r"[^.*>/\\\s]{1,255}")
worker_ids = st.from_regex(TOKEN, fullmatch=True)


def test_dash_and_underscore_ids_name_different_consumers() -> None:
    assert consumer_name("replica_messages", "w-1") == "proj_replica_messages_w-1"
    assert consumer_name("replica_messages", "w_1") == "proj_replica_messages_w_1"


@given(worker_ids, worker_ids)
def test_distinct_worker_ids_name_distinct_consumers(a: str, b: str) -> None:
    assert (consumer_name("test.counting", a) == consumer_name("test.counting", b)) == (a == b)


@given(worker_ids)
def test_every_valid_worker_id_names_a_valid_consumer(worker: str) -> None:
    assert _CONSUMER.fullmatch(consumer_name("test.counting", worker))


def test_no_worker_takes_the_reset_runners_id() -> None:
    with pytest.raises(ValueError, match="broker projections reset"):
        valid_worker_id(RESET_WORKER)


@given(worker_ids)
def test_no_valid_worker_id_shares_the_reset_runners_consumer(worker: str) -> None:
    try:
        valid_worker_id(worker)
    except ValueError:
        return
    assert consumer_name("replica_messages", worker) != consumer_name(
        "replica_messages", RESET_WORKER
    )
