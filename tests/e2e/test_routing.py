"""Routing end to end: ``broker serve`` (ingress + router), real agents (SDK instances in
this loop, and agent processes for the kill test), HTTP/2 ``POST /v1/route``."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from broker.agent import Request
from broker.embedded import NatsServer
from broker.routing.events import H_ROUTE, RouteDecided
from broker.routing.load import InstanceLoad
from broker.streams import AGENT_LOAD_BUCKET
from tests._wait import await_until
from tests.e2e._agents import TEXT, Behaviour, manifest, running, spawn
from tests.e2e._broker import BrokerProcess, start_broker

pytestmark = pytest.mark.e2e

LOAD_TTL = 3.0
# ``error_weight: 0``: an agent's reported error rate leaves its load weight alone here, so
# an agent that failed stays in the draw until the cooldown takes it out. (With the default,
# a heartbeat reporting one failure sets the flaky agent's load weight to 0 and the cooldown
# test could wait in vain for its second failure on a slow machine.)
POLICY = """
version: e2e-1
threshold: -1.0
load: {error_weight: 0}
cooldown: {errors: 2, window_s: 60, duration_s: 60}
max_attempts: 3
mirror: {primary: shadow}
"""


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _wav() -> bytes:
    samples = b"\x00\x00" * 800
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.fixture(scope="module")
def broker(
    module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    workdir = tmp_path_factory.mktemp("routing")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    process = start_broker(
        workdir,
        nats_url=module_nats.url,
        args=("--projection-workers", "0", "--routing-policy", str(policy)),
        env={"BROKER_AGENT_LOAD_TTL_SECONDS": str(LOAD_TTL)},
    )
    yield process
    process.stop()


@pytest.fixture
def url(module_nats: NatsServer) -> str:
    return module_nats.url


@pytest_asyncio.fixture
async def nc_js(module_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(module_nats.url)
    yield nc.jetstream()
    await nc.close()


async def route(
    client: httpx.AsyncClient,
    payload: bytes | str,
    *,
    content_type: str = "text/plain",
    subject: str = "tasks.in",
    headers: dict[str, str] | None = None,
    wait: bool = False,
    timeout: float | None = None,
) -> httpx.Response:
    params: dict[str, str] = {"wait": "true"} if wait else {}
    if timeout is not None:
        params["timeout"] = str(timeout)
    body = payload.encode() if isinstance(payload, str) else payload
    return await client.post(
        f"/v1/route/{subject}",
        content=body,
        params=params,
        headers={"content-type": content_type, **(headers or {})},
    )


async def routed_to(
    client: httpx.AsyncClient, agent: str, payload: str | bytes = "hello", **kw: Any
) -> bool:
    """Route probes until ``agent`` gets one (the router has seen it live)."""

    async def chosen() -> bool:
        response = await route(client, payload, **kw)
        return bool(response.status_code == 200 and response.json()["decision"]["agent"] == agent)

    return await await_until(chosen, timeout=15, interval=0.1)


async def test_capability_and_modality_decide_who_gets_images_audio_and_text(
    client: httpx.AsyncClient, url: str, nc_js: JetStreamContext
) -> None:
    """A PNG goes to the agent accepting images, a WAV to the one accepting audio, text to
    the text agent; the decision is stored in the agent's inbox with its scores."""
    ocr = manifest("m-ocr", "Reads the text in photos and scans", content_types=["image/*"])
    ears = manifest("m-ears", "Transcribes speech recordings", content_types=["audio/*"])
    words = manifest("m-words", "Answers written questions")
    async with running(ocr, url), running(ears, url), running(words, url):
        assert await routed_to(client, "m-words", "what is the capital of France?")
        assert await routed_to(client, "m-ocr", _png(), content_type="image/png")  # all live
        assert await routed_to(client, "m-ears", _wav(), content_type="audio/wav")
        image = await route(client, _png(), content_type="image/png")
        audio = await route(client, _wav(), content_type="audio/wav")
        text = await route(client, "what is the capital of France?")
    assert [r.status_code for r in (image, audio, text)] == [200, 200, 200]
    assert image.json()["decision"]["agent"] == "m-ocr"
    assert audio.json()["decision"]["agent"] == "m-ears"
    assert text.json()["decision"]["agent"] == "m-words"
    stored = await nc_js.get_msg("ROUTES", image.json()["decision"]["route_seq"])
    decided = RouteDecided.from_headers(stored.headers or {})
    assert stored.subject == "route.default.m-ocr"
    assert stored.data == _png()
    assert decided.message_seq == image.json()["seq"]
    assert decided.decision.candidates[0].agent == "m-ocr"
    assert decided.decision.policy_version == "e2e-1"
    assert decided.decision.detail


