"""``broker serve`` supervises every child, the ingress included: one that dies is started
again, one whose settings stopped validating after it ran is started again until they do,
and a stop gives the ingress's requests in flight the whole ``--stop-timeout``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests._wait import wait_for
from tests.e2e._broker import BrokerProcess, alive, children, start_broker

pytestmark = pytest.mark.e2e

#: No model to load: routers start in about a second.
HASHING = {"BROKER_ROUTING_EMBEDDER": "hashing"}


def _events(broker: BrokerProcess, event: str) -> list[dict[str, object]]:
    found = []
    for line in broker.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def _child_of_broker(broker: BrokerProcess, *marks: bytes) -> int | None:
    """The pid of the broker's direct child whose command line holds every one of ``marks``."""
    for pid in children(broker.proc.pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == broker.proc.pid and all(
            mark in argv for mark in marks
        ):
            return pid
    return None


def _ready(broker: BrokerProcess) -> bool:
    try:
        with httpx.Client(http1=False, http2=True, timeout=2) as c:
            return c.get(f"{broker.base_url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def test_a_router_whose_policy_file_became_invalid_is_started_again_not_fatal(
    tmp_path: Path,
) -> None:
    """docs/routing.md: an edit of the policy file that does not validate changes nothing.
    The running router keeps its policy; but a router that crashed (an OOM kill) read the
    file again at its restart, exited 2, and the whole broker stopped with 4. Now that exit
    is logged as an error and the router started again, with the usual backoff, until the
    file is fixed."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: v1\nchoice: p2c\n")
    broker = start_broker(
        tmp_path,
        args=("--routers", "1", "--projection-workers", "0", "--routing-policy", str(policy)),
        env=HASHING,
    )
    try:
        assert wait_for(lambda: _events(broker, "router_started"), 60, 0.2), broker.log_tail()
        edited = tmp_path / "policy.yaml.new"
        edited.write_text("version: v2\nchoice: bogus\n")
        edited.replace(policy)  # as an editor saves it
        assert wait_for(lambda: _events(broker, "routing_policy_invalid"), 30, 0.2)
        router = _child_of_broker(broker, b"broker", b"router")
        assert router is not None
        os.kill(router, signal.SIGKILL)

        def restarted_on_a_usage_error() -> bool:
            return any(
                record["exit_code"] == 2 and record["level"] == "error"
                for record in _events(broker, "child_restarted")
            )

        assert wait_for(restarted_on_a_usage_error, 60, 0.2), broker.log_tail()
        assert broker.proc.poll() is None, broker.log_tail()
        assert not _events(broker, "child_cannot_start")
        assert _ready(broker)

        edited.write_text("version: v3\nchoice: p2c\n")
        edited.replace(policy)  # fixed: the next restart runs
        assert wait_for(
            lambda: any(r["policy"] == "v3" for r in _events(broker, "router_started")), 60, 0.2
        ), broker.log_tail()
    finally:
        code = broker.stop()
    assert code == 0, broker.log_tail()


def test_the_ingress_is_started_again_when_granian_dies(tmp_path: Path) -> None:
    """The ingress was the one child never started again: two worker deaths within 5.5 s
    made granian exit ("Worker crash loop detected"), and a killed granian ended `broker
    serve` (exit 1). Both are now restarts, and the broker answers again on its port."""
    broker = start_broker(tmp_path, args=("--routers", "0", "--projection-workers", "0"))
    try:
        granian = _child_of_broker(broker, b"broker.http.granian_process")
        assert granian is not None
        killed: list[int] = []
        for _ in range(2):  # granian respawns the first dead worker, gives up at the second
            assert wait_for(lambda: [p for p in children(granian) if p not in killed], 30, 0.02)
            worker = next(p for p in children(granian) if p not in killed)
            os.kill(worker, signal.SIGKILL)
            killed.append(worker)
        assert wait_for(lambda: not alive(granian), 30), broker.log_tail()
        assert wait_for(lambda: _ready(broker), 60, 0.2), broker.log_tail()
        assert broker.proc.poll() is None

        again = _child_of_broker(broker, b"broker.http.granian_process")
        assert again is not None
        assert again != granian
        os.kill(again, signal.SIGKILL)  # granian's supervisor itself
        assert wait_for(
            lambda: _child_of_broker(broker, b"broker.http.granian_process") not in {None, again},
            30,
        ), broker.log_tail()
        assert wait_for(lambda: _ready(broker), 60, 0.2), broker.log_tail()
        restarts = [r for r in _events(broker, "child_restarted") if r["child"] == "ingress"]
        assert [r["exit_code"] for r in restarts] == [1, -signal.SIGKILL], restarts
    finally:
        code = broker.stop()
    assert code == 0, broker.log_tail()


def test_a_stop_lets_a_request_in_flight_finish_within_the_stop_timeout(tmp_path: Path) -> None:
    """granian killed its workers 10 s after the stop signal whatever `--stop-timeout` said:
    with `--stop-timeout 20`, a route waiting 13 s for its answer had its connection cut at
    10 s. It now gets its answer (504: no router decides), and the broker exits 0."""
    broker = start_broker(
        tmp_path, args=("--routers", "0", "--projection-workers", "0", "--stop-timeout", "20")
    )
    answer: dict[str, object] = {}

    def route() -> None:
        try:
            with httpx.Client(http1=True, http2=False, timeout=60) as c:
                response = c.post(
                    f"{broker.base_url}/v1/route/stop.inflight",
                    params={"wait": "true", "timeout": "13"},
                    content=b"hello",
                    headers={"content-type": "text/plain"},
                )
            answer["status"] = response.status_code
        except httpx.HTTPError as e:
            answer["error"] = repr(e)

    def stored() -> bool:  # the request is in flight once its message is in MESSAGES
        with httpx.Client(http1=False, http2=True, timeout=5) as c:
            replay = c.get(f"{broker.base_url}/v1/streams/MESSAGES/messages?start_seq=1")
        return b"stop.inflight" in replay.content

    caller = threading.Thread(target=route)
    caller.start()
    try:
        assert wait_for(stored, 30, 0.1), broker.log_tail()
        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        code = broker.proc.wait(40)
        elapsed = time.monotonic() - started
        caller.join(30)
    finally:
        broker.stop()
    assert answer == {"status": 504}, (answer, broker.log_tail())
    assert code == 0, broker.log_tail()
    assert 8 < elapsed < 20, f"stopped after {elapsed:.1f} s"
