"""One Ctrl-C on a running `niche localnet` keeps the honest miners' scores and weights: the
validator is stopped first and finishes its round while the miners still answer, so its last
audits never meet dead endpoints (they used to zero and exclude every honest miner)."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

NICHE = [str(Path(sys.executable).with_name("niche"))]


@pytest.mark.slow
def test_one_ctrl_c_keeps_the_honest_miners_weights(tmp_path, tiny_root):
    workdir = tmp_path / "ln"
    proc = subprocess.Popen(
        NICHE + ["localnet", "--miners", "2", "--models", "flux-schnell", "--no-gateway",
                 "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, NICHE_TINY_DIR=str(tiny_root)))
    seen = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if re.search(r"rounds done: validator1 2", line):
                break
        else:
            raise AssertionError("no second round:\n" + "".join(seen))
        # Mid-round: right after the miners answered round 3's challenges, before the audit
        # fetches their states (the moment a stop used to kill them under the validator).
        logs = [workdir / "logs" / f"miner{i}.log" for i in (1, 2)]
        answered = [log.read_text().count("generate caller=") for log in logs]
        while (time.monotonic() < deadline
               and any(log.read_text().count("generate caller=") <= n
                       for log, n in zip(logs, answered, strict=True))):
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 130, out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(miner\d)\s+\S+\s+(\S+)\s+(\S+)\s+(\d+)/(\d+)\s+\S+\s+"
                     r"([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(2)] = dict(verified=int(m.group(5)), audited=int(m.group(6)),
                                    score=float(m.group(7)), weight=float(m.group(8)))
    assert set(rows) == {"miner1", "miner2"}, out
    for name, row in rows.items():
        assert row["verified"] == row["audited"] >= 2, (name, out)
        assert row["score"] > 0 and row["weight"] > 0, (name, out)
    validator_log = (workdir / "logs" / "validator1.log").read_text()
    assert "validator stopped after 3 round(s)" in validator_log, validator_log  # finished it
    state = workdir / "state" / "validator1.sqlite"
    with sqlite3.connect(state) as db:
        zeros = db.execute("SELECT round, status, reason FROM history WHERE status != 'ok' "
                           "OR audit_passed = 0").fetchall()
    assert zeros == [], zeros
