"""The ``/ui`` page of a broker with API keys: a key the broker knows but that lacks the
consume scope (403) must leave the operator a way to give another key. The page kept the
key in the tab's session storage and hid its key prompt on anything but a 401, so such a
key locked the tab out for good. Headless Chromium over the DevTools protocol
(``tests/e2e/_browser.py``); skips without a Chromium binary."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import pytest

from broker.embedded import NatsServer, ServerSpec
from tests._wait import await_until
from tests.e2e._broker import BrokerProcess, start_broker
from tests.e2e._browser import DevTools, chromium_binary

pytestmark = pytest.mark.e2e

PUBLISH_ONLY = "key-publish-only-0123456789"
CONSUMER = "key-consume-0123456789abcd"
TWO_TENANTS = "key-two-tenants-0123456789"


def auth_config() -> str:
    lines = ["api_keys:"]
    for key_id, value, scope, tenants in (
        ("pub", PUBLISH_ONLY, "publish", "[a]"),
        ("ops", CONSUMER, "consume", "[a]"),
        ("both", TWO_TENANTS, "consume", "[a, b]"),
    ):
        lines += [
            f"  - id: {key_id}",
            f"    sha256: {hashlib.sha256(value.encode()).hexdigest()}",
            f"    tenants: {tenants}",
            f"    scopes: [{scope}]",
        ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    if chromium_binary() is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set BROKER_CHROMIUM)")
    server = NatsServer(ServerSpec(store_dir=tmp_path_factory.mktemp("nats"))).start()
    try:
        process = start_broker(
            tmp_path_factory.mktemp("uikey"),
            nats_url=server.url,
            env={"BROKER_AUTH_CONFIG": auth_config()},
            args=("--projection-workers", "0"),
        )
        yield process
        process.stop()
    finally:
        server.stop()


async def use_key(page: DevTools, key: str) -> None:
    await page.evaluate(
        f"document.getElementById('key').value = {key!r};"
        "document.getElementById('login').requestSubmit()"
    )


async def until(page: DevTools, expression: str) -> bool:
    async def holds() -> bool:
        try:
            return bool(await page.evaluate(expression))
        except RuntimeError:  # the page is still loading: its elements are not there yet
            return False

    return await await_until(holds, timeout=20, interval=0.2)


PROMPT_SHOWN = "!document.getElementById('login').hidden"
ERROR = "document.getElementById('error').textContent"


async def test_a_key_without_the_consume_scope_leaves_the_key_prompt_shown(
    page: DevTools, broker: BrokerProcess
) -> None:
    await page.call("Page.navigate", url=f"{broker.base_url}/ui")
    assert await until(page, PROMPT_SHOWN), await page.evaluate(ERROR)  # 401: no key yet

    await use_key(page, PUBLISH_ONLY)
    assert await until(page, f"{ERROR}.startsWith('status 403')"), await page.evaluate(ERROR)
    assert await page.evaluate(PROMPT_SHOWN), "a 403 hid the key prompt: the tab is stuck"

    await use_key(page, CONSUMER)
    assert await until(page, "document.body.dataset.loaded === 'true'"), await page.evaluate(ERROR)
    assert await page.evaluate(f"{ERROR} === ''")
    assert await page.evaluate("document.getElementById('login').hidden")
    assert "tenant a" in await page.evaluate("document.getElementById('build').textContent")


async def test_a_key_with_two_tenants_shows_the_one_asked_for_and_can_switch(
    page: DevTools, broker: BrokerProcess
) -> None:
    """The page never sent ``Broker-Tenant``: a key holding several tenants saw only its
    first. The key prompt takes a tenant, and the header's button opens it again."""
    build = "document.getElementById('build').textContent"
    await page.call("Page.navigate", url=f"{broker.base_url}/ui")
    assert await until(page, PROMPT_SHOWN), await page.evaluate(ERROR)
    await page.evaluate("document.getElementById('tenant').value = 'b'")
    await use_key(page, TWO_TENANTS)
    assert await until(page, f"{build}.includes('tenant b')"), await page.evaluate(build)
    assert await page.evaluate("document.getElementById('login').hidden")

    await page.evaluate("document.getElementById('switch').click()")
    await asyncio.sleep(3)  # a refresh or more: the opened form stays open
    assert await page.evaluate(PROMPT_SHOWN)
    assert await page.evaluate("document.getElementById('tenant').value") == "b"
    await page.evaluate("document.getElementById('tenant').value = 'c'")  # not the key's
    await use_key(page, TWO_TENANTS)
    assert await until(page, f"{ERROR}.startsWith('status 403')"), await page.evaluate(ERROR)
    await page.evaluate("document.getElementById('tenant').value = ''")  # its first
    await use_key(page, TWO_TENANTS)
    assert await until(page, f"{build}.includes('tenant a')"), await page.evaluate(build)


#: ``/v1/status`` answered in the page with a document holding a routed message and its copy
#: for the policy's shadow agent.
SHADOWED = """
window.fetch = async (url, options) => {
  if (!String(url).startsWith('/v1/status')) return new Response('{}', {status: 404});
  const route = (agent, mirror) => ({stream: 'ROUTES', seq: mirror ? 2 : 1,
    subject: 'route.a.' + agent, time: '2024-05-01T12:00:00Z', agent: agent,
    capability: 'summarize', reason: 'scored', detail: '', candidates: [], message_seq: 7,
    message_subject: 'msg.a.docs', attempt: 1, policy_version: 'p1', trace_id: null,
    mirror: mirror});
  const document = {generated_at: '2024-05-01T12:00:01Z',
    broker: {version: '1', git_revision: 'x', nats_server_version: '2', tenant: 'a'},
    streams: [], consumers: [], agents: [], dlq: [], links: {trace: null},
    consumers_unlisted: {},
    routes: [route('summarizer-next', true), route('summarizer', false)]};
  return new Response(JSON.stringify(document),
    {status: 200, headers: {'content-type': 'application/json'}});
};
"""


async def test_a_shadow_copy_is_shown_as_a_copy(page: DevTools, broker: BrokerProcess) -> None:
    await page.call("Page.addScriptToEvaluateOnNewDocument", source=SHADOWED)
    await page.call("Page.navigate", url=f"{broker.base_url}/ui")
    assert await until(page, "document.body.dataset.loaded === 'true'"), await page.evaluate(ERROR)

    agents = await page.evaluate(
        "[...document.querySelectorAll('#routes tbody tr')].map(r => r.cells[2].textContent)"
    )
    assert agents == ["summarizer-next.summarize (shadow copy)", "summarizer.summarize"]
