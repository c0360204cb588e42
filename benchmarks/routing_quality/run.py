"""Routing-quality evaluation, end to end through the real broker (issue 10).

Starts ``broker serve`` (its own embedded NATS, a temporary data directory, free ports, a
routing policy with ``require_live: false`` so no agent process has to run) or uses
``--url``; registers every agent of agents.yaml with ``PUT /v1/agents/{name}``; sends every
request of requests.yaml through ``POST /v1/route/{subject}`` over HTTP/2; then reads the
RouteDecided events back from the ROUTES stream (replay API) and compares the agent each
one names with the request's label.

Prints top-1 (and top-3, from the decision's candidates) accuracy, accuracy per modality
and on the hard requests, and the confusion pairs; ``--json FILE`` writes all of it with
one row per request.

Usage:
    .venv/bin/python benchmarks/routing_quality/run.py
    .venv/bin/python benchmarks/routing_quality/run.py \
        --embedder sentence-transformers:/models/all-MiniLM-L6-v2
    .venv/bin/python benchmarks/routing_quality/run.py --baseline-minilm /models/all-MiniLM-L6-v2
    .venv/bin/python benchmarks/routing_quality/run.py --check        # the dataset only
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks._serve import Serve, ServeError, start_serve  # noqa: E402
from benchmarks.routing_quality import baselines  # noqa: E402
from benchmarks.routing_quality.dataset import (  # noqa: E402
    REQUESTS_FILE,
    Dataset,
    Request,
    load,
    problems,
)
from benchmarks.routing_quality.scoring import Outcome, Summary  # noqa: E402

SUBJECT_PREFIX = "eval"
ROUTE_EVENT = "RouteDecided"
DEFAULT_POLICY = "# written by benchmarks/routing_quality/run.py\nrequire_live: false\n"


class EvalError(Exception):
    """The evaluation cannot go on; the message says what the broker answered."""


# --------------------------------------------------------------------------- the broker


def start_broker(workdir: Path, policy: Path, embedder: str | None) -> Serve:
    """``python -m broker serve`` on a free port with its own embedded NATS under workdir."""
    env = {"BROKER_ROUTING_POLICY": str(policy), "BROKER_LOG_LEVEL": "info"}
    if embedder:
        env["BROKER_ROUTING_EMBEDDER"] = embedder
    return start_serve(workdir, ["--projection-workers", "0"], env=env, new_session=True)


# --------------------------------------------------------------------------- the API calls


def _error(response: httpx.Response, what: str) -> EvalError:
    return EvalError(f"{what}: HTTP {response.status_code} {response.text[:300]}")


def register(client: httpx.Client, dataset: Dataset) -> None:
    for manifest in dataset.agents:
        response = client.put(
            f"/v1/agents/{manifest['name']}",
            content=orjson.dumps(manifest),
            headers={"content-type": "application/json"},
        )
        if response.status_code not in (200, 201):
            raise _error(response, f"PUT /v1/agents/{manifest['name']}")


def _route(
    client: httpx.Client, subject: str, body: bytes, headers: dict[str, str]
) -> dict[str, Any]:
    response = client.post(
        f"/v1/route/{subject}", content=body, headers=headers, params={"wait": "false"}
    )
    if response.status_code == 404 and "route" not in response.text:
        raise _error(response, "POST /v1/route is not served by this broker")
    if response.status_code not in (200, 202):  # 202: appended, no decision in time
        raise _error(response, f"POST /v1/route/{subject}")
    answer: dict[str, Any] = response.json()
    return answer


def warm_up(client: httpx.Client, dataset: Dataset, run_id: str, timeout: float) -> int:
    """Wait until the router knows the last agent registered (so, in stream order, all).

    Sends probes that ask for that agent's first capability by Broker-Intent, until a
    decision names it: returns how many were sent, negated when ``timeout`` passed first
    (the run goes on, with a warning). Probes are not scored. When no probe got any
    decision at all the router is not working, and there is nothing to score: EvalError.
    """
    last = dataset.agents[-1]
    capability = last["capabilities"][0]
    content_type = (capability.get("content_types") or ["text/plain"])[0]
    deadline = time.monotonic() + timeout
    attempt = 0
    decided = False
    while True:
        attempt += 1
        headers = {
            "content-type": content_type,
            "broker-intent": capability["action"],
            "idempotency-key": f"{run_id}.warmup.{attempt}",
        }
        answer = _route(client, f"{SUBJECT_PREFIX}.warmup", b"{}", headers)
        decided = decided or answer.get("decision") is not None
        if (answer.get("decision") or {}).get("agent") == last["name"]:
            return attempt
        if time.monotonic() >= deadline:
            if not decided:
                raise EvalError(
                    f"the router decided none of {attempt} probes in {timeout:.0f} s "
                    "(POST /v1/route answered without a decision): is it running?"
                )
            return -attempt
        time.sleep(0.25)


@dataclass
class Sent:
    request: Request
    seq: int | None
    decision: dict[str, Any] | None
    error: str | None = None
    stored: dict[str, Any] | None = field(default=None)


def send_all(client: httpx.Client, dataset: Dataset, run_id: str) -> list[Sent]:
    sent: list[Sent] = []
    for request in dataset.requests:
        headers = {**request.headers(), "idempotency-key": f"{run_id}.{request.id}"}
        try:
            answer = _route(client, f"{SUBJECT_PREFIX}.{request.id}", request.body, headers)
        except EvalError as e:
            sent.append(Sent(request, None, None, str(e)))
            continue
        sent.append(Sent(request, answer.get("seq"), answer.get("decision")))
    return sent


def _route_records(client: httpx.Client, since: datetime) -> list[dict[str, Any]]:
    """Every RouteDecided stored in ROUTES since ``since`` (replay API, NDJSON pages)."""
    records: list[dict[str, Any]] = []
    params: dict[str, str | int] = {"start_time": since.isoformat(), "limit": 1000}
    while True:
        response = client.get("/v1/streams/ROUTES/messages", params=params)
        if response.status_code != 200:
            raise _error(response, "GET /v1/streams/ROUTES/messages")
        page = [orjson.loads(line) for line in response.content.splitlines() if line.strip()]
        records += page
        if len(page) < 1000:
            return records
        params = {"start_seq": page[-1]["seq"] + 1, "limit": 1000}


def _stored_decision(record: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(message_seq, the Broker-Route decision) of a RouteDecided record; None otherwise."""
    headers = {k.lower(): v for k, v in (record.get("headers") or {}).items()}
    if headers.get("broker-event") != ROUTE_EVENT or "broker-route" not in headers:
        return None
    route: dict[str, Any] = orjson.loads(headers["broker-route"])
    if route.get("agent") is None:
        route["agent"] = str(record.get("subject", "")).rsplit(".", 1)[-1] or None
    return int(route["message_seq"]), route


