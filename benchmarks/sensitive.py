"""Card-number detection benchmark: what ``BROKER_DETECT_CARD_NUMBERS`` costs, same run.

Two measurements:

* **detection vs parse** -- on one realistic ~1 KB JSON order event *without* a card (two
  timestamps, an amount with a long binary fraction, a phone number, ids, eight items: the
  digit runs a detector has to look at), ``json_may_hold_card(body)`` -- what the
  replica runs for every JSON message -- against raw ``orjson.loads(body)`` of the same
  bytes. Runs alternate (detect, parse, detect, ...) and each side keeps its best of
  ``--repeat``; the ratio is detection time / parse time. For reference, the same for the
  event with a card in it (the full ``redact_json``) and for 1 KB of plain text.
* **replica apply rate** -- ``MessagesReplica.apply`` of ``--messages`` such events in
  batches of 1 024, one transaction per batch, into a fresh SQLite file (and a fresh
  PostgreSQL schema with ``--postgres``), detection off vs on; with detection on also a
  stream where 1 % of the messages hold a card (each one masked and audited). No NATS:
  this is the projection's own cost, the part detection changes. Every round runs each
  configuration once, starting with a different one each round; a first round warms the
  database up and is not counted; each configuration keeps its median events/s.

Usage: ``python benchmarks/sensitive.py [--n 20000] [--repeat 7] [--messages 20000]
[--rounds 3] [--postgres postgresql://postgres@127.0.0.1:5432/test]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.sensitive import json_may_hold_card, redact_json, redact_text  # noqa: E402
from projections.base import Event  # noqa: E402
from projections.checkpoints import create_sql_engine  # noqa: E402
from projections.replica import MessagesReplica, audit, metadata, outbox  # noqa: E402


def order(i: int, card: str | None = None) -> bytes:
    """A ~1 KB order event as a shop would publish it."""
    event: dict[str, Any] = {
        "event_id": f"01J9ZK3V6Q8H4W2N5T7R9X{i:04d}",
        "type": "order.placed",
        "order_id": f"ord_8f2a9c1e4b7d{i:06d}",
        "created_at": 1_717_000_000_123 + i,
        "received_us": 1_717_000_000_123_456 + i,
        "customer": {
            "id": f"cus_{12345 + i}",
            "name": "Jane Doe",
            "email": "jane.doe@example.com",
            "phone": "+44 20 7946 0958",
            "address": {"line1": "221B Baker Street", "city": "London", "zip": "NW1 6XE"},
        },
        "items": [
            {"sku": f"SKU-{n:05d}", "qty": n % 3 + 1, "price": round(19.99 * (n + 1), 2)}
            for n in range(8)
        ],
        "amount": 12345.67 + i / 3,
        "currency": "EUR",
        "payment": {"method": "card", "status": "authorized", "reference": f"pi_3Nq{i:08d}"},
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "note": "Leave the parcel with the neighbour at number 12 if nobody answers.",
    }
    if card is not None:
        event["payment"]["card_number"] = card
    return orjson.dumps(event)


def best(fn: Callable[[], object], n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - began) / n


def alternate(
    pairs: Sequence[tuple[str, Callable[[], object]]], n: int, repeat: int
) -> dict[str, float]:
    """Best seconds per call of each function, runs interleaved."""
    times: dict[str, float] = {name: float("inf") for name, _ in pairs}
    for _ in range(repeat):
        for name, fn in pairs:
            times[name] = min(times[name], best(fn, n))
    return times


def detection(n: int, repeat: int) -> None:
    body = order(1)
    with_card = order(1, card="4242 4242 4242 4242")
    text = (
        b"Hello, please ship order ord_8f2a9c1e4b7d000001 placed at 1717000000123 to "
        b"221B Baker Street, London NW1 6XE; call +44 20 7946 0958 if needed. "
    ) * 7
    text_str = text.decode()
    assert not json_may_hold_card(body)
    assert redact_json(with_card).scan.count == 1
    times = alternate(
        [
            ("detect", lambda: json_may_hold_card(body)),
            ("parse", lambda: orjson.loads(body)),
            ("redact_card", lambda: redact_json(with_card)),
            ("text", lambda: redact_text(text_str)),
        ],
        n,
        repeat,
    )
    print(f"detection on a {len(body)}-byte JSON order event without a card (best of {repeat})")
    print(f"  json_may_hold_card : {times['detect'] * 1e6:8.2f} µs/msg")
    print(f"  orjson.loads       : {times['parse'] * 1e6:8.2f} µs/msg")
    print(f"  ratio detect/parse : {times['detect'] / times['parse']:8.2f}x")
    print(f"  redact_json, {len(with_card)} B with a card : {times['redact_card'] * 1e6:.1f} µs")
    print(f"  redact_text, {len(text)} B of text, no card : {times['text'] * 1e6:.1f} µs")


def events(count: int, card_every: int | None) -> list[Event]:
    now = datetime.now(UTC)
    out = []
    for seq in range(1, count + 1):
        card = "4111-1111-1111-1111" if card_every and seq % card_every == 0 else None
        headers = {"Content-Type": "application/json", "Nats-Msg-Id": f"k{seq}"}
        subject = f"msg.default.orders.s{seq % 64}"
        out.append(Event("MESSAGES", seq, subject, now, headers, order(seq, card)))
    return out


def apply_rate(engine: sa.Engine, replica: MessagesReplica, batch: Sequence[Event]) -> float:
    with engine.begin() as tx:
        replica.setup(tx)
        replica.reset(tx)
    began = time.perf_counter()
    for start in range(0, len(batch), 1024):
        with engine.begin() as tx:
            replica.apply(batch[start : start + 1024], tx)
    return len(batch) / (time.perf_counter() - began)


def replica(label: str, engine: sa.Engine, messages: int, rounds: int) -> None:
    plain = events(messages, None)
    some = events(messages, 100)
    configs = [
        ("off", MessagesReplica(), plain),
        ("on, no cards", MessagesReplica(detect_cards=True), plain),
        ("on, 1 % cards", MessagesReplica(detect_cards=True), some),
    ]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for round_ in range(rounds + 1):  # round 0 warms the database up and is not counted
        turn = round_ % len(configs)  # each round starts with another configuration
        for name, projection, batch in configs[turn:] + configs[:turn]:
            with engine.begin() as tx:  # every round starts from empty tables
                metadata.create_all(tx, tables=[audit, outbox], checkfirst=True)
                tx.execute(audit.delete())
                tx.execute(outbox.delete())
            rate = apply_rate(engine, projection, batch)
            if round_:
                rates[name].append(rate)
    base = statistics.median(rates["off"])
    print(f"replica apply, {label}, {messages} messages, median of {rounds} rounds")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"  detection {name:14s}: {rate:9.0f} events/s  ({rate / base:.2f}x off)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", default=None)
    args = parser.parse_args()
    detection(args.n, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_sql_engine(f"sqlite:///{tmp}/replica.db")
        replica("SQLite", engine, args.messages, args.rounds)
        engine.dispose()
    if args.postgres:
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        admin = create_sql_engine(args.postgres)
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        engine = create_sql_engine(f"{args.postgres}?options=-csearch_path%3D{schema}")
        try:
            replica("PostgreSQL", engine, args.messages, args.rounds)
        finally:
            engine.dispose()
            with admin.begin() as conn:
                conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()


if __name__ == "__main__":
    main()