async def test_meaning_picks_the_agent_whose_description_matches(
    client: httpx.AsyncClient, url: str
) -> None:
    billing = manifest(
        "s-billing",
        "Handles invoices, refunds, payments and charges on a customer's bill",
        examples=["I was charged twice this month", "refund my last payment"],
    )
    weather = manifest(
        "s-weather",
        "Forecasts weather: rain, temperature and wind for a city",
        examples=["will it rain in Paris tomorrow", "how cold is it in Oslo"],
    )
    async with running(billing, url), running(weather, url):
        # both live for the router (an agent not yet heartbeating is no candidate)
        assert await routed_to(client, "s-weather", "will it rain in Berlin tomorrow?")
        assert await routed_to(client, "s-billing", "refund the charge on my invoice")
        money = await route(client, "why was my card charged twice for one invoice?")
        rain = await route(client, "is it going to rain in Madrid tomorrow?")
    assert money.json()["decision"]["agent"] == "s-billing"
    assert rain.json()["decision"]["agent"] == "s-weather"
    top = money.json()["decision"]["candidates"][0]
    assert top["agent"] == "s-billing"
    assert all(top["semantic"] >= c["semantic"] for c in money.json()["decision"]["candidates"])


async def test_wait_returns_the_agents_reply_with_its_name(
    client: httpx.AsyncClient, url: str
) -> None:
    echo = manifest("w-echo", "Echoes what it is told")
    async with running(echo, url):
        assert await routed_to(client, "w-echo")
        response = await route(client, "hi there", wait=True, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["broker-agent"] == "w-echo"
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"agent": "w-echo", "attempt": 1, "mirror": False}
    assert int(response.headers["broker-message-seq"]) > 0


async def test_load_shifts_traffic_away_from_a_hot_agent(
    client: httpx.AsyncClient, url: str, nc_js: JetStreamContext
) -> None:
    """Two equal agents; one reports QPS at its limit and a p99 of 900 ms: traffic goes to
    the other, and the decision names the penalties."""
    hot = manifest("l-hot", "Summarises long documents", max_qps=10)
    cool = manifest("l-cool", "Summarises long documents", max_qps=10)
    kv = await nc_js.key_value(AGENT_LOAD_BUCKET)
    async with running(hot, url), running(cool, url):
        assert await routed_to(client, "l-hot", "summarise this")
        assert await routed_to(client, "l-cool", "summarise this")
        overload = InstanceLoad("default", "l-hot", "synthetic", qps=9.5, p99_ms=900.0)

        async def penalised() -> bool:
            await kv.put(overload.key, overload.to_json())
            r = await route(client, "summarise this")
            hot_row = [c for c in r.json()["decision"]["candidates"] if c["agent"] == "l-hot"]
            return bool(hot_row and "p99_over_200ms" in hot_row[0]["penalties"])

        assert await await_until(penalised, timeout=10, interval=0.2)
        chosen = [
            (await route(client, "summarise this")).json()["decision"]["agent"] for _ in range(40)
        ]
        await kv.delete(overload.key)
    assert chosen.count("l-cool") >= 32, chosen


async def test_a_killed_agent_stops_receiving_within_the_ttl(
    client: httpx.AsyncClient, url: str, tmp_path: Path
) -> None:
    """SIGKILL an agent process (no goodbye): routers drop it once its heartbeats are a TTL
    old, and the surviving agent gets everything."""
    spec = manifest("k-victim", "Translates text between languages")
    other = manifest("k-survivor", "Translates text between languages")
    proc = spawn(spec, url, tmp_path / "victim.log")
    try:
        async with running(other, url):
            assert await routed_to(client, "k-victim", "translate bonjour")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed = time.monotonic()

            async def gone() -> bool:
                agents = {
                    (await route(client, "translate bonjour")).json()["decision"]["agent"]
                    for _ in range(8)
                }
                return agents == {"k-survivor"}

            assert await await_until(gone, timeout=LOAD_TTL + 10, interval=0.2)
            elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert elapsed < LOAD_TTL + 3, f"still routed to the dead agent after {elapsed:.1f} s"


