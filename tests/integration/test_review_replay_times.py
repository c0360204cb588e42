"""A replay record's ``time`` is when the stream stored the message, cut (never rounded up)
to the microsecond, whichever form of delivery metadata the server sends."""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.http.replay import _record
from broker.reader import read_messages

pytestmark = pytest.mark.integration


async def test_a_records_time_is_the_stored_time_cut_to_the_microsecond(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(name="TIMES", subjects=["times.>"])
    for i in range(20):
        await js.publish(f"times.{i}", b"x")
    shown = [_record(m)["time"] async for m in read_messages(js, "TIMES")]
    stored = []
    for seq in range(1, 21):  # the server's own RFC 3339 time, in nanoseconds
        answer = await nc.request("$JS.API.STREAM.MSG.GET.TIMES", orjson.dumps({"seq": seq}))
        when = orjson.loads(answer.data)["message"]["time"]  # 2026-...T10:00:00.123456789Z
        whole, _, fraction = when.rstrip("Z").partition(".")
        micros = fraction[:6].ljust(6, "0")
        stored.append(datetime.fromisoformat(f"{whole}.{micros}+00:00").isoformat())
    assert shown == stored


async def test_the_longer_metadata_form_gives_its_own_time_token(nc: Client) -> None:
    """``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.
    <pending>.<token>``: the time is the tenth token, not the eighth of the short form."""
    ns = 1_795_879_288_397_621_896
    reply = f"$JS.ACK.hub.ACCOUNTHASH.TIMES.reader.1.42.7.{ns}.0.token"
    message = Msg(nc, subject="times.a", reply=reply)
    assert message.metadata.sequence.stream == 42  # nats-py reads it as the longer form
    record = _record(message)
    assert (record["stream"], record["seq"]) == ("TIMES", 42)
    assert record["time"] == "2026-11-28T15:21:28.397621+00:00"


@pytest.mark.parametrize(
    ("ns", "shown"),
    [
        (1_795_879_288_000_000_000, "2026-11-28T15:21:28+00:00"),  # as isoformat: no fraction
        (1_795_879_288_000_000_999, "2026-11-28T15:21:28+00:00"),
        (1_795_879_288_999_999_999, "2026-11-28T15:21:28.999999+00:00"),  # never the next second
        (1_795_879_288_000_001_000, "2026-11-28T15:21:28.000001+00:00"),
    ],
)
def test_a_records_time_at_the_edges_of_a_second(ns: int, shown: str) -> None:
    reply = f"$JS.ACK.TIMES.reader.1.42.7.{ns}.0"
    assert _record(Msg(None, subject="times.a", reply=reply))["time"] == shown  # type: ignore[arg-type]
