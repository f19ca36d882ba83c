"""`niche localnet` end to end: real processes, real HTTP on 127.0.0.1, a real chain file."""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

NICHE = [str(Path(sys.executable).with_name("niche"))]


def _processes_mentioning(*texts: str) -> list[int]:
    """PIDs whose command line contains every text (our children carry the workdir in argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if all(text in cmdline for text in texts) and state != "Z":
            found.append(int(entry.name))
    return found


def _wait_gone(text: str, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _ignore_sigint() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(args: list[str], env_root: Path, *, sigint_ignored: bool = False
           ) -> subprocess.Popen:
    """`sigint_ignored`: start it as a background job of a non-interactive shell (or a CI
    runner) would, with SIGINT inherited as SIG_IGN."""
    env = dict(os.environ, NICHE_TINY_DIR=str(env_root))
    return subprocess.Popen(NICHE + ["localnet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=_ignore_sigint if sigint_ignored else None)


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"never saw {pattern!r}; output:\n{''.join(seen)}")


@pytest.mark.slow
def test_localnet_runs_rounds_catches_a_cheat_and_prints_chain_weights(tmp_path, tiny_root):
    from niche.chain.local import LocalChain

    workdir = tmp_path / "ln"
    started = time.monotonic()
    proc = _start(["--miners", "3", "--rounds", "2", "--cheat", "sharpened-fewer-steps",
                   "--workdir", str(workdir)], tiny_root)
    out, _ = proc.communicate(timeout=400)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, out
    print(f"localnet --miners 3 --rounds 2 took {elapsed:.0f}s")
    assert "scoreboard after 2 round(s)" in out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(miner\d)\s+\S+\s+(\S+)\s+(\S+)\s+(\d+)/(\d+)\s+\S+\s+"
                     r"([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(2)] = dict(uid=int(m.group(1)), model=m.group(3), behaviour=m.group(4),
                                    verified=int(m.group(5)), audited=int(m.group(6)),
                                    score=float(m.group(7)), weight=float(m.group(8)))
    assert set(rows) == {"miner1", "miner2", "miner3"}, out
    # an adaptive cheat that every audit catches (resampled-steps is caught on 2/3 of
    # FLUX audits, so in two rounds it may pass one)
    assert rows["miner3"]["behaviour"] == "sharpened-fewer-steps"
    assert rows["miner3"]["weight"] == 0.0 and rows["miner3"]["verified"] == 0
    for honest in ("miner1", "miner2"):
        assert rows[honest]["weight"] > 0 and rows[honest]["verified"] >= 1

    chain = LocalChain(workdir / "chain.sqlite")
    try:
        last = chain.weights_history(1)[-1]
    finally:
        chain.close()
    on_chain = dict(zip(last["uids"], last["weights"], strict=False))
    for row in rows.values():
        assert abs(on_chain.get(row["uid"], 0.0) - row["weight"]) < 5e-4
    assert _wait_gone(str(workdir)) == []


def _dashboard_and_lock_of_a_live_localnet(seen: str, workdir: Path, pid: int,
                                           tmp_path: Path) -> None:
    """validator1's dashboard (its URL printed by localnet) renders the live subnet in a real
    headless Chromium, and a second localnet on the same workdir is refused, naming `pid`."""
    from niche.cli import main

    match = re.search(r"dashboard \(.*\): (http://127\.0\.0\.1:\d+/)", seen)
    assert match, seen
    chromium = Path("/usr/bin/chromium")
    if chromium.exists():  # scripts/test.sh installs it (scripts/browser.sh)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(chromium), headless=True,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            try:
                page = browser.new_page()
                page.goto(match.group(1))
                page.wait_for_function("Number(document.body.dataset.rounds || 0) >= 1",
                                       timeout=60_000)
                row = page.locator("#miners tbody tr").first.inner_text()
                assert page.text_content("#network") == "localnet"
                if os.environ.get("NICHE_DASHBOARD_LOCALNET_SCREENSHOT"):
                    page.screenshot(path=os.environ["NICHE_DASHBOARD_LOCALNET_SCREENSHOT"],
                                    full_page=True)
            finally:
                browser.close()
        assert "flux-schnell" in row, row
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["localnet", "--workdir", str(workdir), "--prepare-only"]) == 2
    assert f"in use by another niche localnet (pid {pid}," in err.getvalue()


@pytest.mark.slow
def test_localnet_names_a_dead_child_and_stops_the_rest(tmp_path, tiny_root):
    workdir = tmp_path / "ln"
    proc = _start(["--miners", "1", "--models", "flux-schnell", "--workdir", str(workdir)],
                  tiny_root)
    try:
        seen = _read_until(proc, r"rounds done: validator1 1", timeout=240)
        _dashboard_and_lock_of_a_live_localnet(seen, workdir, proc.pid, tmp_path)
        miners = _processes_mentioning(str(workdir), "miner1", "--axon.port")
        assert miners, "miner1 process not found"
        os.kill(miners[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, out
    assert "miner1 exited with code -9" in out
    assert "stopped the other processes" in out
    assert _wait_gone(str(workdir)) == []


@pytest.mark.slow
def test_localnet_ctrl_c_stops_every_child(tmp_path, tiny_root):
    workdir = tmp_path / "ln"
    # Started with SIGINT ignored, as the whole suite once was from a background shell job:
    # the Ctrl-C was dropped and localnet ran on. The SIGINT lands right after the miner is
    # up, while the validator child is being forked: one interrupt must still stop all.
    proc = _start(["--miners", "1", "--models", "flux-schnell", "--workdir", str(workdir)],
                  tiny_root, sigint_ignored=True)
    try:
        _read_until(proc, r"miner1 is up", timeout=240)
        assert _processes_mentioning(str(workdir))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)  # a starved box stops slowly, but it stops
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert _wait_gone(str(workdir)) == []


def test_localnet_refuses_a_corrupt_chain_file(tmp_path, tiny_root, capsys):
    from niche.cli import main

    workdir = tmp_path / "ln"
    workdir.mkdir()
    (workdir / "chain.sqlite").write_bytes(b"this is not sqlite" * 100)
    code = main(["localnet", "--keep", "--workdir", str(workdir), "--model-path", str(tiny_root),
                 "--prepare-only"])
    err = capsys.readouterr().err
    assert code != 0
    assert "chain.sqlite" in err and "Traceback" not in err


def test_localnet_rejects_unknown_models_and_cheats(tmp_path, tiny_root, capsys):
    from niche.cli import main

    assert main(["localnet", "--models", "sdxl", "--workdir", str(tmp_path),
                 "--model-path", str(tiny_root), "--prepare-only"]) == 2
    assert "unknown ['sdxl']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["localnet", "--cheat", "bribe", "--workdir", str(tmp_path)])