async def test_a_failing_agent_is_retried_elsewhere_then_cooled_down(
    client: httpx.AsyncClient, url: str
) -> None:
    # Each agent takes one type the other does not, so that what the test needs is made on
    # purpose, not left to the draw between two idle agents: the steady agent is live before
    # the flaky one can fail (CSV; else the first failures, with nobody to retry on, went to
    # the DLQ), and the flaky agent's second failure is a Markdown request (on a loaded
    # machine the steady one won forty text draws in a row).
    flaky = manifest(
        "c-flaky", "Classifies support tickets by urgency", content_types=[*TEXT, "text/markdown"]
    )
    steady = manifest(
        "c-steady", "Classifies support tickets by urgency", content_types=[*TEXT, "text/csv"]
    )
    failing = Behaviour(reply="c-flaky", fail=True)
    steady_seen = Behaviour(reply="c-steady")
    async with running(flaky, url, failing), running(steady, url, steady_seen):
        assert await routed_to(client, "c-steady", "ticket,urgency", content_type="text/csv")
        # The probes that reach the flaky agent fail there and are retried on the other.
        assert await routed_to(client, "c-flaky", "my order is late")

        async def retried() -> bool:
            return any(r.attempt == 2 and r.route.tried == ("c-flaky",) for r in steady_seen.seen)

        assert await await_until(retried, timeout=10)
        # Markdown has nobody else to be retried on: it fails, and the caller hears so.
        while len(failing.seen) < 2:
            ticket = await route(
                client, "my order is late", content_type="text/markdown", wait=True
            )
            assert ticket.status_code == 502, ticket.text
            assert ticket.json()["error_code"] == "agent_error"

        # Two failures within the window cooled the flaky agent down (once the router that
        # decides has read the second).
        async def cooled() -> bool:
            decided = (await route(client, "my order is late")).json()["decision"]
            rows = [c for c in decided["candidates"] if c["agent"] == "c-flaky"]
            return bool(rows) and "cooldown" in rows[0]["penalties"]

        assert await await_until(cooled, timeout=10)
        after = [(await route(client, "my order is late")).json() for _ in range(10)]
    assert {a["decision"]["agent"] for a in after} == {"c-steady"}
    flaky_rows = [c for a in after for c in a["decision"]["candidates"] if c["agent"] == "c-flaky"]
    assert flaky_rows
    assert all("cooldown" in row["penalties"] for row in flaky_rows)


async def test_canary_header_routes_to_canary_agents_only(
    client: httpx.AsyncClient, url: str
) -> None:
    stable = manifest("y-stable", "Drafts email replies to customers")
    canary = manifest("y-canary", "Drafts email replies to customers", labels={"env": "canary"})
    async with running(stable, url), running(canary, url):
        assert await routed_to(client, "y-canary", "reply to this", headers={"x-env": "canary"})
        assert await routed_to(client, "y-stable", "reply to this")  # both live now
        plain = [(await route(client, "reply to this")).json() for _ in range(10)]
        flagged = [
            (await route(client, "reply to this", headers={"x-env": "canary"})).json()
            for _ in range(10)
        ]
    assert {p["decision"]["agent"] for p in plain} == {"y-stable"}
    assert {f["decision"]["agent"] for f in flagged} == {"y-canary"}


async def test_mirroring_copies_to_the_shadow_without_changing_the_reply(
    client: httpx.AsyncClient, url: str
) -> None:
    primary = manifest("primary", "Extracts named entities from news text")
    shadow = manifest("shadow", "Extracts named entities from news text")
    shadow_seen = Behaviour(reply="shadow")
    async with running(primary, url), running(shadow, url, shadow_seen):
        assert await routed_to(client, "primary", "Acme bought Initech in Paris")
        response = await route(client, "Acme bought Initech in Paris", wait=True, timeout=10)
        seq = int(response.headers["broker-message-seq"])

        async def mirrored() -> bool:
            return any(r.message_seq == seq for r in shadow_seen.seen)

        assert await await_until(mirrored, timeout=10)
    assert response.status_code == 200
    assert response.headers["broker-agent"] == "primary"
    copy = next(r for r in shadow_seen.seen if r.message_seq == seq)
    assert copy.mirror
    assert copy.payload == b"Acme bought Initech in Paris"


