"""Settings that would fail only once NATS runs are refused before anything starts: a message
naming the problem and exit code 4 (2 for a value no setting takes), never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broker.embedded import free_port

pytestmark = pytest.mark.e2e

EXIT_USAGE = 2
EXIT_STARTUP = 4
#: The lightest broker: no workers or routers to start.
LIGHT = ("--projection-workers", "0", "--routers", "0")


def _run(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str]:
    """Run ``python -m broker ARGS`` in ``tmp_path``; its exit code and all it printed."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=tmp_path,
        env={**environ, "BROKER_LOG_FORMAT": "json", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    port = str(free_port())
    data = str(tmp_path / "data")
    return _run(
        tmp_path, "broker", "serve", "--port", port, "--data-dir", data, *LIGHT, *args, env=env
    )


def test_a_host_name_is_refused_before_nats_starts(tmp_path: Path) -> None:
    """granian binds IP addresses only: `--host localhost` passed the port check (which
    resolves names), then granian failed with a traceback and exit 1 after NATS had started
    and the streams were made."""
    code, output = _serve(tmp_path, "--host", "localhost")
    assert code == EXIT_STARTUP, output
    assert "--host 'localhost' is not an IP address" in output
    assert "Traceback" not in output
    assert "embedded_nats_started" not in output


def test_the_same_port_for_nats_and_the_ingress_is_refused(tmp_path: Path) -> None:
    """It was a ninety-line Rust and Python traceback, and exit 1, once NATS held the port."""
    port = str(free_port())
    code, output = _run(
        tmp_path,
        "broker",
        "serve",
        *("--port", port, "--nats-port", port, "--data-dir", str(tmp_path / "data"), *LIGHT),
    )
    assert code == EXIT_STARTUP, output
    assert f"--nats-port and --port are both {port}" in output
    assert "Traceback" not in output


def test_port_zero_is_a_usage_error(tmp_path: Path) -> None:
    """granian bound a random port that nothing reported, and the banner never came."""
    code, output = _serve(tmp_path, "--port", "0")
    assert code == EXIT_USAGE, output
    assert "--port" in output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BROKER_MESSAGES_MAX_AGE_SECONDS", "inf"),
        ("BROKER_MESSAGES_MAX_AGE_SECONDS", "1e300"),  # finite, but no NATS duration
        ("BROKER_DUPLICATE_WINDOW_SECONDS", "nan"),
        ("BROKER_PUBLISH_TIMEOUT", "inf"),
    ],
)
def test_a_duration_that_never_ends_is_a_usage_error(
    tmp_path: Path, variable: str, value: str
) -> None:
    """An infinite max age passed the settings and failed at provisioning with an
    OverflowError, a traceback and exit 1."""
    code, output = _serve(tmp_path, env={variable: value})
    assert code == EXIT_USAGE, output
    assert f"error: {variable}:" in output
    assert "Traceback" not in output


