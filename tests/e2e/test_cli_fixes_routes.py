"""``broker routes simulate`` against a real NATS: a NATS without the broker's streams is
said in one line, not a traceback; and the replay keeps a bounded number of decisions in
memory, however many it reads, while it prints what it printed when it kept them all."""

from __future__ import annotations

import json
import weakref
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from typer.testing import CliRunner

import broker.cli_routes
import broker.routing.simulate as sim
from broker.cli import app
from broker.routing.simulate import Resimulated, SimulationReport
from broker.settings import Settings
from broker.streams import provision

pytestmark = pytest.mark.e2e


def simulate_args(tmp_path: Path, nats_url: str, *extra: str) -> list[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: fixes-2\n")
    args = ["routes", "simulate", "--policy", str(policy), "--nats-url", nats_url]
    return [*args, "--embedder", "hashing", *extra]


def test_a_nats_without_the_broker_streams_is_one_line_not_a_traceback(
    tmp_path: Path, nats_url: str
) -> None:
    result = CliRunner().invoke(app, simulate_args(tmp_path, nats_url))
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "has no stream REGISTRY" in result.output


class Tracked(Resimulated):
    """A row that can be watched: how many are alive is how many the command keeps."""

    __slots__ = ("__weakref__",)


def rows(count: int) -> Iterator[Tracked]:
    """Decisions of three tenants in an order that is not the report's; every third one
    moves; two share a (tenant, message_seq) (a decision and its dead letter could)."""
    at = datetime(2026, 11, 25, 10, tzinfo=UTC)
    for i in range(count):
        tenant = f"t{i % 3}"
        seq = (count - i) * 7 % 1000 if i else 500  # row 0 shares (t0, 500) with a later one
        new = "b" if i % 3 == 0 else "a"
        text = f'say "{i}",\nthen stop'  # quoted and on two lines in the CSV
        yield Tracked(tenant, seq, text, at, "a", new, "score", "score", "p1", "fixes-2")


@pytest.fixture
async def provisioned(nats_url: str) -> str:
    nc = await nats.connect(nats_url)
    await provision(nc.jetstream(), Settings())
    await nc.close()
    return nats_url


@pytest.mark.parametrize(
    ("with_csv", "max_runs"),
    [(False, 64), (True, 64), (True, 2)],
    ids=["summary", "csv", "csv-runs-merged-on-the-way"],
)
def test_the_replay_keeps_a_bounded_number_of_decisions_and_prints_the_same(
    tmp_path: Path,
    provisioned: str,
    monkeypatch: pytest.MonkeyPatch,
    with_csv: bool,
    max_runs: int,
) -> None:
    """600 decisions read, at most about 100 held at once (``CSV_RUN_ROWS`` made 100 here;
    with no --csv none is held); the summary and the CSV are what a report that held them all
    prints (same order, same bytes)."""
    count, bound = 600, 100
    monkeypatch.setattr(broker.cli_routes, "CSV_RUN_ROWS", bound, raising=False)
    monkeypatch.setattr(broker.cli_routes, "CSV_MAX_RUNS", max_runs, raising=False)
    made: list[weakref.ref[Tracked]] = []
    most_alive = 0

    async def recorded(js: Any, *, since: datetime | None = None) -> AsyncIterator[list[int]]:
        for start in range(0, count, 50):
            yield list(range(start, min(start + 50, count)))

    source = list(rows(count))

    def resimulate(message: int, *args: Any, **kwargs: Any) -> Tracked:
        nonlocal most_alive
        row = source[message]
        source[message] = None  # type: ignore[call-overload]  # the command's now, or gone
        made.append(weakref.ref(row))
        most_alive = max(most_alive, sum(1 for ref in made if ref() is not None))
        return row

    expected = SimulationReport(policy_version="fixes-2")
    for row in rows(count):
        expected.add(row)
    expected.rows.sort(key=lambda r: (r.tenant, r.message_seq))

    monkeypatch.setattr(sim, "recorded_decisions", recorded)
    monkeypatch.setattr(sim, "resimulate", resimulate)
    csv_path = tmp_path / "out" / "decisions.csv"
    csv_path.parent.mkdir()
    extra = ["-o", "json", *(["--csv", str(csv_path)] if with_csv else [])]
    result = CliRunner().invoke(app, simulate_args(tmp_path, provisioned, *extra))
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout) == expected.to_dict()
    assert len(made) == count
    if with_csv:
        assert csv_path.read_bytes() == expected.to_csv().encode()
        assert [p.name for p in csv_path.parent.iterdir()] == ["decisions.csv"]
    # + 2: the row being made, and the one before it (still the loop's until replaced)
    assert most_alive <= (bound if with_csv else 0) + 2, most_alive
