"""Screenshot of the playground page serving a real bundle, driven in headless Chromium (needs
playwright and `make browser`). Writes the PNG; returns the route line and the answer it shows.

    python -m benchmarks playground --bundle runs/demo/bundle --out runs/bench/playground.png
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.flags import flag

PROMPT = "What are the common side effects of metformin in patients with type 2 diabetes?"


@dataclass
class PlaygroundSettings:
    """The flags of `python -m benchmarks playground`."""

    bundle: Path = flag(Path("runs/demo/bundle"), "the bundle the page serves")
    out: Path = flag(Path("runs/bench/playground.png"), "the screenshot")
    prompt: str = flag(PROMPT, "what is typed into the page")


def run(settings: PlaygroundSettings) -> dict:
    """Serve the bundle, ask the page one question, screenshot it; returns where and what it showed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The browser and server helpers of the playground tests (tests/support/serving.py).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from playwright.sync_api import expect, sync_playwright
    from support.serving import CHROMIUM_ARGS, running

    from temporal_lora.model import TemporalLoRA
    from temporal_lora.server import create_app

    chromium = shutil.which("chromium")
    if not chromium:
        raise SystemExit("chromium is not installed (make browser)")
    tl = TemporalLoRA.from_pretrained(settings.bundle)
    with running(create_app(tl)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(url + "/")
        page.fill("#prompt", settings.prompt)
        expect(page.locator("#bars-note")).to_contain_text("Live route", timeout=60_000)
        page.fill("#max-tokens", "48")
        page.click("#send")
        expect(page.locator("#route-line")).to_contain_text("routing", timeout=60_000)
        expect(page.locator("#send")).to_be_enabled(timeout=300_000)
        settings.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(settings.out), full_page=True)
        result = {"screenshot": str(settings.out), "route_line": page.locator("#route-line").inner_text(),
                  "answer": page.locator("#answer").inner_text()}
        browser.close()
    print(result["route_line"])
    print(result["answer"])
    print(f"screenshot: {settings.out}")
    return result