async def test_deadline_cancels_the_handler_and_answers_504(
    client: httpx.AsyncClient, url: str, nc_js: JetStreamContext
) -> None:
    slow = manifest("d-slow", "Writes very long reports")
    behaviour = Behaviour(reply="d-slow", delay=30.0, delay_only_with_deadline=True)
    async with running(slow, url, behaviour):
        assert await routed_to(client, "d-slow", "write it")
        started = time.monotonic()
        response = await route(client, "write it", wait=True, timeout=1.5)
        elapsed = time.monotonic() - started
        assert await await_until(lambda: _true(behaviour.cancelled >= 1), timeout=10)
    assert response.status_code == 504
    assert response.json()["error_code"] == "deadline_exceeded"
    assert elapsed < 5
    failed = await nc_js.get_last_msg("ROUTES", "route.default.d-slow.failed")
    assert json.loads((failed.headers or {})["Broker-Failure"])["reason"] == "timeout"


async def _true(value: bool) -> bool:
    return value


async def test_no_qualified_agent_dead_letters_and_wait_says_no_route(
    client: httpx.AsyncClient, nc_js: JetStreamContext
) -> None:
    """Nobody accepts a PDF here: the decision goes to the DLQ with its reason."""
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    plain = await route(client, pdf, content_type="application/pdf")
    waited = await route(client, pdf, content_type="application/pdf", wait=True, timeout=5)
    assert plain.status_code == 200
    assert plain.json()["decision"]["agent"] is None
    assert plain.json()["decision"]["reason"] == "no_candidate"
    assert waited.status_code == 503
    assert waited.json()["error_code"] == "no_route"
    stored = await nc_js.get_msg("DLQ", plain.json()["decision"]["route_seq"])
    assert stored.subject == "dlq.default.route"
    assert json.loads((stored.headers or {})[H_ROUTE])["message_seq"] == plain.json()["seq"]
    # ... and the tenant reads its dead letters back through the replay API
    seq = plain.json()["decision"]["route_seq"]
    replayed = await client.get(f"/v1/streams/DLQ/messages?start_seq={seq}&limit=1")
    assert replayed.status_code == 200, replayed.text
    (record,) = map(json.loads, replayed.text.splitlines())
    assert (record["stream"], record["seq"], record["subject"]) == ("DLQ", seq, stored.subject)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"broker-embedding": "not base64!"}, 422),
        ({"broker-embedding": base64.b64encode(struct.pack("<2f", float("nan"), 1)).decode()}, 422),
        ({"broker-text": "x" * 40_000}, 422),
        ({"broker-embedding-model": "two words"}, 422),
    ],
)
async def test_bad_routing_headers_are_refused_and_nothing_is_stored(
    client: httpx.AsyncClient, nc_js: JetStreamContext, headers: dict[str, str], status: int
) -> None:
    before = (await nc_js.stream_info("MESSAGES")).state.last_seq
    response = await route(client, "hello", headers=headers)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error_code", "message"}
    assert (await nc_js.stream_info("MESSAGES")).state.last_seq == before


@pytest.mark.parametrize(
    ("params", "problem"),
    [({"wait": "maybe"}, "wait"), ({"timeout": "-1"}, "timeout"), ({"timeout": "nan"}, "timeout")],
)
async def test_bad_route_parameters_are_refused(
    client: httpx.AsyncClient, params: dict[str, str], problem: str
) -> None:
    response = await client.post("/v1/route/tasks.in", content=b"x", params=params)
    assert response.status_code == 422
    assert problem in response.json()["message"]


async def test_simulate_replays_decisions_under_another_policy(
    client: httpx.AsyncClient, url: str, tmp_path: Path, module_nats: NatsServer
) -> None:
    """The same policy reproduces the recorded decisions; a policy that mirrors nothing
    but sends everything to a fallback changes them, and says where they would go."""
    alpha = manifest("z-alpha", "Plans travel itineraries and bookings")
    async with running(alpha, url):
        assert await routed_to(client, "z-alpha", "plan a trip to Rome")
    same = tmp_path / "same.yaml"
    same.write_text(POLICY)
    other = tmp_path / "other.yaml"
    other.write_text("version: other-2\nthreshold: 0.99\nrequire_live: false\n")
    csv_path = tmp_path / "changes.csv"

    def run(policy: Path, *extra: str) -> dict[str, Any]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker",
                "routes",
                "simulate",
                "--policy",
                str(policy),
                "--nats-url",
                module_nats.url,
                "-o",
                "json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    unchanged = run(same)
    changed = run(other, "--csv", str(csv_path))
    assert unchanged["decisions"] > 0
    assert changed["decisions"] == unchanged["decisions"]
    assert changed["changed"] > 0
    assert changed["policy_version"] == "other-2"
    assert csv_path.read_text().splitlines()[0].startswith("tenant,message_seq")
    # Decisions are reproducible: the policy that made them makes them again.
    assert unchanged["changed"] == 0, unchanged


