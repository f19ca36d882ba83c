"""scripts/auto_update.sh against a local bare git repository with release tags (never the
network) and a real pm2 daemon (its own PM2_HOME): up to date, dry run, update + reinstall +
restart, a failed reinstall rolled back, local changes left alone, usage errors."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_localnet_pm2 import _pm2

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "auto_update.sh"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


def release(src: Path, tag: str, setup_exit: int = 0) -> None:
    """A release whose scripts/setup.sh records which tag it installed."""
    (src / "scripts").mkdir(exist_ok=True)
    (src / "scripts" / "setup.sh").write_text(
        f"echo installed {tag} > installed.txt\nexit {setup_exit}\n")
    (src / "VERSION").write_text(tag + "\n")
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", f"release {tag}")
    git(src, "tag", tag)
    git(src, "push", "-q", "origin", "HEAD:refs/heads/main", "--tags")


@pytest.fixture
def repos(tmp_path):
    bare, src, deploy = tmp_path / "niche.git", tmp_path / "src", tmp_path / "deploy"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(tmp_path, "init", "-q", str(src))
    git(src, "remote", "add", "origin", str(bare))
    release(src, "v0.1.0")
    git(tmp_path, "clone", "-q", str(bare), str(deploy))
    git(deploy, "-c", "advice.detachedHead=false", "checkout", "-q", "tags/v0.1.0")
    return src, deploy


@pytest.fixture
def pm2(tmp_path):
    binary = _pm2()
    env = {**os.environ, "PM2_HOME": str(tmp_path / "pm2home")}
    subprocess.run([binary, "start", "/bin/sleep", "--name", "demo", "--interpreter", "none",
                    "--", "600"], env=env, check=True, capture_output=True, timeout=120)
    yield binary, env
    subprocess.run([binary, "kill"], env=env, capture_output=True, timeout=120)


def update(deploy: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--repo", str(deploy), *args], text=True,
                          capture_output=True, env={**(env or os.environ), **GIT_ENV},
                          timeout=300)


def restarts(binary: str, env) -> int:
    out = subprocess.run([binary, "jlist"], env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout
    (demo,) = [p for p in json.loads(out[out.index("["):]) if p["name"] == "demo"]
    return int(demo["pm2_env"]["restart_time"])


def test_up_to_date_dry_run_then_update_and_restart(repos, pm2):
    src, deploy = repos
    binary, env = pm2
    same = update(deploy, "--pm2", binary, "demo", env=env)
    assert same.returncode == 0 and "up to date at v0.1.0" in same.stdout, same.stderr
    release(src, "v0.2.0")
    release(src, "v0.10.0")  # newer than v0.2.0 as a version, older as a string
    dry = update(deploy, "--dry-run", "--pm2", binary, "demo", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would check out v0.10.0 (now v0.1.0)" in dry.stdout
    assert (deploy / "VERSION").read_text() == "v0.1.0\n" and restarts(binary, env) == 0
    done = update(deploy, "--pm2", binary, "demo", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (deploy / "VERSION").read_text() == "v0.10.0\n"
    assert (deploy / "installed.txt").read_text() == "installed v0.10.0\n"
    assert restarts(binary, env) == 1
    again = update(deploy, "--pm2", binary, "demo", env=env)
    assert "up to date at v0.10.0" in again.stdout and restarts(binary, env) == 1


def test_a_failed_reinstall_goes_back_and_restarts_nothing(repos):
    src, deploy = repos
    release(src, "v0.2.0", setup_exit=1)
    result = update(deploy, "--pm2", "/bin/false", "demo")
    assert result.returncode == 1 and "reinstall failed" in result.stdout
    assert (deploy / "VERSION").read_text() == "v0.1.0\n"
    assert git(deploy, "describe", "--tags") == "v0.1.0"


def test_local_changes_are_left_alone(repos):
    src, deploy = repos
    release(src, "v0.2.0")
    (deploy / "VERSION").write_text("edited\n")
    result = update(deploy, "--pm2", "/bin/false", "demo")
    assert result.returncode == 1 and "local changes" in result.stdout
    assert (deploy / "VERSION").read_text() == "edited\n"


def test_no_tags_and_usage_errors(tmp_path, repos):
    _, deploy = repos
    assert update(deploy).returncode == 2  # no process named
    assert update(deploy, "--bogus", "demo").returncode == 2
    none = update(deploy, "--pattern", "release-*", "demo")
    assert none.returncode == 0 and "no release tag" in none.stdout
    assert "--dry-run" in update(deploy, "--help").stdout


def test_pm2_entry_runs_the_script_on_a_schedule():
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the pm2 config cannot be read")
    code = ("const c = require(process.argv[1]); console.log(JSON.stringify(c.apps[0]));")
    config = REPO / "configs" / "pm2" / "auto_update.config.js"
    out = subprocess.run([node, "-e", code, str(config)], capture_output=True, text=True,
                         env={**os.environ, "PROCESSES": "niche-miner  niche-validator",
                              "DRY_RUN": "1"}, check=True, timeout=60).stdout
    app = json.loads(out)
    assert app["script"] == str(SCRIPT) and app["autorestart"] is False
    assert app["args"] == ["--dry-run", "niche-miner", "niche-validator"]
    assert app["cron_restart"] == "*/30 * * * *"
    missing = subprocess.run([node, "-e", code, str(config)], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PROCESSES"},
                             timeout=60)
    assert missing.returncode != 0 and "set PROCESSES" in missing.stderr