def collect(client: httpx.Client, sent: list[Sent], since: datetime, timeout: float) -> None:
    """Attach the first (non-mirror, lowest attempt) stored RouteDecided to each request."""
    by_seq = {s.seq: s for s in sent if s.seq is not None}
    # A decision naming an agent, or none in time (the router may still decide): wait for
    # those. A decision naming nobody went to the DLQ, not to ROUTES.
    expected = {
        s.seq
        for s in sent
        if s.seq is not None and (s.decision is None or s.decision.get("agent") is not None)
    }
    deadline = time.monotonic() + timeout
    while True:
        for record in _route_records(client, since):
            found = _stored_decision(record)
            if found is None or found[0] not in by_seq or found[1].get("mirror"):
                continue
            entry = by_seq[found[0]]
            if entry.stored is None or found[1].get("attempt", 1) < entry.stored.get("attempt", 1):
                entry.stored = found[1]
        missing = {seq for seq in expected if by_seq[seq].stored is None}
        if not missing or time.monotonic() >= deadline:
            return
        time.sleep(0.25)


# --------------------------------------------------------------------------- scoring


def _top3(decision: dict[str, Any] | None) -> tuple[str, ...]:
    candidates = (decision or {}).get("candidates") or []
    ranked = sorted(candidates, key=lambda c: -float(c.get("score") or 0.0))
    agents: list[str] = []
    for candidate in ranked:
        if candidate.get("agent") and candidate["agent"] not in agents:
            agents.append(candidate["agent"])
    return tuple(agents[:3])


