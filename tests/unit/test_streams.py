"""Stream specifications and the comparison that makes provisioning idempotent."""

from __future__ import annotations

import dataclasses

import pytest
from nats.js.errors import BadRequestError
from structlog.testing import capture_logs

from broker import streams as streams_module
from broker.settings import Settings
from broker.streams import SUBJECT_PREFIX, Stream, agent_load_spec, config_diff, stream_specs

pytestmark = pytest.mark.unit


def test_every_stream_owns_its_prefix() -> None:
    specs = {spec.name: spec for spec in stream_specs(Settings())}
    assert set(specs) == set(Stream)
    for stream, prefix in SUBJECT_PREFIX.items():
        assert specs[stream].subjects == [f"{prefix}.>"]


def test_settings_shape_the_specs() -> None:
    settings = Settings(stream_replicas=3, duplicate_window_seconds=30, messages_max_age_seconds=60)
    specs = {spec.name: spec for spec in stream_specs(settings)}
    assert {spec.num_replicas for spec in specs.values()} == {3}
    assert specs[Stream.MESSAGES].max_age == 60
    assert specs[Stream.REGISTRY].max_age == 0  # the registry is never aged out
    assert specs[Stream.REGISTRY].deny_delete
    assert agent_load_spec(settings).replicas == 3


def test_identical_config_has_no_diff() -> None:
    spec = stream_specs(Settings())[0]
    assert config_diff(spec, dataclasses.replace(spec)) == {}


def test_diff_names_each_differing_field() -> None:
    spec = stream_specs(Settings())[0]
    other = dataclasses.replace(spec, subjects=["other.>"], duplicate_window=5.0)
    assert set(config_diff(other, spec)) == {"subjects", "duplicate_window"}


async def test_provisioning_waits_for_a_cluster_that_cannot_place_replicas_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every node follows the meta leader, which has not yet heard from enough peers to
    place an R3 stream (10005): seen when the broker starts right after the cluster. That is
    retried; any other refusal is not."""
    monkeypatch.setattr("broker.streams.asyncio.sleep", _no_sleep)
    calls = 0

    async def placed_on_the_third_try() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise BadRequestError(code=400, err_code=10005, description="no suitable peers")

    with capture_logs() as logged:
        await streams_module._patiently(placed_on_the_third_try)
    assert calls == 3
    assert [entry["event"] for entry in logged] == ["provisioning_retried"] * 2

    async def refused() -> None:
        raise BadRequestError(code=400, err_code=10058, description="stream name in use")

    with capture_logs(), pytest.raises(BadRequestError):
        await streams_module._patiently(refused)


async def _no_sleep(_: float) -> None:
    return None
