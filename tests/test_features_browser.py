"""The offline report in a real browser: headless Chromium over HTTP, driven by DevTools.

Loads ``index.html`` of a small features folder (tiny LM) from a loopback HTTP server, then
checks: no console errors, exceptions or failed loads; the table lists all d_sae latents;
clicking a latent (real mouse events) shows its contexts; the budget slider lists exactly the
latents a token keeps at k. ``make test`` installs Chromium with apt where it is missing and
apt is usable; elsewhere this test skips, saying why. ``HSAE_SCREENSHOT=path.png`` keeps a
screenshot of the opened latent.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cdp import Browser, find_browser

from hsae_runtime.features.build import build_features
from hsae_runtime.features.cache import CacheSpec

BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no chromium on this machine: `make browser` (part of `make test`) installs it "
           "with apt where apt is usable",
)
pytest.importorskip("aiohttp", reason="the DevTools driver needs aiohttp (dev extra)")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def report_url(tmp_path_factory, tiny_sae_path, sae, lm, tiny_text_file):
    out = tmp_path_factory.mktemp("browser") / "features"
    spec = CacheSpec(tokens=1024, context=32, lm_batch=4, shard_contexts=8)
    build_features(tiny_sae_path, sae, lm, tiny_text_file, out, spec, progress=False,
                   export=False)
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()


def test_report_in_headless_chromium(report_url, sae):
    assert BROWSER is not None
    asyncio.run(_drive(BROWSER, report_url, sae.config.d_sae))


async def _drive(executable: str, url: str, d_sae: int) -> None:
    async with Browser(executable) as page:
        await page.navigate(url)
        await page.wait_for("document.body && document.body.dataset.ready === '1'")
        rows = await page.evaluate("document.querySelectorAll('#latents tbody tr').length")
        assert rows == d_sae
        # Sort by the last density column (a first click sorts numbers descending) and open
        # the densest latent.
        await page.click("#latents-head th:nth-last-child(4)")
        assert await page.evaluate(
            "document.querySelector('#latents-head th.sorted-desc').textContent") == "density@16"
        target = await page.evaluate(
            "document.querySelector('#latents tbody tr').dataset.id")
        await page.click("#latents tbody tr")
        title = await page.wait_for(
            "(document.querySelector('#panel h2') || {}).textContent")
        assert title == f"Latent {target}"
        n_contexts = await page.wait_for("document.querySelectorAll('#contexts .ctx').length")
        assert n_contexts >= 1
        fired = await page.evaluate("document.querySelectorAll('#contexts .ctx .fire').length")
        assert fired == n_contexts
        assert await page.evaluate("document.querySelectorAll('#panel svg').length") == 2
        if os.environ.get("HSAE_SCREENSHOT"):
            await page.screenshot(Path(os.environ["HSAE_SCREENSHOT"]))
        # Budget slider: at k = 3, the first token lists exactly its first 3 positive latents.
        await page.click("#tab-budget")
        await page.evaluate("(() => { const s = document.getElementById('k-slider');"
                            " s.value = '3'; s.dispatchEvent(new Event('input')); })()")
        chips = await page.evaluate("document.querySelectorAll('#token-latents .chip').length")
        assert 1 <= chips <= 3
        assert await page.evaluate("document.getElementById('k-value').textContent") == "3"
        await asyncio.sleep(0.3)  # late console messages
        assert page.errors == []