async def test_the_client_routes_and_waits_for_replies(broker: BrokerProcess, url: str) -> None:
    """``BrokerClient.route`` returns the decision, ``request`` the reply; a message nobody
    takes raises NoRoute at once (not retried into a duplicate)."""
    from broker.client import BrokerClient
    from broker.errors import NoRoute

    helper = manifest("q-helper", "Answers questions about opening hours")
    reply_key = "client-request-sent-again"
    async with BrokerClient(broker.base_url) as client, running(helper, url):

        async def live() -> bool:
            return (await client.route("tasks.in", "when do you open?")).agent == "q-helper"

        assert await await_until(live, timeout=15, interval=0.1)
        routed = await client.route("tasks.in", {"q": "open on Sunday?"}, intent="handle")
        reply = await client.request(
            "tasks.in", "are you open on Sunday?", timeout=10, key=reply_key
        )
        sent_again = await client.request(  # as after a lost connection: the same key
            "tasks.in", "are you open on Sunday?", timeout=10, key=reply_key
        )
        started = time.monotonic()
        with pytest.raises(NoRoute):
            await client.request("tasks.in", b"%PDF-1.4\n%%EOF\n", content_type="application/pdf")
        refused_in = time.monotonic() - started
    assert routed.agent == "q-helper"
    assert routed.decision is not None
    assert routed.decision["capability"] == "handle"
    assert reply.agent == "q-helper"
    assert reply.json()["agent"] == "q-helper"
    assert reply.message_seq > routed.seq
    assert (reply.duplicate, sent_again.duplicate) == (False, True)
    assert (sent_again.json(), sent_again.message_seq) == (reply.json(), reply.message_seq)
    assert refused_in < 5


async def test_a_vector_from_another_model_is_refused_and_one_from_the_routers_is_used(
    broker: BrokerProcess, url: str
) -> None:
    """The router embeds with all-MiniLM-L6-v2 (384 numbers): a client vector of the same
    dimension made by another model is refused with both names, not compared as if it were
    the router's; the same vector said to be the router's model's (or not said) routes by
    it."""
    from broker.client import BrokerClient
    from broker.routing.embedder import load_embedder

    helper = manifest("m-helper", "Answers questions about parcel deliveries")
    vector = load_embedder("minilm").embed(["where is my parcel?"])[0].tolist()
    async with BrokerClient(broker.base_url) as client, running(helper, url):

        async def live() -> bool:
            return (await client.route("tasks.in", "my parcel is late")).agent == "m-helper"

        assert await await_until(live, timeout=15, interval=0.1)
        other = await client.route(
            "tasks.in", "?", embedding=vector, embedding_model="BAAI/bge-small-en-v1.5"
        )
        ours = await client.route(
            "tasks.in",
            "?",
            embedding=vector,
            embedding_model="sentence-transformers/all-MiniLM-L6-v2",
        )
        unnamed = await client.route("tasks.in", "?", embedding=vector)
    assert other.decision is not None
    assert other.agent is None
    assert "'BAAI/bge-small-en-v1.5'" in other.decision["detail"]
    assert "minilm-l6" in other.decision["detail"]
    assert ours.agent == "m-helper"
    assert ours.decision is not None
    assert unnamed.decision is not None
    semantic = unnamed.decision["candidates"][0]["semantic"]
    assert semantic > 0.3  # the vector means "parcel" to the router
    assert ours.decision["candidates"][0]["semantic"] == pytest.approx(semantic, abs=1e-6)


@pytest.mark.parametrize(
    ("model", "used"), [("BAAI/bge-small-en-v1.5", False), ("all-MiniLM-L6-v2", True)]
)
async def test_a_manifest_vector_counts_only_when_it_is_the_routers_models(
    client: httpx.AsyncClient, url: str, model: str, used: bool
) -> None:
    """An agent registered through the API with a vector that means "weather" to the
    router's model but a description about parcels: the vector is the agent's meaning only
    when the manifest says the router's model made it; otherwise its description is."""
    from broker.routing.embedder import load_embedder

    question = "will it rain in Oslo tomorrow?"
    spec = manifest(f"m-vector-{int(used)}", "Answers questions about parcel deliveries")
    vector = load_embedder("minilm").embed([question])[0].tolist()
    spec["embedding"] = {"vector": vector, "model": model}
    async with running(spec, url):
        assert await routed_to(client, spec["name"], question)
        response = await route(client, question)
        stored = await client.get(f"/v1/agents/{spec['name']}")
    assert stored.status_code == 200, stored.text
    assert stored.json()["manifest"]["embedding"]["model"] == model
    (top,) = response.json()["decision"]["candidates"]
    assert (top["semantic"] > 0.9) is used, top


