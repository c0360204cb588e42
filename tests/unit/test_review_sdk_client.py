"""``BrokerClient`` against an in-process stand-in for the broker (``httpx.MockTransport``)
that answers exactly as ``broker.http`` frames its answers: what the client reads, and what
it sends."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from broker.client import BrokerClient, RetryPolicy
from broker.envelope import H_STREAM_LAST_SEQ
from broker.errors import Unavailable
from broker.http.replay import MAX_RESPONSE_BYTES

pytestmark = pytest.mark.unit

BASE = "http://broker.test"


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> BrokerClient:
    client = BrokerClient(BASE)
    client._http = httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(handler))
    return client


def _record(seq: int, value: Any) -> dict[str, Any]:
    return {
        "stream": "MESSAGES",
        "seq": seq,
        "subject": "msg.default.texts",
        "time": None,
        "headers": {"Content-Type": "text/plain; charset=utf-8"},
        "payload_base64": base64.b64encode(b"-").decode(),
        "value": value,
    }


def _replay_server(records: list[dict[str, Any]]) -> Callable[[httpx.Request], httpx.Response]:
    """``GET /v1/streams/MESSAGES/messages`` as ``broker.http.replay`` answers it: NDJSON
    (``orjson.dumps(record) + b"\\n"``) from ``start_seq``, ending after ``limit`` records or
    once the answer holds ``MAX_RESPONSE_BYTES`` bytes."""

    def answer(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params.get("start_seq", "1"))
        left, room = int(request.url.params["limit"]), MAX_RESPONSE_BYTES
        lines = []
        for record in records:
            if record["seq"] < start:
                continue
            lines.append(orjson.dumps(record) + b"\n")
            left, room = left - 1, room - len(lines[-1])
            if left <= 0 or room <= 0:
                break
        last = str(records[-1]["seq"])
        headers = {"content-type": "application/x-ndjson", H_STREAM_LAST_SEQ: last}
        return httpx.Response(200, content=b"".join(lines), headers=headers)

    return answer


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
async def test_replay_reads_a_value_holding_a_unicode_line_separator(separator: str) -> None:
    """A text with U+2028, U+2029 or NEL in it (JSON needs no escape for them, and orjson
    writes none) was cut in two by ``httpx``'s ``aiter_lines``, which splits where
    ``str.splitlines`` does: the replay raised ``Unavailable`` ("not the broker's") at that
    message. Records end at ``\\n`` only."""
    text = f"first line{separator}second line"
    records = [_record(1, "before"), _record(2, text), _record(3, "after")]
    async with _client(_replay_server(records)) as client:
        got = [m async for m in client.replay(decode=True)]
    assert [m.value for m in got] == ["before", text, "after"]


async def test_replay_of_multibyte_text_reads_past_an_answer_the_broker_ended_for_its_size() -> (
    None
):
    """The broker ends an answer once it holds 16 MiB, counted in bytes; the client counted
    the characters of the lines it read, so an answer of multi-byte text (each emoji 4 bytes,
    1 character) ended for its size looked short of both ``page`` and 16 MiB, and was taken
    for the end of the stream: the replay stopped early, silently, without the rest."""
    value = "\U0001f600" * 1_000_000  # 4 MB of UTF-8 a record
    records = [_record(seq, value) for seq in range(1, 9)]
    async with _client(_replay_server(records)) as client:
        got = [m.seq async for m in client.replay(decode=True, page=1000)]
    assert got == list(range(1, 9))


async def test_replay_lines_are_whole_across_chunk_boundaries() -> None:
    """Records arrive in chunks that end anywhere: inside a record, at its newline, or with
    a multi-byte character cut in two."""
    lines = [orjson.dumps(_record(seq, f"é{seq}\U0001f600")) + b"\n" for seq in range(1, 6)]
    body = b"".join(lines)

    async def chunks() -> Any:
        for cut in range(0, len(body), 7):
            yield body[cut : cut + 7]

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "application/x-ndjson", H_STREAM_LAST_SEQ: "5"}
        return httpx.Response(200, content=chunks(), headers=headers)

    async with _client(answer) as client:
        got = [m async for m in client.replay(decode=True)]
    assert [m.value for m in got] == [f"é{seq}\U0001f600" for seq in range(1, 6)]


def _recorder(sent: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        body = {"stream": "MESSAGES", "seq": 1, "duplicate": False, "decision": None}
        return httpx.Response(200, json=body)

    return answer


@pytest.mark.parametrize("name", ["Content-Type", "content-type"])
async def test_route_refuses_a_content_type_header_that_contradicts_content_type(
    name: str,
) -> None:
    """docs/client.md: a header in ``headers=`` that contradicts ``content_type=`` raises
    ``ValueError``. ``publish`` did; ``route`` and ``request`` sent the header's type and
    dropped the argument's without a word (the payload then read as the wrong type)."""
    sent: list[httpx.Request] = []
    async with _client(_recorder(sent)) as client:
        with pytest.raises(ValueError, match="given twice"):
            await client.route(
                "images.in", b"\x89PNG", content_type="image/png", headers={name: "text/plain"}
            )
        with pytest.raises(ValueError, match="given twice"):
            await client.request(
                "images.in", b"\x89PNG", content_type="image/png", headers={name: "text/plain"}
            )
        assert sent == []
        # the same type twice is no contradiction, and a header alone still wins
        await client.route(
            "images.in", b"\x89PNG", content_type="image/png", headers={name: "image/png"}
        )
        await client.route("images.in", b"\x89PNG", headers={name: "image/webp"})
    assert [r.headers["content-type"] for r in sent] == ["image/png", "image/webp"]


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://gateway.test/broker", "http://gateway.test/broker/v1/publish"),
        ("http://gateway.test/broker/", "http://gateway.test/broker/v1/publish"),
        ("http://broker.test:8080", "http://broker.test:8080/v1/publish"),
        ("http://broker.test:8080/", "http://broker.test:8080/v1/publish"),
    ],
)
async def test_publish_stream_goes_to_the_same_path_as_every_other_call(
    monkeypatch: pytest.MonkeyPatch, base_url: str, expected: str
) -> None:
    """A broker behind a path prefix (``http://gateway/broker``): every call went to
    ``/broker/v1/...`` but ``publish_stream`` to ``/broker//v1/publish`` (httpx gives a base
    URL with a path a trailing slash), which a proxy routes elsewhere or refuses."""
    import broker.client
    from broker._h2stream import ConnectionLost

    urls: list[str] = []

    class Recorded:
        def __init__(self, url: str, headers: dict[str, str], **options: Any) -> None:
            urls.append(url)
            self.status = None

        def exchange(self, body: Any) -> Any:
            async def nothing() -> Any:
                raise ConnectionLost("recorded only")
                yield b""

            return nothing()

    async def records() -> Any:
        yield {"data": 1}

    monkeypatch.setattr(broker.client, "DuplexRequest", Recorded)
    async with BrokerClient(base_url, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(Unavailable):
            async for _ in client.publish_stream(records(), subject="s"):
                pass
    assert urls == [f"{expected}?subject=s"]


@pytest.mark.parametrize("call", ["publish", "replay"])
async def test_a_broker_that_does_not_answer_in_time_is_said_so(call: str) -> None:
    """httpx's timeouts carry no text: the error read "cannot reach the broker: " and
    ended there, as the CLI printed it, after a broker (or a proxy) that stopped answering."""

    def silent(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("", request=request)

    async def replay() -> None:
        async for _ in client.replay("MESSAGES"):
            pass

    client = _client(silent)
    client.retry = RetryPolicy(attempts=2, base_delay=0.0)
    with pytest.raises(Unavailable) as caught:
        await (client.publish("texts", "hi") if call == "publish" else replay())
    assert str(caught.value).endswith(
        "cannot reach the broker: no answer within the client's timeout of 30.0 s (ReadTimeout)"
    ), str(caught.value)
