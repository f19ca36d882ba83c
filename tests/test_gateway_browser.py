"""The playground in a real headless Chromium (Debian's, installed by scripts/browser.sh):
the models listed without a key; paste the key, type a prompt, click Generate, and real
images from real miners appear; an uploaded image guides a Kolors edit."""
from __future__ import annotations

import os
import re
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
def test_playground_generates_images_and_edits_in_chromium(tmp_path, tiny_engine, tiny_root):
    """Models listed before any key; two images with steps and a seed; then a Kolors edit:
    negative prompt, pipeline controlnet-canny and an uploaded guiding image."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    guide = tmp_path / "guide.png"
    square = Image.new("RGB", (64, 64), (10, 10, 10))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    square.save(guide)
    net = make_chain(tmp_path, miners=3)
    # two FLUX miners: the gateway sends a miner no more images at once than its concurrency
    engines = {"miner1": Only(tiny_engine, "flux-schnell"), "miner2": Only(tiny_engine, "kolors"),
               "miner3": Only(tiny_engine, "flux-schnell")}
    with running_miners(net, engines), running_gateway(net, tiny_root) as gw, \
            sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=FLAGS, viewport={"width": 860, "height": 900})
        try:
            page = browser.new_page()
            page.goto(gw.url + "/")
            # the model list needs no key
            page.wait_for_function("document.querySelector('#model').options.length == 2")
            listed = page.evaluate("[...document.querySelector('#model').options]"
                                   ".map(o => o.value)")
            hint = page.text_content("#status")
            page.fill("#key", gw.key)
            page.dispatch_event("#key", "change")
            page.select_option("#model", "flux-schnell")
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#size", "64x64")
            page.fill("#seed", "7")
            page.fill("#n", "2")
            page.fill("#steps", "3")
            page.click("#generate")
            page.wait_for_function(LOADED.format("#image1"), timeout=120_000)
            sizes = page.evaluate("[...document.querySelectorAll('img.generated')]"
                                  ".map(i => [i.naturalWidth, i.naturalHeight])")
            status = page.text_content("#status")
            stored = page.evaluate("localStorage.getItem('niche-key')")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            upload_hidden = page.is_hidden("#upload")
            page.select_option("#model", "kolors")
            page.select_option("#pipeline", "controlnet-canny")
            page.set_input_files("#upload", str(guide))
            page.fill("#negative", "blurry")
            page.fill("#n", "1")
            page.fill("#steps", "2")
            page.fill("#prompt", "a white square")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#status').textContent"
                                   ".includes('controlnet-canny')", timeout=120_000)
            edit_status = page.text_content("#status")
            edit_count = page.evaluate("document.querySelectorAll('img.generated').length")
        finally:
            browser.close()
    net.chain.close()
    assert listed == ["flux-schnell", "kolors"] and "paste an API key" in hint, hint
    assert sizes == [[64, 64], [64, 64]]
    assert "2 images" in status and "3 steps" in status and "seed 7" in status, status
    assert re.search(r"miner uid [13] ", status) and "images left today" in status, status
    assert stored == gw.key
    assert upload_hidden  # txt2img needs no image: the upload shows for the other pipelines
    assert "2 steps" in edit_status and "miner uid 2" in edit_status, edit_status
    assert edit_count == 1
    if os.environ.get("NICHE_PLAYGROUND_SCREENSHOT"):  # how docs/images/playground.png is made
        shutil.copy(shot, os.environ["NICHE_PLAYGROUND_SCREENSHOT"])


LOADED = ("document.querySelector('{0}') && document.querySelector('{0}').complete"
          " && document.querySelector('{0}').naturalWidth > 0")
