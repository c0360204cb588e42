"""The ``/ui`` page polls ``/v1/status`` in one loop at most, whatever the clicks: pause
and resume, or a key submitted, while a (slow) status fetch is on its way must not start
a second loop that never stops. Headless Chromium over the DevTools protocol
(``tests/e2e/_browser.py``); skips without a Chromium binary."""

from __future__ import annotations

import asyncio

import pytest

from tests._wait import await_until
from tests.e2e._broker import BrokerProcess
from tests.e2e._browser import DevTools

pytestmark = pytest.mark.e2e

#: How long each status fetch is held in the page: one loop is then one fetch per
#: FETCH_DELAY + the page's 2 s pause, and every click below lands while one is on its way.
FETCH_DELAY_MS = 1000
#: Counts each /v1/status fetch the page starts, and how many are on their way.
SLOW_STATUS = f"""
window.__statusStarts = 0;
window.__statusOnItsWay = 0;
const realFetch = window.fetch;
window.fetch = async (url, options) => {{
  if (!String(url).startsWith('/v1/status')) return realFetch(url, options);
  window.__statusStarts += 1;
  window.__statusOnItsWay += 1;
  try {{
    await new Promise(resolve => setTimeout(resolve, {FETCH_DELAY_MS}));
    return await realFetch(url, options);
  }} finally {{
    window.__statusOnItsWay -= 1;
  }}
}};
"""
#: Three pause/resume pairs and two key submissions, all while one fetch is on its way.
CLICKS = """
const pause = document.getElementById('pause');
for (let i = 0; i < 3; i++) { pause.click(); pause.click(); }
const login = document.getElementById('login');
login.requestSubmit();
login.requestSubmit();
pause.textContent
"""


async def starts(page: DevTools) -> int:
    return int(await page.evaluate("window.__statusStarts"))


async def test_clicks_while_a_status_fetch_is_on_its_way_keep_one_polling_loop(
    page: DevTools, broker: BrokerProcess
) -> None:
    """After pause/resume and key submissions during a fetch, the page fetches at the pace
    of one loop (2, at most 3, starts in 6 s; the page that started a loop per click made
    6 here), a pause stops polling at once, and a resume starts it again."""
    await page.call("Page.addScriptToEvaluateOnNewDocument", source=SLOW_STATUS)
    await page.call("Page.navigate", url=f"{broker.base_url}/ui")

    async def first_fetch() -> bool:
        return bool(await page.evaluate("(window.__statusOnItsWay || 0) > 0"))

    assert await await_until(first_fetch, timeout=20)
    assert await page.evaluate(CLICKS) == "pause"  # not paused after the pairs
    assert await page.evaluate("window.__statusOnItsWay") > 0  # they all landed mid-fetch

    before = await starts(page)
    await asyncio.sleep(6.0)
    polled = await starts(page) - before
    assert 1 <= polled <= 3, f"{polled} status fetches in 6 s: more than one polling loop"

    # Paused: no fetch starts, not even a scheduled one.
    await page.evaluate("document.getElementById('pause').click()")

    async def idle() -> bool:
        return bool(await page.evaluate("window.__statusOnItsWay === 0"))

    assert await await_until(idle, timeout=10)
    paused_at = await starts(page)
    await asyncio.sleep(2.5)  # longer than the page's 2 s between fetches
    assert await starts(page) == paused_at

    # Resumed with nothing on its way: polling starts again at once.
    await page.evaluate("document.getElementById('pause').click()")

    async def resumed() -> bool:
        return await starts(page) > paused_at

    assert await await_until(resumed, timeout=FETCH_DELAY_MS / 1000 + 5)
    assert await page.evaluate("document.body.dataset.loaded") == "true"
    assert page.errors == []
