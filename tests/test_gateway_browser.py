"""The playground in a real headless Chromium (Debian's, installed by scripts/browser.sh):
paste the key, type a prompt, click Generate, and a real image from a real miner appears."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from gateway_support import Only, make_chain, running_gateway, running_miners

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: scripts/test.sh "
                    "installs it (scripts/browser.sh)")
def test_playground_generates_an_image_in_chromium(tmp_path, tiny_engine, tiny_root):
    from playwright.sync_api import sync_playwright

    net = make_chain(tmp_path, miners=1)
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}), \
            running_gateway(net, tiny_root) as gw, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=FLAGS, viewport={"width": 820, "height": 720})
        try:
            page = browser.new_page()
            page.goto(gw.url + "/")
            page.fill("#key", gw.key)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#size", "64x64")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_function(
                "document.querySelector('#image') && document.querySelector('#image').complete"
                " && document.querySelector('#image').naturalWidth > 0", timeout=120_000)
            size = page.evaluate("[document.querySelector('#image').naturalWidth, "
                                 "document.querySelector('#image').naturalHeight]")
            status = page.text_content("#status")
            stored = page.evaluate("localStorage.getItem('niche-key')")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    net.chain.close()
    assert size == [64, 64]
    assert "seed 7" in status and "miner uid 1" in status, status
    assert stored == gw.key
    if os.environ.get("NICHE_PLAYGROUND_SCREENSHOT"):  # how docs/images/playground.png is made
        shutil.copy(shot, os.environ["NICHE_PLAYGROUND_SCREENSHOT"])
