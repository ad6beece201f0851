"""Screenshot of the playground page serving a real bundle, driven in headless Chromium.

    python benchmarks/playground_screenshot.py --bundle runs/demo/bundle --out runs/bench/playground.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = "What are the common side effects of metformin in patients with type 2 diabetes?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/playground.png"))
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from playwright.sync_api import expect, sync_playwright
    from serving import CHROMIUM_ARGS, running

    from temporal_lora.model import TemporalLoRA
    from temporal_lora.server import create_app

    chromium = shutil.which("chromium")
    if not chromium:
        raise SystemExit("chromium is not installed (make browser)")
    tl = TemporalLoRA.from_pretrained(args.bundle)
    with running(create_app(tl)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(url + "/")
        page.fill("#prompt", args.prompt)
        expect(page.locator("#bars-note")).to_contain_text("Live route", timeout=60_000)
        page.fill("#max-tokens", "48")
        page.click("#send")
        expect(page.locator("#route-line")).to_contain_text("routing", timeout=60_000)
        expect(page.locator("#send")).to_be_enabled(timeout=300_000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        print(page.locator("#route-line").inner_text())
        print(page.locator("#answer").inner_text())
        browser.close()
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
