"""Sensitive keys against real processes: card numbers as JSON object keys in the SQL
replicas (real NATS, a real SQLite file / PostgreSQL schema), and NATS passwords in URLs
(a real nats-server that requires a user and password).

Different card numbers with the same last four digits mask to the same text. An object
whose keys are such numbers must keep every member in the replica row (each masked key
made unique, the same way on every rebuild), and nothing in the replica, its change events
or its audit records may hold a full number.

A NATS password may hold a raw ``@`` (``nats://broker:pXq@sEcr3tZ@host``): nats-py connects
with it, and no log line or error message shows any part of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from broker.embedded import NatsServer, ServerSpec
from broker.natsconn import ConnectOptions, NatsConnectFailed, connect
from broker.publisher import Publisher
from broker.sensitive import luhn_valid, redact_json
from broker.telemetry.logfields import redact_secrets
from projections.base import Projection
from projections.checkpoints import SqlCheckpointStore
from projections.replica import MessagesReplica, RoutesReplica, audit, metadata, outbox
from projections.runtime import ProjectionRunner
from tests._wait import await_until
from tests.integration.conftest import ReplicaDb as Db
from tests.integration.conftest import replica_db

pytestmark = pytest.mark.integration

TENANT = "acme"
#: Three Visa numbers ending in 4242 (one written in groups) and one ending in 1111.
VISA_A = "4242424242424242"
VISA_B = "4000056655694242"
VISA_A_GROUPED = "4242 4242 4242 4242"
VISA_C = "4111111111111111"
CARDS = (VISA_A, VISA_B, VISA_A_GROUPED, VISA_C)
#: A wallet keyed by card number, and beside it a key that already reads like a mask.
WALLET: dict[str, Any] = {
    "wallet": {
        VISA_A: {"limit": 100},
        VISA_B: {"limit": 200},
        "[card ****4242]": "a key that was never a card",
        VISA_A_GROUPED: {"limit": 300},
        VISA_C: {"limit": 400},
    }
}
#: What the replica stores: the plain key keeps its name, each masked key is unique.
STORED = {
    "wallet": {
        "[card ****4242]#2": {"limit": 100},
        "[card ****4242]#3": {"limit": 200},
        "[card ****4242]": "a key that was never a card",
        "[card ****4242]#4": {"limit": 300},
        "[card ****1111]": {"limit": 400},
    }
}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """A SQLite file, or a fresh schema of the PostgreSQL at 127.0.0.1:5432."""
    with replica_db(request.param, "cardkeys", tmp_path) as found:
        yield found


def test_the_test_cards_are_distinct_valid_numbers_with_the_same_last_four() -> None:
    digits = [c.replace(" ", "") for c in CARDS]
    assert all(luhn_valid(d) for d in digits)
    assert len({d for d in digits[:2]}) == 2
    assert {d[-4:] for d in digits[:3]} == {"4242"}


def test_redact_json_writes_each_masked_key_once_and_masking_again_changes_nothing() -> None:
    """The JSON text keeps every member under a distinct key (no duplicate names that a
    reader would collapse), and is a fixed point of redaction."""
    body = redact_json(orjson.dumps(WALLET)).value
    members = json.loads(body, object_pairs_hook=lambda pairs: pairs)[0][1]
    assert [name for name, _ in members] == list(STORED["wallet"])
    assert orjson.loads(body) == STORED
    assert redact_json(body).value == body


async def run_until(js: JetStreamContext, projection: Projection, engine: sa.Engine) -> None:
    """Run ``projection`` until it has applied the stream's first message."""
    runner = ProjectionRunner(js, projection, SqlCheckpointStore(engine), batch=4)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))

    async def caught_up() -> bool:
        return runner.stats.last_seq >= 1

    try:
        assert await await_until(caught_up, timeout=30)
    finally:
        stop.set()
        await task