class FailsFirstAttempt(Behaviour):
    """Fails attempt 1 of every message (with ``error``), answers the rest."""

    def __init__(self, reply: str, error: Exception) -> None:
        super().__init__(reply=reply)
        self.error = error

    async def __call__(self, request: Request) -> Any:
        self.seen.append(request)
        if request.attempt == 1:
            raise self.error
        return {"agent": self.reply, "attempt": request.attempt}


async def test_when_no_other_agent_is_left_to_try_wait_says_agent_error(
    client: httpx.AsyncClient, url: str
) -> None:
    """A lone agent that fails: the caller learns the agent failed (502, with its error),
    not that nobody could take the message (503 no_route)."""
    lonely = manifest("f-lonely", "Converts recipes between metric and imperial units")
    async with running(lonely, url, Behaviour(reply="f-lonely", fail=True)):
        assert await routed_to(client, "f-lonely", "how many grams is a cup of flour")
        response = await route(client, "how many grams is a cup of flour", wait=True, timeout=10)
    assert response.status_code == 502, response.text
    assert response.json()["error_code"] == "agent_error"
    assert "this agent always fails" in response.json()["message"]


async def test_a_handlers_own_timeout_is_an_error_and_retried_not_a_deadline(
    client: httpx.AsyncClient, url: str, nc_js: JetStreamContext
) -> None:
    """A handler whose own call timed out raises TimeoutError: that is its failure (retried
    elsewhere), not the broker's deadline (504, never retried)."""
    own_timeout = TimeoutError("the upstream call timed out")
    agents = [manifest(f"o-{n}", "Looks up parcel tracking numbers") for n in ("one", "two")]
    behaviours = [FailsFirstAttempt(a["name"], own_timeout) for a in agents]
    async with running(agents[0], url, behaviours[0]), running(agents[1], url, behaviours[1]):
        assert await routed_to(client, "o-one", "where is parcel 123")
        assert await routed_to(client, "o-two", "where is parcel 123")
        response = await route(client, "where is parcel 123", wait=True, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["attempt"] == 2
    other = "o-one" if response.json()["agent"] == "o-two" else "o-two"
    failure = await nc_js.get_last_msg("ROUTES", f"route.default.{other}.failed")
    assert json.loads((failure.headers or {})["Broker-Failure"])["reason"] == "error"


async def test_a_failure_that_could_not_be_recorded_runs_again_instead_of_vanishing(
    client: httpx.AsyncClient, url: str
) -> None:
    """The agent could not append RouteFailed (NATS away for a moment): it hands the message
    back, runs it again, records the failure then, and the router retries it elsewhere."""
    agents = [manifest(f"n-{n}", "Checks whether a postcode is valid") for n in ("one", "two")]
    behaviours = [FailsFirstAttempt(a["name"], RuntimeError("boom")) for a in agents]
    async with (
        running(agents[0], url, behaviours[0]) as (first, _),
        running(agents[1], url, behaviours[1]) as (second, _),
    ):
        assert await routed_to(client, "n-one", "is SW1A 1AA real")
        assert await routed_to(client, "n-two", "is SW1A 1AA real")
        # the probes above fail too, and their failures may still be being recorded: only
        # this request's payload arms the lost append (probes use another)
        payload = "is EC1A 1BB real"
        lost_appends = 0
        for agent in (first, second):  # each agent's next RouteFailed append fails, once
            assert agent._js is not None
            append = agent._js.publish
            armed = [True]

            async def failing_once(
                subject: str,
                *args: Any,
                _append: Any = append,
                _armed: list[bool] = armed,
                **kwargs: Any,
            ) -> Any:
                nonlocal lost_appends
                mine = bool(args) and args[0] == payload.encode()
                if subject.endswith(".failed") and mine and _armed[0]:
                    _armed[0] = False
                    lost_appends += 1
                    raise nats.errors.TimeoutError
                return await _append(subject, *args, **kwargs)

            agent._js.publish = failing_once  # type: ignore[method-assign]
        response = await route(client, payload, wait=True, timeout=15)
    assert response.status_code == 200, response.text
    assert response.json()["attempt"] == 2
    assert lost_appends == 1
    seq = int(response.headers["broker-message-seq"])
    first_tries = [r for b in behaviours for r in b.seen if r.message_seq == seq and r.attempt == 1]
    assert len(first_tries) == 2  # ran again after the failure went unrecorded


class FlakyLoadSource:
    """A GPU probe that fails its first calls (as a broken ``nvidia-smi`` might)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def gpu(self) -> tuple[float | None, float | None]:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("nvidia-smi: driver not loaded")
        return None, None


async def test_heartbeats_go_on_after_the_load_source_fails(
    client: httpx.AsyncClient, url: str
) -> None:
    """A failing GPU probe costs the GPU numbers, not the heartbeat (without beats every
    router drops the instance)."""
    probe = FlakyLoadSource(failures=2)
    spec = manifest("h-steady", "Formats phone numbers in E.164")
    async with running(spec, url, load_source=probe):
        assert await routed_to(client, "h-steady", "+44 20 7946 0958 please")
        # ... and it goes on beating after the failed probes
        assert await await_until(lambda: _true(probe.calls > probe.failures + 2), timeout=10)


async def test_route_takes_the_headers_publish_takes(client: httpx.AsyncClient) -> None:
    """``Expected-Last-Subject-Sequence`` guards a routed append, and a binary-mode
    CloudEvent's ``ce-id`` (within its ``ce-source``) is its idempotency key, as on
    ``POST /v1/publish``."""
    stale = await route(
        client, "hello", subject="guarded.x", headers={"expected-last-subject-sequence": "999"}
    )
    assert stale.status_code == 409, stale.text
    event = {"ce-specversion": "1.0", "ce-id": "route-ce-1", "ce-source": "/t", "ce-type": "t"}
    first = await route(client, "hello", subject="events.x", headers=event)
    again = await route(client, "hello", subject="events.x", headers=event)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert (again.json()["seq"], again.json()["duplicate"]) == (first.json()["seq"], True)


# --- a retried wait=true request gets the answer stored for the first --------------------------


async def test_a_retried_request_gets_the_stored_reply_without_running_it_again(
    client: httpx.AsyncClient, url: str, nc_js: JetStreamContext
) -> None:
    echo = manifest("r-echo", "Repeats the weather report back")
    key = {"idempotency-key": "retry-stored-reply"}
    async with running(echo, url) as (_, behaviour):
        assert await routed_to(client, "r-echo", "repeat the weather report")
        first = await route(client, "repeat the weather report", wait=True, headers=key)
        again = await route(client, "repeat the weather report", wait=True, headers=key)
        runs = [
            r for r in behaviour.seen if r.message_seq == int(first.headers["broker-message-seq"])
        ]
    assert first.status_code == 200, first.text
    assert again.status_code == 200, again.text
    assert again.content == first.content
    assert again.headers["broker-message-seq"] == first.headers["broker-message-seq"]
    assert again.headers["broker-agent"] == "r-echo"
    assert again.headers["broker-duplicate"] == "true"
    assert "broker-duplicate" not in first.headers
    assert len(runs) == 1
    seq = int(first.headers["broker-message-seq"])
    stored = await nc_js.get_last_msg("ROUTES", f"route.default.r-echo.reply.{seq}")
    assert stored.data == first.content
    assert (stored.headers or {})["Broker-Event"] == "RouteReplied"


async def test_a_request_retried_after_its_connection_dropped_waits_for_the_reply(
    client: httpx.AsyncClient, url: str
) -> None:
    """The first caller gives up (its HTTP/2 stream is reset) while the agent works; the
    retry, with the same key, gets the reply when the agent finishes, and it ran once."""
    slow = manifest("r-slow", "Compiles the quarterly tax filing")
    behaviour = Behaviour(reply="r-slow", delay=3.0)
    key = {"idempotency-key": "retry-after-drop"}
    async with running(slow, url, behaviour):
        assert await routed_to(client, "r-slow", "compile the tax filing")  # other probes
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/route/tasks.in",
                content=b"compile the filing",
                params={"wait": "true", "timeout": "20"},
                headers={"content-type": "text/plain", **key},
                timeout=1.0,  # the ingress has stored it long before (a loaded runner too)
            )
        retried = await route(client, "compile the filing", wait=True, timeout=20, headers=key)
        ran = [r for r in behaviour.seen if r.payload == b"compile the filing"]
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"agent": "r-slow", "attempt": 1, "mirror": False}
    assert retried.headers["broker-duplicate"] == "true"
    assert len(ran) == 1


async def test_a_retried_request_nobody_qualifies_for_gets_the_same_error(
    client: httpx.AsyncClient, nc_js: JetStreamContext
) -> None:
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    key = {"idempotency-key": "retry-no-route"}
    first = await route(client, pdf, content_type="application/pdf", wait=True, headers=key)
    again = await route(client, pdf, content_type="application/pdf", wait=True, headers=key)
    assert (first.status_code, again.status_code) == (503, 503)
    assert again.json() == first.json()
    answer = await nc_js.get_last_msg("ROUTES", "route.default.-.error.*")
    assert (answer.headers or {})["Broker-Error"] == "no_route"
    assert json.loads(answer.data) == first.json()


async def test_a_key_first_routed_without_wait_is_409_with_wait(
    client: httpx.AsyncClient, url: str
) -> None:
    """Nobody asked for the first one's reply, so none is stored to answer with."""
    echo = manifest("r-nowait", "Files expense receipts")
    key = {"idempotency-key": "retry-without-wait"}
    async with running(echo, url):
        assert await routed_to(client, "r-nowait", "file this receipt")
        first = await route(client, "file this receipt", headers=key)
        again = await route(client, "file this receipt", wait=True, timeout=5, headers=key)
    assert first.status_code == 200, first.text
    assert again.status_code == 409, again.text
    assert again.json()["error_code"] == "already_routed"
    assert "without wait=true" in again.json()["message"]


async def test_a_request_retried_past_its_deadline_answers_504_at_once(
    client: httpx.AsyncClient, url: str
) -> None:
    slow = manifest("r-late", "Renders feature-length films")
    behaviour = Behaviour(reply="r-late", delay=30.0, delay_only_with_deadline=True)
    key = {"idempotency-key": "retry-past-deadline"}
    async with running(slow, url, behaviour):
        assert await routed_to(client, "r-late", "render the film")
        first = await route(client, "render the film", wait=True, timeout=1.0, headers=key)
        started = time.monotonic()
        again = await route(client, "render the film", wait=True, timeout=20, headers=key)
        elapsed = time.monotonic() - started
    assert (first.status_code, again.status_code) == (504, 504)
    assert again.json()["error_code"] == "deadline_exceeded"
    assert elapsed < 5


async def test_an_agent_told_not_to_store_replies_only_sends_them(
    client: httpx.AsyncClient, url: str, nc_js: JetStreamContext
) -> None:
    quiet = manifest("r-unstored", "Summarises meeting minutes")
    async with running(quiet, url, store_replies=False):
        assert await routed_to(client, "r-unstored", "summarise the minutes")
        first = await route(client, "summarise the minutes", wait=True, timeout=10)
    assert first.status_code == 200, first.text
    with pytest.raises(nats.js.errors.NotFoundError):
        await nc_js.get_last_msg("ROUTES", "route.default.r-unstored.reply.*")


async def test_deleting_an_agent_answers_the_callers_its_inbox_still_held(
    client: httpx.AsyncClient, url: str, broker: BrokerProcess, tmp_path: Path
) -> None:
    """An agent whose one instance was killed (its heartbeat still fresh, so routers still
    choose it) gets two waiting callers' messages; it is then deleted: with nobody else
    taking Markdown, both hear ``agent_error`` with the reason within seconds, not at their
    deadline (before, their messages waited in its inbox for an instance)."""
    spec = manifest("g-gone", "Proofreads Markdown documents", content_types=["text/markdown"])
    proc = spawn(spec, url, tmp_path / "g-gone.log")
    try:
        assert await routed_to(client, "g-gone", "# title", content_type="text/markdown")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        calls = [
            asyncio.create_task(
                route(client, "# title", content_type="text/markdown", wait=True, timeout=30)
            )
            for _ in range(2)
        ]
        await asyncio.sleep(1.0)  # decided for it, within its heartbeat's TTL
        deleted_at = time.monotonic()
        assert (await client.delete("/v1/agents/g-gone")).status_code == 200
        answers = [(await call, time.monotonic() - deleted_at) for call in calls]
    finally:
        if proc.poll() is None:
            proc.kill()
    for response, after in answers:
        assert response.status_code == 502, (response.text, broker.log_tail(40))
        assert response.json()["error_code"] == "agent_error"
        assert "'g-gone' was deregistered" in response.json()["message"]
        assert after < 10, after