def outcomes(sent: list[Sent]) -> list[Outcome]:
    result = []
    for s in sent:
        answered = (s.decision or {}).get("agent")
        stored = (s.stored or {}).get("agent")
        reason = (s.stored or s.decision or {}).get("reason")
        result.append(
            Outcome.of(
                s.request,
                stored if s.stored is not None else answered,
                _top3(s.decision),
                answered=answered,
                stored=stored,
                in_routes=s.stored is not None,
                reason=reason,
                capability=(s.stored or s.decision or {}).get("capability"),
                seq=s.seq,
                error=s.error,
            )
        )
    return result


def consistency(sent: list[Sent]) -> dict[str, Any]:
    """How the answers and the stored events agree (they should, always)."""
    answered = [s for s in sent if (s.decision or {}).get("agent") is not None]
    stored = [s for s in sent if s.stored is not None]
    agree = [s for s in stored if (s.decision or {}).get("agent") == s.stored.get("agent")]  # type: ignore[union-attr]
    reasons = Counter(str((s.stored or s.decision or {}).get("reason")) for s in sent)
    seen = {c.get("agent") for s in sent for c in (s.decision or {}).get("candidates") or [] if c}
    return {
        "sent": len(sent),
        "errors": [s.error for s in sent if s.error],
        "answered_with_agent": len(answered),
        "stored_in_routes": len(stored),
        "answer_equals_stored": len(agree),
        "answered_but_not_stored": [s.request.id for s in answered if s.stored is None],
        "reasons": dict(reasons),
        "agents_seen_in_candidates": len(seen - {None}),
    }


# --------------------------------------------------------------------------- main


def _print_dataset(dataset: Dataset) -> None:
    modalities = Counter(r.modality.value for r in dataset.requests)
    bare = sum(1 for r in dataset.requests if r.payload_kind and not r.text)
    print(
        f"dataset: {len(dataset.agents)} agents, {len(dataset.requests)} requests "
        f"({', '.join(f'{m} {n}' for m, n in sorted(modalities.items()))}); "
        f"{sum(r.hard for r in dataset.requests)} hard, {bare} binary without Broker-Text, "
        f"{sum(1 for r in dataset.requests if r.intent)} with Broker-Intent"
    )


def run_broker_eval(args: argparse.Namespace, dataset: Dataset) -> tuple[Summary, dict[str, Any]]:
    run_id = uuid.uuid4().hex[:12]
    broker: Serve | None = None
    log_tail = ""
    with tempfile.TemporaryDirectory(prefix="routing-quality-") as tmp:
        workdir = Path(tmp)
        try:
            if args.url:
                url = args.url.rstrip("/")
                print(
                    "note: with --url the broker keeps earlier traffic; "
                    "a fresh broker (no --url) gives reproducible numbers"
                )
                if args.embedder:
                    print("note: --embedder is ignored with --url (the broker is already set up)")
            else:
                policy = args.policy or workdir / "policy.yaml"
                if args.policy is None:
                    policy.write_text(DEFAULT_POLICY)
                broker = start_broker(workdir, policy, args.embedder)
                try:
                    broker.wait_ready(args.startup_timeout)
                except ServeError as e:
                    raise EvalError(str(e)) from None
                url = broker.url
            with httpx.Client(
                base_url=url, http1=url.startswith("https"), http2=True, timeout=args.timeout
            ) as client:
                register(client, dataset)
                probes = warm_up(client, dataset, run_id, args.warmup_timeout)
                if probes < 0:
                    print(
                        "warning: the router did not pick the last agent for a probe asking "
                        "for it by intent; it may not know every agent yet"
                    )
                since = datetime.now(UTC)
                began = time.perf_counter()
                sent = send_all(client, dataset, run_id)
                elapsed = time.perf_counter() - began
                collect(client, sent, since, args.collect_timeout)
        except EvalError as e:
            if broker is None:
                raise
            raise EvalError(f"{e}\nthe broker's log ends with:\n{broker.log_tail(12)}") from None
        finally:
            if broker is not None:
                log_tail = broker.log_tail(40)
                broker.stop()
    label = f"broker ({args.embedder or 'default embedder'})"
    info = {
        "url": url,
        "embedder": args.embedder or "default",
        "policy": str(args.policy) if args.policy else DEFAULT_POLICY,
        "warm": probes > 0,
        "warmup_probes": abs(probes),
        "seconds_sending": round(elapsed, 3),
        **consistency(sent),
        "broker_log_tail": log_tail,
    }
    return Summary(label, outcomes(sent)), info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Labelled routing-quality evaluation: register the agents of agents.yaml, route "
            "every request of requests.yaml through POST /v1/route, and score the stored "
            "RouteDecided agent against the label."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", help="use this running broker instead of starting one")
    parser.add_argument(
        "--requests",
        type=Path,
        default=REQUESTS_FILE,
        help="the labelled requests to score (dev_requests.yaml: the dev set, for tuning)",
    )
    parser.add_argument(
        "--embedder",
        help="BROKER_ROUTING_EMBEDDER for the broker started here, "
        "e.g. sentence-transformers:/models/all-MiniLM-L6-v2 (default: the built-in one)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        help="routing policy YAML (BROKER_ROUTING_POLICY); default: one with require_live: false",
    )
    parser.add_argument("--json", type=Path, help="write the full result as JSON to this file")
    parser.add_argument(
        "--baseline-minilm",
        metavar="PATH",
        help="also score plain nearest-description cosine with this sentence-transformers "
        "model on the request text alone (needs sentence-transformers installed)",
    )
    parser.add_argument(
        "--baseline-words",
        action="store_true",
        help="also score nearest-description TF-IDF cosine (no model needed)",
    )
    parser.add_argument(
        "--no-broker", action="store_true", help="skip the broker run (baselines only)"
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the dataset, print its shape, and exit"
    )
    parser.add_argument(
        "--min-top1",
        type=float,
        default=0.0,
        help="exit 1 when the broker's top-1 accuracy is below this",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout, seconds")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument(
        "--warmup-timeout",
        type=float,
        default=90.0,
        help="how long to wait for the router to know every agent",
    )
    parser.add_argument(
        "--collect-timeout",
        type=float,
        default=15.0,
        help="how long to wait for every RouteDecided to appear in ROUTES",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print every request's outcome"
    )
    return parser.parse_args(argv)


