"""pm2 really starts the local subnet from configs/pm2/localnet.config.js."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pm2() -> str:
    local = REPO / "node_modules" / ".bin" / "pm2"
    if local.exists():
        return str(local)
    found = shutil.which("pm2")
    if found:
        return found
    if not shutil.which("npm"):
        pytest.skip("npm is not installed, so pm2 cannot be installed: pm2 test skipped")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    assert local.exists(), "npm install did not provide node_modules/.bin/pm2"
    return str(local)


@pytest.mark.slow
def test_pm2_starts_localnet_until_weights_are_set(tmp_path, tiny_root):
    from niche.chain.local import LocalChain

    pm2 = _pm2()
    niche = Path(sys.executable).with_name("niche")
    env = dict(os.environ, PM2_HOME=str(tmp_path / "pm2home"), LOCALNET_DIR=str(tmp_path / "ln"),
               LOCALNET_MINERS="2", NICHE_BIN=str(niche), NICHE_TINY_DIR=str(tiny_root))
    config = REPO / "configs" / "pm2" / "localnet.config.js"

    def pm2_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([pm2, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    try:
        started = pm2_run("start", str(config))
        assert started.returncode == 0, started.stderr + started.stdout
        listing = json.loads(pm2_run("jlist").stdout)
        names = sorted(app["name"] for app in listing)
        assert names == ["localnet-gateway", "localnet-miner1", "localnet-miner2",
                         "localnet-validator1"]

        chain_file = tmp_path / "ln" / "chain.sqlite"
        deadline = time.monotonic() + 300
        history: list = []
        while time.monotonic() < deadline:
            chain = LocalChain(chain_file)
            try:
                history = chain.weights_history(1)
            finally:
                chain.close()
            if history:
                break
            time.sleep(2)
        logs = "\n".join(p.read_text(errors="replace")[-2000:]
                         for p in (tmp_path / "ln" / "logs").glob("localnet-*.log"))
        assert history, f"no weights on the local chain within 300 s; pm2 logs:\n{logs}"
        assert abs(sum(history[-1]["weights"]) - 1.0) < 1e-6
        apps = json.loads(pm2_run("jlist").stdout)
        statuses = {app["name"]: app["pm2_env"]["status"] for app in apps}
        assert statuses["localnet-miner1"] == "online" and statuses["localnet-miner2"] == "online"
    finally:
        pm2_run("delete", "all")
        pm2_run("kill")
