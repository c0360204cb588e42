"""Live agent load: instances heartbeat into KV ``agent_load``; every router watches it.

An agent instance puts an :class:`InstanceLoad` under ``<tenant>.<agent>.<instance>``
every few seconds (the agent SDK does it). :class:`LoadView` follows the bucket with an
ordered consumer and keeps, per tenant, an immutable mapping agent → :class:`AgentLoad`
aggregated over the agent's live instances. A mapping is replaced whole when something
changed, so the scorer can cache work on its identity.

An instance that stops heartbeating disappears after the bucket's TTL. The KV's own
expiry removes the value without telling watchers, so the view also forgets an instance
it has not heard from for a TTL (measured on the router's own clock: agents' clocks may
disagree with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import orjson
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from broker.envelope import TOKEN
from broker.routing.types import AgentLoad
from broker.streams import AGENT_LOAD_BUCKET
from broker.telemetry import metrics

log = structlog.get_logger(__name__)

_KV_PREFIX = f"$KV.{AGENT_LOAD_BUCKET}."
_KV_OPERATION = "KV-Operation"
_INSTANCE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_EMPTY: Mapping[str, AgentLoad] = MappingProxyType({})
#: The largest value a heartbeat's number is read as. Any real rate, latency, count or
#: memory size is far below it, and the sums over an agent's instances stay finite: two
#: instances reporting ``in_flight: 1.7e308`` once added up to an int past float's range,
#: and building the load arrays (every decision of the tenant) and the view's refresh raised.
MAX_REPORTED = 1e15
#: Seconds between the server's idle heartbeats to the view's ordered consumer: nats-py
#: recreates a lost consumer (a NATS restart drops it) when two went missing, so the view is
#: deaf for under 2 s after a restart. With nats-py's default, 5 s, it was 5 to 20 s, which
#: can outlast the bucket's TTL (15 s): instances still heartbeating could expire from it.
IDLE_HEARTBEAT = 0.5


def new_instance_id() -> str:
    """A KV-key-safe id for one agent process: host, pid and a random suffix."""
    host = _INSTANCE_UNSAFE.sub("-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def load_key(tenant: str, agent: str, instance: str) -> str:
    return f"{tenant}.{agent}.{instance}"


def _number(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return min(float(value), MAX_REPORTED) if math.isfinite(value) and value >= 0 else default


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance's heartbeat, as stored in the bucket."""

    tenant: str
    agent: str
    instance: str
    qps: float = 0.0
    in_flight: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    error_rate: float = 0.0
    gpu_free_mb: float | None = None
    gpu_util: float | None = None
    at: float = 0.0  # the instance's own clock, for people; routers use their own

    @property
    def key(self) -> str:
        return load_key(self.tenant, self.agent, self.instance)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> InstanceLoad:
        """Parse a stored heartbeat; ``ValueError`` when it is not one."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        try:
            tenant, agent, instance = str(raw["tenant"]), str(raw["agent"]), str(raw["instance"])
        except KeyError as e:
            raise ValueError(f"missing {e}") from None
        # One subject token each, as the registry has them: a body naming tenant "t.a" fits a
        # key an agent of tenant "t" may write (t.a.b.1), and made the view keep a tenant
        # that exists nowhere.
        if not TOKEN.fullmatch(tenant):
            raise ValueError(f"tenant {tenant[:70]!r} is not a tenant name")
        if not TOKEN.fullmatch(agent):
            raise ValueError(f"agent {agent[:70]!r} is not an agent name")
        gpu_free = raw.get("gpu_free_mb")
        gpu_util = raw.get("gpu_util")
        return cls(
            tenant=tenant,
            agent=agent,
            instance=instance,
            qps=_number(raw.get("qps")),
            in_flight=int(_number(raw.get("in_flight"))),
            p50_ms=_number(raw.get("p50_ms")),
            p99_ms=_number(raw.get("p99_ms")),
            error_rate=min(1.0, _number(raw.get("error_rate"))),
            gpu_free_mb=None if gpu_free is None else _number(gpu_free),
            gpu_util=None if gpu_util is None else min(1.0, _number(gpu_util)),
            at=_number(raw.get("at")),
        )


def _stored_ago(message: Msg, most: float) -> float:
    """How long ago (seconds, at most ``most``) NATS stored a heartbeat: the current values a
    view reads at start, or again after its consumer is made anew, may be nearly a TTL old,
    and counted as seen now they kept a dead instance live for up to two TTLs. Capped, since
    the age compares NATS's clock with this host's: with a heartbeat every TTL/3 at most
    (the SDK's bound), a live instance's newest beat stays under a TTL whatever the skew."""
    try:
        stored = message.metadata.timestamp.timestamp()
    except Exception:  # no JetStream metadata (a plain subscription): seen now
        return 0.0
    return min(max(time.time() - stored, 0.0), most)


def aggregate(instances: list[InstanceLoad]) -> AgentLoad:
    """One agent's load over its live instances: rates and in-flight add up, latency is the
    worst instance's, GPU memory the best instance's (where the next request could go)."""
    qps = sum(i.qps for i in instances)
    weight = qps or float(len(instances))
    errors = sum(i.error_rate * (i.qps if qps else 1.0) for i in instances) / weight
    gpus = [i for i in instances if i.gpu_free_mb is not None]
    return AgentLoad(
        instances=len(instances),
        qps=qps,
        in_flight=sum(i.in_flight for i in instances),
        p50_ms=max(i.p50_ms for i in instances),
        p99_ms=max(i.p99_ms for i in instances),
        error_rate=errors,
        gpu_free_mb=max(i.gpu_free_mb or 0.0 for i in gpus) if gpus else None,
        gpu_util=min(i.gpu_util or 0.0 for i in gpus) if gpus else None,
    )


def _export(tenant: str, before: Mapping[str, AgentLoad], now: Mapping[str, AgentLoad]) -> None:
    """The load this router sees, as gauges (an agent with no instance left goes to zero)."""
    for agent, load in now.items():
        metrics.agent_load(
            tenant,
            agent,
            instances=load.instances,
            in_flight=load.in_flight,
            qps=load.qps,
            p99_seconds=load.p99_ms / 1000.0,
            error_ratio=load.error_rate,
        )
    for agent in before.keys() - now.keys():
        metrics.forget_agent(tenant, agent)


class LoadView:
    """The live load of every agent, as one router process sees it."""

    def __init__(self, ttl: float = 15.0, *, refresh_interval: float = 0.2) -> None:
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self._seen: dict[str, tuple[InstanceLoad, float]] = {}  # key -> (load, monotonic seen)
        self._dirty: set[str] = set()  # tenants whose mapping must be rebuilt
        self._tenants: dict[str, Mapping[str, AgentLoad]] = {}
        self._subscription: Any = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._caught_up = asyncio.Event()  # the bucket's values at start are in the view
        self.version = 0  # bumped whenever a tenant's mapping is replaced

    async def start(self, js: JetStreamContext, *, patience: float = 5.0) -> None:
        """Follow the bucket (current values first) and keep the per-tenant view fresh.

        Returns once the values the bucket held at the start are in the view (or after
        ``patience`` seconds): a router that decided before would find no live instance and
        dead-letter messages that live agents could take."""
        with contextlib.suppress(Exception):  # the bucket's TTL, when it has one
            status = await (await js.key_value(AGENT_LOAD_BUCKET)).status()
            if status.ttl:
                self.ttl = float(status.ttl)
        self._caught_up = asyncio.Event()
        with contextlib.suppress(Exception):  # unknown: waited for up to ``patience``
            info = await js.stream_info(f"KV_{AGENT_LOAD_BUCKET}")
            if not info.state.messages:
                self._caught_up.set()
        self._subscription = await js.subscribe(
            f"{_KV_PREFIX}>",
            stream=f"KV_{AGENT_LOAD_BUCKET}",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=IDLE_HEARTBEAT,
            cb=self._on_message,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self._caught_up.wait()
        self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="load-view-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    async def _on_message(self, message: Msg) -> None:
        try:
            self._take(message)
        finally:
            with contextlib.suppress(Exception):  # no JetStream metadata: no position
                if message.metadata.num_pending == 0:
                    self._caught_up.set()

    def _take(self, message: Msg) -> None:
        key = message.subject[len(_KV_PREFIX) :]
        operation = (message.headers or {}).get(_KV_OPERATION)
        if operation in {"DEL", "PURGE"} or not message.data:
            self.forget(key)
            return
        try:
            load = InstanceLoad.from_json(message.data)
        except ValueError as e:
            log.warning("agent_load_unreadable", key=key[:200], error=str(e)[:200])
            return
        if load.key != key:
            # Who a heartbeat is for is its key (what NATS permissions can limit a writer
            # to, and what the status page reads), never what its body claims: a body
            # naming another tenant's agent would steer that tenant's routing.
            log.warning("agent_load_key_mismatch", key=key[:200], claims=load.key[:200])
            self.forget(key)
            return
        self.observe(load, time.monotonic() - _stored_ago(message, self.ttl / 2))

    def observe(self, load: InstanceLoad, now: float | None = None) -> None:
        """Record a heartbeat (seen now, on this process's clock)."""
        self._seen[load.key] = (load, time.monotonic() if now is None else now)
        self._dirty.add(load.tenant)

    def forget(self, key: str) -> None:
        entry = self._seen.pop(key, None)
        if entry is not None:
            self._dirty.add(entry[0].tenant)

    def expire(self, now: float | None = None) -> None:
        """Forget instances not heard from for a TTL."""
        cutoff = (time.monotonic() if now is None else now) - self.ttl
        for key in [k for k, (_, seen) in self._seen.items() if seen < cutoff]:
            self.forget(key)

    def refresh(self, now: float | None = None) -> bool:
        """Expire silent instances and rebuild changed tenants; whether anything changed."""
        self.expire(now)
        if not self._dirty:
            return False
        dirty, self._dirty = self._dirty, set()
        grouped: dict[str, dict[str, list[InstanceLoad]]] = {t: {} for t in dirty}
        for load, _ in self._seen.values():
            if load.tenant in grouped:
                grouped[load.tenant].setdefault(load.agent, []).append(load)
        for tenant, agents in grouped.items():
            before = self._tenants.get(tenant, _EMPTY)
            now_loads = {name: aggregate(instances) for name, instances in agents.items()}
            self._tenants[tenant] = MappingProxyType(now_loads)
            _export(tenant, before, now_loads)
        self.version += 1
        return True

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                changed = self.refresh()
            except Exception:  # never for good: every load of every tenant would freeze
                log.exception("agent_load_refresh_failed")
                continue
            if changed:
                async with self._changed:
                    self._changed.notify_all()

    def loads(self, tenant: str) -> Mapping[str, AgentLoad]:
        """Agent → load for ``tenant``; the same object until something changes."""
        return self._tenants.get(tenant, _EMPTY)

    def instances(self, tenant: str | None = None) -> list[InstanceLoad]:
        """Every live instance (of one tenant), for status pages."""
        return [load for load, _ in self._seen.values() if tenant is None or load.tenant == tenant]

    async def wait_until(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds after a refresh; ``False`` on timeout."""
        if predicate(self):
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: predicate(self))
        return bool(predicate(self))
