"""pm2 really starts the local subnet from configs/pm2/localnet.config.js; loading the config
again (restart, stop, delete) reuses the prepared workdir instead of wiping it."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pm2" / "localnet.config.js"
LOCALNET_VARS = ("LOCALNET_DIR", "LOCALNET_FRESH", "LOCALNET_MINERS", "LOCALNET_MODELS",
                 "LOCALNET_ROUNDS", "NICHE_BIN", "NICHE_LOG_DIR")


def _fake_plan(workdir: Path, port: int) -> dict:
    return {"workdir": str(workdir), "chain_path": str(workdir / "chain.sqlite"), "netuid": 1,
            "wallet_path": str(workdir / "wallets"), "model_root": "/m", "rounds": None,
            "processes": [
                {"name": "validator1", "role": "validator", "hotkey_name": "validator1",
                 "hotkey": "5V", "args": ["validator", "--models", "flux-schnell", "kolors"]},
                {"name": "miner1", "role": "miner", "hotkey_name": "miner1", "hotkey": "5M",
                 "args": ["miner", "--axon.port", str(port)], "port": port}],
            "gateway_url": None, "gateway_key": None, "dashboard_url": None}


def _load_config(tmp_path: Path, **variables: str) -> tuple[subprocess.CompletedProcess, Path]:
    """node requires the localnet config with a fake niche that records its calls and prints
    tmp_path/new-plan.json; returns the result and the record of calls."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the pm2 config tests need it")
    calls = tmp_path / "niche-calls"
    fake = tmp_path / "fake-niche"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncat {tmp_path / "new-plan.json"}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in LOCALNET_VARS}
    env.update(NICHE_BIN=str(fake), **variables)
    script = f"console.log(JSON.stringify(require({json.dumps(str(CONFIG))}).apps))"
    return subprocess.run([node, "-e", script], env=env, capture_output=True, text=True,
                          timeout=60), calls


def test_an_existing_plan_is_reused_not_prepared_again(tmp_path):
    """`pm2 restart|stop|delete configs/pm2/localnet.config.js` loads the config again: it
    must read WORKDIR/plan.json, not run `niche localnet --prepare-only` (a new chain, state
    and logs wiped under the running apps)."""
    workdir = tmp_path / "ln"
    workdir.mkdir()
    plan = _fake_plan(workdir, 40001)
    (workdir / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "new-plan.json").write_text(json.dumps(_fake_plan(workdir, 40002)))
    loaded, calls = _load_config(tmp_path, LOCALNET_DIR=str(workdir), LOCALNET_MINERS="3")
    assert loaded.returncode == 0, loaded.stderr
    assert not calls.exists(), f"prepared again: niche {calls.read_text()}"
    apps = json.loads(loaded.stdout)
    assert [a["name"] for a in apps] == ["localnet-validator1", "localnet-miner1"]
    assert [a["args"] for a in apps] == [p["args"] for p in plan["processes"]]
    assert all(Path(a["out_file"]).parent == workdir / "logs" for a in apps)
    assert (workdir / "logs").is_dir()
    assert "reusing" in loaded.stderr and "LOCALNET_MINERS=3 (plan: 1)" in loaded.stderr


def test_a_new_workdir_is_prepared(tmp_path):
    workdir = tmp_path / "ln"
    (tmp_path / "new-plan.json").write_text(json.dumps(_fake_plan(workdir, 40002)))
    loaded, calls = _load_config(tmp_path, LOCALNET_DIR=str(workdir), LOCALNET_MINERS="1",
                                 LOCALNET_MODELS="kolors")
    assert loaded.returncode == 0, loaded.stderr
    assert calls.read_text().split() == ["localnet", "--prepare-only", "--json", "--workdir",
                                         str(workdir), "--miners", "1", "--models", "kolors"]
    assert json.loads(loaded.stdout)[1]["args"] == ["miner", "--axon.port", "40002"]


