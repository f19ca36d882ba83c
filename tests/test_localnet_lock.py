"""Two `niche localnet` runs on one workdir: the second is refused in one line naming the
first (a real second process holds the lock), and the lock goes with its holder."""
from __future__ import annotations

import subprocess
import sys

from niche.cli import main
from niche.devnet.localnet.lock import LOCK_NAME

HOLD = """
import sys, time
from pathlib import Path
from niche.devnet.localnet.lock import workdir_lock
with workdir_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_localnet_on_a_workdir_is_refused_while_the_first_runs(tmp_path, capsys):
    workdir = tmp_path / "localnet"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "held"
        marker = workdir / "chain.sqlite"
        marker.write_text("the first run's chain")
        assert main(["localnet", "--workdir", str(workdir), "--prepare-only"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another niche localnet (pid {first.pid}," in err[0]
        assert "--workdir" in err[0]
        assert marker.read_text() == "the first run's chain"  # nothing of it was wiped
    finally:
        first.kill()
        first.wait(timeout=30)
    # the holder is gone (killed: no clean-up ran): the kernel released its lock
    assert main(["localnet", "--workdir", str(workdir), "--prepare-only", "--miners", "1",
                 "--no-gateway"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"prepared {workdir.resolve()} ")
    assert not any("gateway" in line for line in out)  # --no-gateway
    assert (workdir / LOCK_NAME).exists() and (workdir / "plan.json").exists()


def test_prepare_only_prints_what_pm2_users_open(tmp_path, capsys):
    """Under pm2 nothing else prints them: the dashboard URL and the gateway's URL and key,
    the same as plan.json holds."""
    import json

    workdir = tmp_path / "pm2net"
    assert main(["localnet", "--workdir", str(workdir), "--prepare-only", "--miners", "1"]) == 0
    out = capsys.readouterr().out
    plan = json.loads((workdir / "plan.json").read_text())
    assert plan["gateway_key"] and f"API key: {plan['gateway_key']}" in out
    assert f"{plan['gateway_url']}/v1" in out and plan["dashboard_url"] in out