def rows(engine: sa.Engine, table: sa.Table, order: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        query = sa.select(table).order_by(table.c[order])
        return [dict(row) for row in conn.execute(query).mappings()]


def holds_no_card(*found: list[dict[str, Any]]) -> bool:
    dumped = orjson.dumps(found, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    return not any(card in dumped for card in CARDS)


async def test_card_number_keys_that_mask_alike_all_survive_in_the_message_replica(
    publisher: Publisher, db: Db
) -> None:
    """Four card-number keys, three of them masking to ``[card ****4242]`` beside a plain
    key of that very name: the replica row keeps all five members, none holds a number, the
    audit paths name the stored keys, and a rebuild stores the same row."""
    js = publisher.js
    await js.publish(
        f"msg.{TENANT}.wallets.updated",
        orjson.dumps(WALLET),
        headers={"Content-Type": "application/json"},
    )
    projection = MessagesReplica(changes=True, detect_cards=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    await run_until(js, projection, db.engine)

    messages = metadata.tables["replica_messages"]
    [row] = rows(db.engine, messages, "seq")
    assert row["payload_json"] == STORED
    [record] = rows(db.engine, audit, "seq")
    assert record["count"] == 4
    assert [(f["path"], f["last4"], f.get("key")) for f in record["findings"]] == [
        ("/wallet/[card ****4242]#2", "4242", True),
        ("/wallet/[card ****4242]#3", "4242", True),
        ("/wallet/[card ****4242]#4", "4242", True),
        ("/wallet/[card ****1111]", "1111", True),
    ]
    changes = rows(db.engine, outbox, "id")
    assert [c["after"]["payload_json"] for c in changes if c["op"] == "c"] == [STORED]
    assert holds_no_card([row], [record], changes)

    # A rebuild from the stream gives the very same keys.
    await SqlCheckpointStore(db.engine).reset(projection.name, projection.reset)
    await run_until(js, projection, db.engine)
    assert [r["payload_json"] for r in rows(db.engine, messages, "seq")] == [STORED]


async def test_card_number_keys_that_mask_alike_all_survive_in_the_route_replica(
    publisher: Publisher, db: Db
) -> None:
    js = publisher.js
    headers = {"Content-Type": "application/json", "Broker-Event": "RouteDecided"}
    await js.publish(f"route.{TENANT}.billing", orjson.dumps(WALLET), headers=headers)
    projection = RoutesReplica(detect_cards=True)
    with db.engine.begin() as tx:
        projection.setup(tx)
    await run_until(js, projection, db.engine)

    [route] = rows(db.engine, metadata.tables["replica_routes"], "seq")
    assert route["body"] == STORED
    assert holds_no_card([route], rows(db.engine, audit, "seq"))


# --- NATS passwords in URLs ----------------------------------------------------------------

PASSWORD = "pXq@sEcr3tZ"
FRAGMENTS = ("pXq", "sEcr3tZ")


@pytest.fixture
def auth_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that lets in user ``broker`` with :data:`PASSWORD` only."""
    config = f'authorization {{\n  user: "broker"\n  password: {json.dumps(PASSWORD)}\n}}'
    server = NatsServer(ServerSpec(store_dir=tmp_path / "nats", extra_config=config)).start()
    yield server
    server.stop()


def url_with(server: NatsServer, password: str) -> str:
    return f"nats://broker:{password}@{server.url.removeprefix('nats://')}"


def shows_no_password(text: str) -> bool:
    return not any(fragment in text for fragment in FRAGMENTS)


async def test_a_raw_at_in_the_url_password_connects_and_no_log_line_shows_it(
    auth_nats: NatsServer,
) -> None:
    publisher = Publisher([url_with(auth_nats, PASSWORD)], name="test-raw-at")
    with capture_logs(processors=[redact_secrets]) as logs:
        publisher.start()
        try:
            assert await publisher.wait_connected(10)
        finally:
            await publisher.close()
    [connected] = [line for line in logs if line["event"] == "nats_connected"]
    assert connected["server"] == f"***@{auth_nats.url.removeprefix('nats://')}"
    assert shows_no_password(repr(logs))


async def test_the_percent_encoded_password_is_sent_undecoded_and_refused_unshown(
    auth_nats: NatsServer,
) -> None:
    """nats-py does not decode ``%40``: the server gets ``pXq%40sEcr3tZ`` and refuses it;
    the error message names the server without the password."""
    options = ConnectOptions(servers=[url_with(auth_nats, "pXq%40sEcr3tZ")], connect_timeout=3)
    with pytest.raises(NatsConnectFailed) as failure:
        await connect(options, allow_reconnect=False, max_reconnect_attempts=0)
    message = failure.value.message
    assert message.startswith(f"NATS at nats://***@{auth_nats.url.removeprefix('nats://')} ")
    assert "refused the credentials" in message
    assert shows_no_password(message)


def test_a_router_refused_for_its_url_password_logs_why_without_any_of_it(
    auth_nats: NatsServer,
) -> None:
    """``broker router`` as a user runs it, with a wrong password that holds a raw ``@``:
    its log output says the credentials were refused, names the server it waits for, and
    shows no part of the password."""
    wrong = url_with(auth_nats, "pXq@sEcr3tZ-wrong")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_LOG_FORMAT"] = "json"
    command = [sys.executable, "-m", "broker", "router", "--embedder", "hashing"]
    process = subprocess.Popen(
        [*command, "--nats-url", wrong],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not (
            any("refused the credentials" in line for line in seen)
            and any('"router_waiting_for_nats"' in line for line in seen)  # after 5 s
        ):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        process.terminate()
        process.wait(20)
        reader.join(20)
    while not lines.empty():
        seen.append(lines.get())
    refused = [json.loads(line) for line in seen if "refused the credentials" in line]
    host = auth_nats.url.removeprefix("nats://")
    assert refused[0]["error"].startswith(f"NATS at nats://***@{host} refused the credentials")
    [waiting, *_] = [json.loads(line) for line in seen if '"router_waiting_for_nats"' in line]
    assert waiting["servers"] == [f"nats://***@{host}"]
    assert all(shows_no_password(line) for line in seen), seen