def _data_dirs(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    return {"a file": a_file, "under a file": a_file / "data"}


@pytest.mark.parametrize("kind", ["a file", "under a file"])
@pytest.mark.parametrize("command", ["serve", "dev-cluster"])
def test_a_data_dir_that_cannot_be_one_is_refused(tmp_path: Path, kind: str, command: str) -> None:
    """`--data-dir /etc/passwd` (a file), or a directory that cannot be made, ended in an
    OSError's traceback and exit 1."""
    data_dir = _data_dirs(tmp_path)[kind]
    code, output = _run(
        tmp_path,
        "broker",
        command,
        *("--data-dir", str(data_dir), "--port", str(free_port()), *LIGHT),
    )
    assert code == EXIT_STARTUP, output
    assert f"cannot use the data dir {data_dir}" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("command", ["serve", "dev-cluster"])
@pytest.mark.parametrize(
    "url",
    [
        "bogus://x",
        "not a url",
        "postgresql+nosuchdriver://u:s3cret@db/replica",
        "postgresql://u:p@x:s3cret/y@db/replica",  # a port of no number: its text in the error
    ],
)
def test_an_unusable_replica_url_is_refused(tmp_path: Path, command: str, url: str) -> None:
    """The projection worker exited with a traceback and was started again every minute,
    forever, while the broker said it was ready."""
    code, output = _run(
        tmp_path,
        "broker",
        command,
        *("--data-dir", str(tmp_path / "data"), "--port", str(free_port())),
        *("--projection-workers", "1", "--routers", "0", "--replica-url", url),
    )
    assert code == EXIT_STARTUP, output
    assert "is not a usable SQL replica URL" in output
    assert "s3cret" not in output
    assert "Traceback" not in output
    assert "embedded_nats_started" not in output


@pytest.mark.parametrize("command", ["serve", "dev-cluster"])
@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_replica_url_is_refused(tmp_path: Path, command: str, url: str) -> None:
    """Each projection worker kept the replica in a database of its own, in its memory:
    nothing another process could read, lost at every restart, while the broker said it
    was ready with an SQL replica."""
    code, output = _run(
        tmp_path,
        "broker",
        command,
        *("--data-dir", str(tmp_path / "data"), "--port", str(free_port())),
        *("--projection-workers", "1", "--routers", "0"),
        env={"BROKER_REPLICA_URL": url},
        timeout=30,  # it was taken: the broker then ran until stopped
    )
    assert code == EXIT_STARTUP, output
    assert f"--replica-url {url} is an in-memory SQLite database" in output
    assert "Traceback" not in output
    assert "embedded_nats_started" not in output


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("bogus://127.0.0.1:1", "its scheme is not nats"),
        ("nats://u:s3cret@127.0.0.1:notaport", "its port is not a number"),
        ("nats://127.0.0.1:1, nats://", "it names no host"),
    ],
)
def test_a_nats_url_that_names_no_server_is_refused(tmp_path: Path, url: str, said: str) -> None:
    """It was tried for a minute (``bogus://`` read as the host ``bogus``) or failed at
    once as NATS that could not be reached; now it is named before anything starts."""
    code, output = _serve(tmp_path, "--nats-url", url)
    assert code == EXIT_STARTUP, output
    assert "is not a NATS server URL" in output
    assert said in output
    assert "s3cret" not in output
    assert "Traceback" not in output
    assert "nats_unreachable" not in output


def test_a_host_name_is_refused_by_the_dev_cluster(tmp_path: Path) -> None:
    code, output = _run(
        tmp_path,
        "broker",
        "dev-cluster",
        *("--host", "localhost", "--data-dir", str(tmp_path / "dc"), *LIGHT),
    )
    assert code == EXIT_STARTUP, output
    assert "is not an IP address" in output
    assert not (tmp_path / "dc" / "nats").exists()


def test_an_ingress_whose_port_was_taken_says_so_on_one_line(tmp_path: Path) -> None:
    """Taken after serve checked it: granian failed with a ninety-line traceback and exit 1.
    It now prints one line and exits 2, which `broker serve` turns into exit 4 at start."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = _run(
            tmp_path,
            "broker.http.granian_process",
            env={"BROKER_HOST": "127.0.0.1", "BROKER_PORT": str(port), "RUST_BACKTRACE": "1"},
        )
    assert code == EXIT_USAGE, output
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: the ingress cannot start on 127.0.0.1:{port}: "), line
    assert "Address already in use" in line
    assert "Traceback" not in output
    assert "Stack backtrace" not in output


def test_messages_over_the_embedded_default_max_payload_are_stored(tmp_path: Path) -> None:
    """The embedded nats-server's max_payload was 8 MiB whatever BROKER_MAX_MESSAGE_BYTES
    said: a 10 MiB message the ingress took was refused by NATS (413). It follows the
    setting now, with room for the headers."""
    import httpx

    from tests.e2e._broker import start_broker

    broker = start_broker(
        tmp_path, args=LIGHT, env={"BROKER_MAX_MESSAGE_BYTES": str(12 * 1024 * 1024)}
    )
    try:
        with httpx.Client(http1=False, http2=True, timeout=60) as client:
            answer = client.post(
                f"{broker.base_url}/v1/publish/big",
                content=b"x" * (10 * 1024 * 1024),
                headers={"content-type": "application/octet-stream"},
            )
        assert answer.status_code == 200, answer.text
    finally:
        broker.stop()


def test_a_message_limit_nats_cannot_carry_is_refused_at_start(tmp_path: Path) -> None:
    code, output = _serve(tmp_path, env={"BROKER_MAX_MESSAGE_BYTES": str(64 * 1024 * 1024)})
    assert code == EXIT_STARTUP, output
    assert "BROKER_MAX_MESSAGE_BYTES" in output
    assert "Traceback" not in output