def test_fresh_prepares_again_only_when_nothing_of_the_plan_runs(tmp_path):
    """LOCALNET_FRESH=1 re-prepares (wipes) a workdir, but not while a process of its plan
    still answers on its port."""
    workdir = tmp_path / "ln"
    workdir.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        (workdir / "plan.json").write_text(json.dumps(_fake_plan(workdir, port)))
        (tmp_path / "new-plan.json").write_text(json.dumps(_fake_plan(workdir, 40002)))
        loaded, calls = _load_config(tmp_path, LOCALNET_DIR=str(workdir), LOCALNET_FRESH="1")
        assert loaded.returncode != 0 and "LOCALNET_FRESH=1 refused" in loaded.stderr
        assert str(port) in loaded.stderr and not calls.exists()
    loaded, calls = _load_config(tmp_path, LOCALNET_DIR=str(workdir), LOCALNET_FRESH="1")
    assert loaded.returncode == 0, loaded.stderr
    assert calls.read_text().startswith("localnet --prepare-only")
    assert json.loads(loaded.stdout)[1]["args"] == ["miner", "--axon.port", "40002"]


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
def test_pm2_starts_restarts_and_deletes_the_localnet(tmp_path, tiny_root):
    """`pm2 start <config>` brings up the validator, two miners and the gateway until weights
    are on the local chain; then the config header's own usage: `pm2 restart <config>` keeps
    the chain, state, logs, ports and gateway key and brings the apps back online (they set
    weights again on the same chain); `pm2 delete <config>` removes the apps without
    preparing again."""
    from niche.chain.local import LocalChain

    pm2 = _pm2()
    niche = Path(sys.executable).with_name("niche")
    workdir = tmp_path / "ln"
    env = {k: v for k, v in os.environ.items() if k not in LOCALNET_VARS}
    env.update(PM2_HOME=str(tmp_path / "pm2home"), LOCALNET_DIR=str(workdir),
               LOCALNET_MINERS="2", NICHE_BIN=str(niche), NICHE_TINY_DIR=str(tiny_root))

    def pm2_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([pm2, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"pm2 {' '.join(args)}: {done.stderr}{done.stdout}"
        return done

    def apps() -> dict:
        return {a["name"]: a for a in json.loads(pm2_run("jlist").stdout)}

    def weights() -> list:
        chain = LocalChain(workdir / "chain.sqlite")
        try:
            return chain.weights_history(1)
        finally:
            chain.close()

    def wait_for(what: str, check, seconds: float = 300):
        deadline = time.monotonic() + seconds
        while not check():
            if time.monotonic() > deadline:
                logs = "\n".join(p.name + ":\n" + p.read_text(errors="replace")[-1500:]
                                 for p in (workdir / "logs").glob("localnet-*.log"))
                pytest.fail(f"{what} not within {seconds} s; pm2 logs:\n{logs}")
            time.sleep(2)

    try:
        pm2_run("start", str(CONFIG))
        assert sorted(apps()) == ["localnet-gateway", "localnet-miner1", "localnet-miner2",
                                  "localnet-validator1"]
        wait_for("weights on the local chain", lambda: bool(weights()))
        assert abs(sum(weights()[-1]["weights"]) - 1.0) < 1e-6
        assert all(a["pm2_env"]["status"] == "online" for a in apps().values())
        plan = (workdir / "plan.json").read_text()
        chain_inode = (workdir / "chain.sqlite").stat().st_ino
        before = weights()
        state = workdir / "state" / "validator1.sqlite"
        assert state.exists()
        miner_log = workdir / "logs" / "localnet-miner1.err.log"
        log_head = miner_log.read_bytes()
        pids = {name: app["pid"] for name, app in apps().items()}

        restarted = pm2_run("restart", str(CONFIG))
        assert (workdir / "plan.json").read_text() == plan, "the localnet was prepared again"
        assert "reusing" in restarted.stderr
        assert (workdir / "chain.sqlite").stat().st_ino == chain_inode
        assert weights()[:len(before)] == before and state.exists()
        assert miner_log.read_bytes().startswith(log_head), "the logs were wiped"

        def back_online() -> bool:
            now = apps()
            return sorted(now) == sorted(pids) and all(
                a["pm2_env"]["status"] == "online" and a["pid"] not in (0, pids[n])
                for n, a in now.items())
        wait_for("every app online again with a new pid", back_online, 120)
        wait_for("new weights after the restart", lambda: len(weights()) > len(before))
        assert all(a["pm2_env"]["status"] == "online" for a in apps().values())

        pm2_run("delete", str(CONFIG))
        assert apps() == {}
        assert (workdir / "plan.json").read_text() == plan
        assert (workdir / "chain.sqlite").stat().st_ino == chain_inode and state.exists()
        assert miner_log.read_bytes().startswith(log_head)
    finally:
        subprocess.run([pm2, "kill"], env=env, capture_output=True, timeout=60)