def _print_rows(summary: Summary) -> None:
    for o in summary.outcomes:
        mark = "ok " if o.correct else "XX "
        extra = ", ".join(f"{k}={v}" for k, v in o.detail.items() if v not in (None, [], ""))
        print(f"  {mark}{o.request_id:<4} {o.label:<20} -> {o.chosen or '(none)':<20} {extra}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the broker started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    dataset = load(requests_file=args.requests)
    found = problems(dataset)
    _print_dataset(dataset)
    if found:
        print("dataset problems:", *found, sep="\n  ")
        return 2
    if args.check:
        print("dataset ok")
        return 0
    result: dict[str, Any] = {
        "dataset": {"agents": len(dataset.agents), "requests": len(dataset.requests)},
        "baselines": {},
    }
    code = 0
    if not args.no_broker:
        try:
            summary, info = run_broker_eval(args, dataset)
        except EvalError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        print(*summary.lines(), sep="\n")
        print(
            f"  decisions: {info['stored_in_routes']}/{info['sent']} stored in ROUTES, "
            f"answer == stored for {info['answer_equals_stored']}, reasons {info['reasons']}, "
            f"{info['agents_seen_in_candidates']} agents seen among candidates, "
            f"{info['seconds_sending']} s to send"
        )
        if not info["stored_in_routes"] and not info["answered_with_agent"]:
            print("  no decision at all: is the router running? (-v prints the broker log)")
            if args.verbose:
                print(info["broker_log_tail"], file=sys.stderr)
        if info["errors"]:
            print(f"  errors: {len(info['errors'])}; first: {info['errors'][0]}")
        if args.verbose:
            _print_rows(summary)
        result["broker"] = {**summary.to_dict(), "run": info}
        if summary.overall.accuracy < args.min_top1:
            code = 1
    extra: list[Summary] = []
    if args.baseline_words:
        extra.append(baselines.words(dataset))
    if args.baseline_minilm:
        try:
            extra.append(baselines.minilm(dataset, args.baseline_minilm))
        except baselines.BaselineUnavailable as e:
            print(f"baseline: {e}")
            result["baselines"]["minilm"] = {"skipped": str(e)}
    for summary in extra:
        print(*summary.lines(), sep="\n")
        if args.verbose:
            _print_rows(summary)
        result["baselines"][summary.name] = summary.to_dict()
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        print(f"wrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
