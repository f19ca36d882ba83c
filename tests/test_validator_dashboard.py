"""The subnet dashboard on a real validator's state: real rounds (a LocalChain file, real
wallets, real miners on the tiny Engine, one of them answering with another seed's image,
one unreachable), the dashboard's HTTP server on 127.0.0.1, and the page in a real headless
Chromium (Debian's, installed by scripts/browser.sh), refreshed live while a round runs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from gateway_support import NETUID, make_chain, running_miners

from niche.chain.local import LocalChain
from niche.cli import main
from niche.devnet.localnet.supervisor import free_port
from niche.validator.client import MinerClient
from niche.validator.dashboard import latency_summary, snapshot, start_dashboard
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Only:
    """The tiny engine serving one model; `other_seed` makes it a cheat (another seed's
    image, claimed as the asked one)."""

    def __init__(self, engine, model: str, other_seed: bool = False):
        self._engine, self._model, self._other = engine, model, other_seed

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def served(self):
        return [m for m in self._engine.served() if m.model == self._model]

    def generate_with_states(self, params, image=None):
        if self._other:
            params = params.model_copy(update={"seed": params.seed + 1})
        return self._engine.generate_with_states(params, image)


def _dead_endpoint(net, name: str) -> None:
    port = free_port()  # a port nobody listens on
    net.chain.serve(NETUID, net.wallets[name], "127.0.0.1", port)


def _one_more_round(net, config, engine, failed: list[BaseException]) -> None:
    """A validator restarted on the same state file runs one round (its own connections:
    SQLite's belong to the thread that opened them)."""
    try:
        chain = LocalChain(net.root / "chain.db")
        with ValidatorState(config.state_path) as state:
            again = Validator(replace(config, rounds=1), chain, net.validator, engine,
                              MinerClient(net.validator), state)
            assert again.run() == 0
        chain.close()
    except BaseException as exc:  # reported by the test's thread
        failed.append(exc)


def test_latency_summary_is_nearest_rank():
    assert latency_summary([]) is None
    summary = latency_summary([3.0, 1.0, 2.0, 4.0, 10.0])
    assert summary == {"n": 5, "min": 1.0, "p10": 1.0, "p50": 3.0, "p90": 10.0, "max": 10.0}


def test_first_id_bisects_the_history_by_round(tmp_path):
    """The window's first row is found without scanning: the same answer as a scan, for
    rounds with different numbers of rows and a skipped round."""
    import sqlite3

    from niche.validator.dashboard import first_id
    from niche.validator.scoring import Outcome, ScoreBook

    path = tmp_path / "state.sqlite"
    with ValidatorState(path) as state:
        for round_index, miners in ((0, 3), (1, 1), (3, 5), (4, 2)):
            state.save_round(round_index, ScoreBook(),
                             [Outcome(u, f"5H{u}", "kolors") for u in range(miners)], {})
    db = sqlite3.connect(path)
    for round_index in range(-1, 7):
        scan = db.execute("SELECT MIN(id) FROM history WHERE round >= ?",
                          (round_index,)).fetchone()[0]
        assert first_id(db, round_index) == (scan if scan is not None else 12), round_index
    db.close()


def test_missing_state_and_busy_port_are_one_line(tmp_path, capsys):
    assert main(["validator", "dashboard", "--state", str(tmp_path / "none.sqlite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no validator state at" in err[0]
    state = tmp_path / "state.sqlite"
    ValidatorState(state).close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["validator", "dashboard", "--state", str(state), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --port {port} on 127.0.0.1 is already in use: "
                       "pick another port"]
    dashboard = start_dashboard(state, 0)
    try:
        assert httpx.get(dashboard.url + "healthz", timeout=10).text == "ok\n"
        assert httpx.get(dashboard.url + "api/state", timeout=10).json()["miners"] == []
        state.unlink()  # moved away under a running dashboard: the page says why
        gone = httpx.get(dashboard.url + "api/state", timeout=10)
        assert gone.status_code == 503 and "no validator state at" in gone.json()["error"]
    finally:
        dashboard.close()


@pytest.mark.parametrize("kind", ["other-program", "not-sqlite", "empty"])
def test_a_file_that_is_not_a_validator_state_is_refused_at_start(tmp_path, capsys, kind):
    path = tmp_path / "other.sqlite"
    if kind == "other-program":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        db.commit()
        db.close()
    elif kind == "not-sqlite":
        path.write_bytes(b"this is a text file, not a database\n" * 200)
    else:
        path.write_bytes(b"")
    assert main(["validator", "dashboard", "--state", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], err


def test_a_damaged_state_still_gets_an_answer_not_a_dropped_connection(tmp_path):
    """A state whose round counter is not a number (a damaged or hand-edited file): the
    page's API answers 503 with the reason; it never drops the connection."""
    state = tmp_path / "state.sqlite"
    ValidatorState(state).close()
    db = sqlite3.connect(state)
    db.execute("UPDATE meta SET value='not-a-number' WHERE key='round'")
    if not db.execute("SELECT 1 FROM meta WHERE key='round'").fetchone():
        db.execute("INSERT INTO meta VALUES ('round', 'not-a-number')")
    db.commit()
    db.close()
    dashboard = start_dashboard(state, 0)
    try:
        answer = httpx.get(dashboard.url + "api/state", timeout=10)
        assert answer.status_code == 503 and "ValueError" in answer.json()["error"]
        assert httpx.get(dashboard.url + "healthz", timeout=10).text == "ok\n"
    finally:
        dashboard.close()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: scripts/test.sh "
                    "installs it (scripts/browser.sh)")
def test_dashboard_shows_a_real_validator_live_in_chromium(tmp_path, tiny_engine):
    from playwright.sync_api import sync_playwright

    net = make_chain(tmp_path, miners=4)
    _dead_endpoint(net, "miner4")
    engines = {"miner1": Only(tiny_engine, "flux-schnell"),
               "miner2": Only(tiny_engine, "kolors"),
               "miner3": Only(tiny_engine, "flux-schnell", other_seed=True)}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell", "kolors"), rounds=2,
                             state_path=tmp_path / "state.sqlite", seed=7, epoch_length=1,
                             round_interval=0, info_timeout=5.0)
    state = ValidatorState(config.state_path)
    validator = Validator(config, net.chain, net.validator, tiny_engine,
                          MinerClient(net.validator), state)
    uids = net.uids
    with running_miners(net, engines):
        assert validator.run() == 0
        dashboard = start_dashboard(config.state_path, 0)
        try:
            # the JSON endpoint: what the state file says, per miner and per round
            data = httpx.get(dashboard.url + "api/state", timeout=10).json()
            miners = {m["uid"]: m for m in data["miners"]}
            honest, kolors, cheat, dead = (miners[uids[n]] for n in
                                           ("miner1", "miner2", "miner3", "miner4"))
            assert data["rounds_completed"] == 2 and data["netuid"] == NETUID
            assert data["hotkey"] == net.validator_hotkey
            assert honest["models"] == ["flux-schnell"] and kolors["models"] == ["kolors"]
            assert honest["verified"] == 2 and honest["verified_rate"] == 1.0
            assert honest["latency"]["n"] == 2 and honest["score"] > 0 and honest["weight"] > 0
            assert cheat["score"] == 0 and cheat["weight"] == 0
            assert cheat["excluded_until"] is not None
            assert [f["status"] for f in cheat["failures"]] == ["excluded", "audit_failed"]
            assert "audit_failed" in cheat["failures"][1]["reason"]
            assert dead["failures"][0]["status"] == "unreachable" and dead["latency"] is None
            assert [r["round"] for r in data["rounds"]] == [1, 0]
            assert data["rounds"][1]["failed_audits"] == 1
            assert data["rounds"][1]["weights_block"] is not None
            assert httpx.get(dashboard.url + "nope", timeout=10).status_code == 404

            with sync_playwright() as pw:
                browser = pw.chromium.launch_persistent_context(
                    str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
                    args=FLAGS, viewport={"width": 1360, "height": 760})
                try:
                    page = browser.new_page()
                    page.goto(dashboard.url + "?refresh=0.5")
                    page.wait_for_function("document.body.dataset.rounds === '2'")
                    rows = page.locator("#miners tbody tr")
                    assert rows.count() == 4
                    honest_row = page.locator(f"#miners tr[data-uid='{uids['miner1']}']")
                    assert "flux-schnell" in honest_row.inner_text()
                    assert "2/2 (100%)" in honest_row.locator(".verified").inner_text()
                    assert honest_row.locator("svg.latency circle").count() == 2
                    cheat_row = page.locator(f"#miners tr[data-uid='{uids['miner3']}']")
                    assert "audit_failed" in cheat_row.locator(".reasons").inner_text()
                    assert "excluded until" in cheat_row.inner_text()
                    dead_row = page.locator(f"#miners tr[data-uid='{uids['miner4']}']")
                    assert "unreachable" in dead_row.locator(".reasons").inner_text()
                    assert page.locator("#rounds-table tbody tr").count() == 2
                    assert page.locator("#round-chart rect").count() >= 4
                    # live: a third round lands in the state file and the open page shows it
                    # (in a thread: playwright's sync API holds this thread's event loop)
                    failed: list[BaseException] = []
                    runner = threading.Thread(target=_one_more_round,
                                              args=(net, config, tiny_engine, failed))
                    runner.start()
                    runner.join(timeout=120)
                    assert not failed and not runner.is_alive(), failed
                    page.wait_for_function("document.body.dataset.rounds === '3'",
                                           timeout=30_000)
                    assert page.locator("#rounds-table tbody tr").count() == 3
                    assert page.text_content("#rounds") == "3"
                    shot = tmp_path / "dashboard.png"
                    page.screenshot(path=str(shot), full_page=True)
                finally:
                    browser.close()
        finally:
            dashboard.close()
    state.close()
    net.chain.close()
    assert json.loads(json.dumps(snapshot(config.state_path)))["rounds_completed"] == 3
    if os.environ.get("NICHE_DASHBOARD_SCREENSHOT"):  # how docs/images/dashboard.png is made
        shutil.copy(shot, os.environ["NICHE_DASHBOARD_SCREENSHOT"])
