"""A worker's id names its consumers and leases: one that cannot is refused at start."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from broker.cli import app
from projections.worker import WorkerOptions, default_worker_id, valid_worker_id

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bad", ["eu.w2", "", "a b", "w*", "x" * 65])
def test_an_id_that_cannot_name_a_consumer_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64"):
        WorkerOptions(nats_urls=[], replica_url="sqlite://", projections=[], worker_id=bad)


def test_good_ids_and_the_default_pass() -> None:
    for good in ("w2", "eu-w2_a", default_worker_id()):
        assert valid_worker_id(good) == good


def test_the_cli_says_so_before_connecting_to_anything() -> None:
    result = CliRunner().invoke(app, ["worker", "--worker-id", "eu.w2"])
    assert result.exit_code == 2
    assert "eu.w2" in result.output
