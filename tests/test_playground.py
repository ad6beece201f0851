"""The playground page in headless Chromium: live routing bars, streamed answer, a screenshot."""

import shutil
from pathlib import Path

import pytest
from support.serving import CHROMIUM_ARGS, load_served, pick_domain_texts, running

from temporal_lora.server import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Where the screenshot is kept for people to look at (runs/ is git-ignored).
SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts" / "playground.png"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make browser installs it)")


@pytest.mark.slow
def test_playground_routes_streams_and_forces(tiny_bundle):
    from playwright.sync_api import expect, sync_playwright

    tl = load_served(tiny_bundle)
    texts = pick_domain_texts(tl)
    with running(create_app(tl)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url + "/")
        expect(page.locator("#model option")).to_have_count(len(tl.domains) + 2)
        # typing routes live: the legal bar becomes the top one
        page.fill("#prompt", texts["legal"])
        expect(page.locator(".bar.top")).to_have_attribute("data-domain", "legal", timeout=20_000)
        expect(page.locator("#bars-note")).to_contain_text("Live route: legal")
        page.fill("#max-tokens", "12")
        page.click("#send")
        expect(page.locator("#route-line")).to_contain_text("Route: legal (hard routing", timeout=30_000)
        expect(page.locator("#send")).to_be_enabled(timeout=30_000)
        assert page.locator("#error").inner_text() == ""
        answer = page.locator("#answer").inner_text()
        expected = _chat_reference(url, texts["legal"])
        assert answer == expected
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        # forcing the base model from the menu
        page.select_option("#model", "base")
        page.click("#send")
        expect(page.locator("#route-line")).to_contain_text("Route: base (forced)", timeout=30_000)
        browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


def _chat_reference(url: str, message: str) -> str:
    """What the same request returns outside the browser (the page sends seed 0, penalty 1.3)."""
    import httpx

    body = {"model": "auto", "messages": [{"role": "user", "content": message}], "max_tokens": 12,
            "temperature": 0, "repetition_penalty": 1.3, "seed": 0}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
