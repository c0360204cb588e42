"""SIGHUP to ``broker serve`` (``_reload``): the ingress reads its TLS files again, once they
pass the start's checks, and only when it serves TLS; the routers read their policy again;
projection workers are left alone. Each child here is a ``sleep``, which SIGHUP ends: its
exit status says whether it was signalled."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import structlog

from broker.server import _Child, _reload
from broker.settings import Settings
from tests._certs import make_pki

pytestmark = pytest.mark.unit


def children() -> list[_Child]:
    def sleeper() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "30"])

    return [_Child(name, sleeper) for name in ("ingress", "projection_worker-0", "router-0")]


def signalled(running: list[_Child]) -> list[str]:
    """The children SIGHUP ended; the others are stopped here."""
    names = []
    for child in running:
        try:
            code = child.proc.wait(0.5)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
            continue
        if code == -signal.SIGHUP:
            names.append(child.name)
    return names


def test_without_tls_only_the_routers_are_signalled() -> None:
    running = children()
    with structlog.testing.capture_logs() as logs:
        _reload(Settings(), running)
    assert signalled(running) == ["router-0"]
    assert {"event": "reload", "children": ["router-0"], "log_level": "info"} in logs


def test_with_tls_the_ingress_is_signalled_too(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    running = children()
    _reload(Settings(tls_cert=pki.server.cert, tls_key=pki.server.key), running)
    assert signalled(running) == ["ingress", "router-0"]


def test_tls_files_that_would_not_do_leave_the_ingress_as_it_is(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    running = children()
    settings = Settings(tls_cert=pki.server.cert, tls_key=pki.client.key)  # not its key
    with structlog.testing.capture_logs() as logs:
        _reload(settings, running)
    assert signalled(running) == ["router-0"]
    refused = [line for line in logs if line["event"] == "reload_refused"]
    assert len(refused) == 1
    assert refused[0]["child"] == "ingress"
    assert "do not load" in refused[0]["error"]


def test_with_an_auth_file_the_ingress_is_signalled(tmp_path: Path) -> None:
    auth = tmp_path / "auth.yaml"
    digest = "0" * 64
    auth.write_text(f"api_keys: [{{id: k, sha256: '{digest}', tenant: shop, scopes: [publish]}}]\n")
    running = children()
    _reload(Settings(auth_file=auth), running)
    assert signalled(running) == ["ingress", "router-0"]


def test_an_auth_file_that_does_not_load_leaves_the_ingress_as_it_is(tmp_path: Path) -> None:
    auth = tmp_path / "auth.yaml"
    auth.write_text("api_keys: [{id: k, tenant: shop}]\n")
    running = children()
    with structlog.testing.capture_logs() as logs:
        _reload(Settings(auth_file=auth), running)
    assert signalled(running) == ["router-0"]
    (refused,) = [line for line in logs if line["event"] == "reload_refused"]
    assert "api_keys.0" in refused["error"]
