"""A router applies its policy file again when the file changes, keeps the running policy
when the new one does not validate, and reloads at once when asked (SIGHUP)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from broker.publisher import Publisher
from broker.registry.snapshot import RegistryView
from broker.routing.embedder import HashingEmbedder, relevance_threshold
from broker.routing.load import LoadView
from broker.routing.policy import load_policy
from broker.routing.router import Router
from broker.routing.scoring import Scorer
from broker.routing.service import reload_policy, watch_policy
from tests._wait import await_until

pytestmark = pytest.mark.unit


def policy_text(version: str, errors: int = 3, extra: str = "") -> str:
    return (
        f"version: {version}\ncooldown: {{errors: {errors}, window_s: 60, duration_s: 30}}\n{extra}"
    )


def router_on(path: Path) -> Router:
    policy = load_policy(path)
    scorer = Scorer(HashingEmbedder(), policy)
    # Never started: set_policy touches neither NATS nor the views.
    return Router(Publisher(["nats://127.0.0.1:1"]), scorer, policy, RegistryView(), LoadView())


@pytest_asyncio.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[Path, Router, asyncio.Event]]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("v1"))
    router = router_on(path)
    stop, now = asyncio.Event(), asyncio.Event()
    watching = asyncio.create_task(watch_policy(path, router, stop, interval=0.05, now=now))
    yield path, router, now
    stop.set()
    await asyncio.wait_for(watching, 5)


async def version_becomes(router: Router, version: str) -> bool:
    async def check() -> bool:
        return router.policy.version == version

    return await await_until(check, timeout=5, interval=0.02)


async def test_an_edited_policy_file_is_applied_to_the_next_decisions(
    watched: tuple[Path, Router, asyncio.Event],
) -> None:
    path, router, _ = watched
    path.write_text(policy_text("v2", errors=5, extra="threshold: 0.42\n"))
    assert await version_becomes(router, "v2")
    assert router.scorer.policy.version == "v2"
    assert router.scorer.policy.threshold == 0.42
    assert router.cooldowns.errors == 5


async def test_a_policy_that_does_not_validate_is_logged_and_the_running_one_kept(
    watched: tuple[Path, Router, asyncio.Event],
) -> None:
    path, router, _ = watched
    with capture_logs() as logs:
        path.write_text("version: v2\ncooldown: {errors: -1}\n")

        async def logged() -> bool:
            return any(e["event"] == "routing_policy_invalid" for e in logs)

        assert await await_until(logged, timeout=5, interval=0.02)
        path.unlink()  # a file gone is no policy either

        async def refused_twice() -> bool:
            return sum(e["event"] == "routing_policy_invalid" for e in logs) == 2

        assert await await_until(refused_twice, timeout=5, interval=0.02)
    assert router.policy.version == "v1"
    refused = [e for e in logs if e["event"] == "routing_policy_invalid"]
    assert refused[0]["kept"] == "v1"
    path.write_text(policy_text("v3"))
    assert await version_becomes(router, "v3")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "is empty"),  # caught between an editor's truncate and its write
        (b"# only a comment\n", "is empty"),
        (b"\xff\xfeversion: v9\n", "not UTF-8"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    ],
)
async def test_a_file_that_is_no_policy_leaves_the_running_one_and_the_watch_goes_on(
    watched: tuple[Path, Router, asyncio.Event], content: bytes, why: str
) -> None:
    """An empty file is the default policy at start, never on reload; a file that is not
    text or nested too deeply used to end the watch (the error escaped), and later edits
    were never applied."""
    path, router, _ = watched
    with capture_logs() as logs:
        path.write_bytes(content)

        async def refused() -> bool:
            return any(why in e.get("error", "") for e in logs)

        assert await await_until(refused, timeout=5, interval=0.02)
    assert router.policy.version == "v1"
    path.write_text(policy_text("v2"))
    assert await version_becomes(router, "v2")


async def test_a_file_swapped_through_a_symlink_is_seen(tmp_path: Path) -> None:
    """Kubernetes updates a mounted ConfigMap by pointing a symlink at a new directory:
    the file's path and perhaps its size and time stay; the inode changes."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "policy.yaml").write_text(policy_text("v1"))
    (tmp_path / "b" / "policy.yaml").write_text(policy_text("v2"))
    stat = (tmp_path / "a" / "policy.yaml").stat()
    os.utime(tmp_path / "b" / "policy.yaml", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    link = tmp_path / "policy.yaml"
    link.symlink_to(tmp_path / "a" / "policy.yaml")
    router = router_on(link)
    stop = asyncio.Event()
    watching = asyncio.create_task(watch_policy(link, router, stop, interval=0.05))
    try:
        await asyncio.sleep(0.2)  # the watcher has had its first look
        swap = tmp_path / "swap"
        swap.symlink_to(tmp_path / "b" / "policy.yaml")
        swap.replace(link)
        assert await version_becomes(router, "v2")
    finally:
        stop.set()
        await asyncio.wait_for(watching, 5)


async def test_asked_to_reload_it_reads_the_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("v1"))
    router = router_on(path)
    stop, now = asyncio.Event(), asyncio.Event()
    watching = asyncio.create_task(watch_policy(path, router, stop, interval=3600, now=now))
    try:
        path.write_text(policy_text("v2"))
        await asyncio.sleep(0.1)
        assert router.policy.version == "v1"  # not looked at for an hour
        now.set()  # what SIGHUP does
        assert await version_becomes(router, "v2")
    finally:
        stop.set()
        await asyncio.wait_for(watching, 5)


def test_a_policy_without_a_threshold_takes_the_embedders_own(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("v1", extra="threshold: 0.9\n"))
    router = router_on(path)
    path.write_text(policy_text("v2"))
    assert reload_policy(path, router)
    assert router.scorer.policy.threshold == relevance_threshold(HashingEmbedder())
    assert not reload_policy(path, router)  # the same policy again: nothing to do
