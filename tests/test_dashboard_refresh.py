"""The dashboard's `?refresh=SECONDS` in a real headless Chromium: each poll of /api/state is
a full snapshot of the state file inside the validator, so a 0, a negative number or a word
must not turn the page into a busy loop, and the page says the interval it really uses."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from niche.validator.dashboard import start_dashboard
from niche.validator.state import ValidatorState

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-background-timer-throttling", "--disable-renderer-backgrounding"]
WATCH_S = 5.0
"""How long each page is watched at least: at 3 s, the first poll and one more."""

POLLED = {"0": 2, "-5": 2, "abc": 3, "2": 2}
"""?refresh= value -> the seconds the page uses. Before the clamp the first three polled
~10 times a second and said "every 0 s", "every -5 s" and "every NaN s"."""
SHOWN = {"": 3, "%20": 3, "2.5": 2.5, "1": 2, "99999": 3600, "Infinity": 3600, "1e-9": 2}
"""Values only checked by what the page says (no waiting)."""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: scripts/test.sh "
                    "installs it (scripts/browser.sh)")
def test_refresh_is_clamped_and_shown_as_used(tmp_path):
    from playwright.sync_api import sync_playwright

    state = tmp_path / "state.sqlite"
    ValidatorState(state).close()
    dashboard = start_dashboard(state, 0)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                         args=FLAGS)
            try:
                polls: dict[str, int] = {}
                pages, loaded = {}, {}
                for value in POLLED:  # watched side by side, each in its own context
                    page = browser.new_context().new_page()
                    polls[value] = 0

                    def count(request, value: str = value) -> None:
                        if request.url.endswith("/api/state"):
                            polls[value] += 1

                    page.on("request", count)
                    loaded[value] = time.monotonic()
                    page.goto(dashboard.url + "?refresh=" + value)
                    pages[value] = page
                for page in pages.values():
                    page.wait_for_function("document.body.dataset.refreshes >= 1")
                # (not time.sleep: the sync API delivers request events only while it runs)
                last = pages[list(POLLED)[-1]]
                last.wait_for_timeout(max(0.0, WATCH_S - (time.monotonic() - max(loaded.values())))
                                      * 1000)
                seen, now = dict(polls), time.monotonic()
                for value, seconds in POLLED.items():
                    status = pages[value].text_content("#status") or ""
                    assert f"(every {seconds} s)" in status, (value, status)
                    # the first poll, one per interval since, and one of slack for timing
                    most = 2 + int((now - loaded[value]) / seconds)
                    assert 2 <= seen[value] <= most, (value, seen, most)
                page = browser.new_context().new_page()
                for value, seconds in SHOWN.items():
                    page.goto(dashboard.url + "?refresh=" + value)
                    page.wait_for_function("document.body.dataset.refreshes >= 1")
                    status = page.text_content("#status") or ""
                    assert f"(every {seconds} s)" in status, (value, status)
            finally:
                browser.close()
    finally:
        dashboard.close()
