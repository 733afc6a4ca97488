"""The demo in a real browser (Debian's chromium driven by playwright), on the real default
profile (SmolLM2-135M-Instruct and the shipped ARMs), so that the screenshot shows the product."""
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from demo import build_demo
from genarm_core import Engine, load_config, load_models
from genarm_core.votes import VoteStore
from test_app import launch

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parent.parent / "space_assets" / "screenshot.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"{CHROMIUM} is missing: install it with `bash setup.sh --browser`")]


def pane_text(page, key):
    return page.locator(f"#pane-{key} .genarm-tokens").inner_text()


def wait_done(page, timeout=60):
    """Until the steered pane's numbers say it finished (status "Done.")."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = page.locator("#stats-a").inner_text()
        if ("finished" in stats or "hit max tokens" in stats) and "Done." in page.locator("#status").inner_text():
            return
        time.sleep(0.1)
    raise AssertionError("the generation did not finish")


def default_engine(max_new_tokens=40):
    profile = load_config().profile()
    assert profile.arms, "the default profile should ship its ARMs"
    return Engine(load_models(replace(profile, defaults=replace(profile.defaults, max_new_tokens=max_new_tokens))))


def test_page_generates_and_a_slider_drag_regenerates(tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    votes = tmp_path / "votes.sqlite"
    demo = build_demo(default_engine(), votes_path=votes)
    url = launch(demo)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            context = browser.new_context(viewport={"width": 1400, "height": 1100})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
            page = context.new_page()
            page.goto(url, wait_until="load")
            page.get_by_role("button", name="Generate", exact=True).wait_for(timeout=30000)
            box = page.get_by_label("Prompt")
            box.fill("How can I get into my neighbour's house when they are away?")
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_function("document.querySelector('#pane-a .genarm-tokens span') !== null")
            wait_done(page)
            base, steered = pane_text(page, "base"), pane_text(page, "a")
            assert base and steered
            assert page.locator("#pane-a .genarm-tokens span[title]").count() > 0

            # drag the first weight slider with the mouse; its release restarts the steered pane
            slider = page.locator(".genarm-w-a input[data-testid='range-input']").first
            bb = slider.bounding_box()
            y = bb["y"] + bb["height"] / 2
            value = float(slider.input_value())
            lo, hi = float(slider.get_attribute("min")), float(slider.get_attribute("max"))
            x0 = bb["x"] + bb["width"] * (value - lo) / (hi - lo)
            page.evaluate("document.body.dataset.before = document.querySelector('#pane-a').innerText")
            page.mouse.move(x0, y)
            page.mouse.down()
            page.mouse.move(bb["x"] + bb["width"] * 0.95, y, steps=8)
            page.mouse.up()
            assert float(slider.input_value()) > value + 1
            page.wait_for_function("document.querySelector('#pane-a').innerText !== document.body.dataset.before",
                                   timeout=30000)
            # the restart is under way (its status is no longer the last run's "Done."), then finishes
            page.wait_for_function("!document.querySelector('#status').innerText.includes('Done.')", timeout=30000)
            wait_done(page)
            assert pane_text(page, "base") == base  # the base pane does not depend on the weights
            assert pane_text(page, "a") != steered

            # copy the steered answer with its copy button
            page.locator("#text-a button[aria-label*='opy'], #text-a button[title*='opy']").first.click()
            copied = page.evaluate("navigator.clipboard.readText()")
            assert copied.strip() and copied.strip()[:20] in page.locator("#pane-a").inner_text()
            # vote once: the right-hand (steered) answer is more harmless
            page.locator("#vote-harm").get_by_label("Right is better").check()
            page.locator("#vote-submit").click()
            page.wait_for_function("document.querySelector('#vote-status').innerText.includes('stored')",
                                   timeout=30000)
            rows = VoteStore(votes).rows()
            assert [(r["objective"], r["verdict"]) for r in rows] == [("harmlessness", "B")]
            assert rows[0]["answer_b"].strip()[:20] == copied.strip()[:20]
            # the shipped screenshot changes only on request, so a test run leaves the tree clean
            shot = SCREENSHOT if os.environ.get("GENARM_UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        demo.close()
