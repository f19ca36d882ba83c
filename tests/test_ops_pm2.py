"""pm2 configs: loaded by real node and run by real pm2. A variable not set passes no flag
(so pm2's defaults are the CLI's), list variables are split into separate arguments, and a
configuration error (exit 2) is not restarted."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from niche.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PM2 = REPO / "configs" / "pm2"
NEURON_VARS = ("NETUID", "MODEL", "MODELS", "EXTRA_ARGS", "DEVICE", "MIN_STAKE", "SAMPLE_SIZE",
               "AUDIT_FRACTION", "STATE_PATH", "WALLET_NAME", "WALLET_HOTKEY", "AXON_PORT",
               "SUBTENSOR_NETWORK", "MEMORY_MODE", "MODEL_PATH", "WALLET_PATH",
               "AXON_EXTERNAL_IP", "LOGGING_DEBUG", "METRICS_PORT", "ORGANIC_QUEUE",
               "VALIDATOR_STATE", "GATEWAY_IP", "GATEWAY_PORT", "GATEWAY_DB",
               "GATEWAY_AUDIT_FRACTION", "GATEWAY_PUBLIC_URL", "CORS_ORIGINS", "NICHE_LOG_DIR",
               "LOCALNET_DIR", "LOCALNET_FRESH", "LOCALNET_MINERS", "LOCALNET_MODELS",
               "LOCALNET_ROUNDS")


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the pm2 config tests need it")
    return node


def _load_all(config: str, **variables: str) -> subprocess.CompletedProcess:
    """Node requiring `config` with only `variables` set; stdout is the apps as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in NEURON_VARS}
    env.update(variables)
    script = f"console.log(JSON.stringify(require({json.dumps(str(PM2 / config))}).apps))"
    return subprocess.run([_node(), "-e", script], env=env, capture_output=True, text=True,
                          timeout=60)


def _load(config: str, **variables: str) -> dict:
    """The app pm2 would start from `config`, with only `variables` set."""
    loaded = _load_all(config, **variables)
    assert loaded.returncode == 0, loaded.stderr
    return json.loads(loaded.stdout)[0]


@pytest.mark.parametrize("config,command", [("miner.config.js", ["miner"]),
                                            ("validator.config.js", ["validator"]),
                                            ("gateway.config.js", ["gateway", "serve"])])
def test_defaults_are_the_clis(config, command):
    app = _load(config, NETUID="23")
    parsed = build_parser().parse_args(app["args"])
    cli = build_parser().parse_args([*command, "--netuid", "23"])
    assert vars(parsed) == vars(cli)


def test_gateway_config_takes_the_run_command_of_docs_gateway(tmp_path):
    """docs/gateway.md's `niche gateway serve` beside a validator, from variables; the
    validator takes the same ORGANIC_QUEUE."""
    queue, state, db = tmp_path / "organic.sqlite", tmp_path / "v.sqlite", tmp_path / "g.sqlite"
    app = _load("gateway.config.js", NETUID="23", SUBTENSOR_NETWORK="test",
                WALLET_NAME="validator", WALLET_HOTKEY="hk", WALLET_PATH=str(tmp_path / "w"),
                GATEWAY_IP="0.0.0.0", GATEWAY_PORT="8000", ORGANIC_QUEUE=str(queue),
                VALIDATOR_STATE=str(state), GATEWAY_DB=str(db), METRICS_PORT="9102",
                GATEWAY_AUDIT_FRACTION="0.25", MODELS="kolors flux-schnell",
                CORS_ORIGINS="https://a.example https://b.example",
                EXTRA_ARGS="--gateway.deadline 90")
    assert app["name"] == "niche-gateway-validator-hk"
    assert app["args"][:2] == ["gateway", "serve"] and app["stop_exit_codes"] == [2, 3]
    args = build_parser().parse_args(app["args"])
    cli = build_parser().parse_args([
        "gateway", "serve", "--netuid", "23", "--subtensor.network", "test",
        "--wallet.name", "validator", "--wallet.hotkey", "hk", "--wallet.path",
        str(tmp_path / "w"), "--gateway.ip", "0.0.0.0", "--gateway.port", "8000",
        "--gateway.organic_queue", str(queue), "--gateway.validator_state", str(state),
        "--gateway.db", str(db), "--metrics.port", "9102", "--gateway.audit_fraction", "0.25",
        "--models", "kolors", "flux-schnell", "--gateway.cors_origins", "https://a.example",
        "https://b.example", "--gateway.deadline", "90"])
    assert vars(args) == vars(cli)
    validator = build_parser().parse_args(
        _load("validator.config.js", NETUID="23", ORGANIC_QUEUE=str(queue))["args"])
    assert str(validator.organic_queue) == str(queue)


def test_log_dir_follows_niche_log_dir(tmp_path):
    """NICHE_LOG_DIR moves every app's pm2 logs (created if missing); default <checkout>/logs."""
    logs = tmp_path / "deep" / "logs"
    for config in ("miner.config.js", "validator.config.js", "gateway.config.js",
                   "miner-ray.config.js"):
        app = _load(config, NETUID="1", NICHE_LOG_DIR=str(logs))
        assert Path(app["out_file"]).parent == logs and Path(app["error_file"]).parent == logs
    assert logs.is_dir()
    app = _load("auto_update.config.js", PROCESSES="x", NICHE_LOG_DIR=str(logs))
    assert Path(app["out_file"]).parent == logs
    assert Path(_load("miner.config.js", NETUID="1")["out_file"]).parent == REPO / "logs"


def test_list_variables_are_split_and_extra_args_pass_any_flag():
    app = _load("miner.config.js", NETUID="5", MODEL="flux-schnell  kolors",
                EXTRA_ARGS="--queue.max_size 3 --limits.stake_proportional",
                LOGGING_DEBUG="1", AXON_EXTERNAL_IP="203.0.113.7", METRICS_PORT="9100")
    args = build_parser().parse_args(app["args"])
    assert args.models == ["flux-schnell", "kolors"]
    assert args.queue_max_size == 3 and args.stake_proportional is True
    assert args.debug is True and args.axon_external_ip == "203.0.113.7"
    assert args.metrics_port == 9100
    validator = build_parser().parse_args(_load("validator.config.js", NETUID="5",
                                                MODELS="kolors flux-schnell")["args"])
    assert validator.models == ["kolors", "flux-schnell"]


@pytest.mark.parametrize("config,variable", [("miner.config.js", "MODELS"),
                                              ("validator.config.js", "MODEL"),
                                              ("gateway.config.js", "MODEL")])
def test_the_other_configs_name_for_the_models_is_not_dropped(config, variable):
    """MODEL is the miner's variable and MODELS the validator's: the other spelling was
    silently dropped, and the app ran with the default models."""
    app = _load(config, NETUID="5", **{variable: "kolors"})
    assert build_parser().parse_args(app["args"]).models == ["kolors"]


def test_both_spellings_of_the_models_flag_work():
    parser = build_parser()
    assert parser.parse_args(["miner", "--netuid", "1", "--models", "kolors"]).models == [
        "kolors"]
    assert parser.parse_args(["validator", "--netuid", "1", "--model", "kolors"]).models == [
        "kolors"]


def test_configuration_errors_and_deregistration_are_not_restarted():
    for config in ("miner.config.js", "validator.config.js"):
        assert _load(config, NETUID="1")["stop_exit_codes"] == [2, 3]


def _pm2() -> str:
    local = REPO / "node_modules" / ".bin" / "pm2"
    if not local.exists():
        pytest.skip("pm2 is not installed (bash scripts/setup.sh installs it from package.json)")
    return str(local)


def _jlist(pm2: str, env: dict) -> dict:
    listed = json.loads(subprocess.run([pm2, "jlist"], env=env, check=True,
                                       capture_output=True, text=True, timeout=60).stdout)
    return listed[0]


@pytest.mark.slow
def test_real_pm2_does_not_restart_a_configuration_error(tmp_path):
    """pm2 5 still shows such an app as "waiting restart" (it sets that status before it
    checks stop_exit_codes) but schedules no restart: restart_time stays 0 and pid 0 past
    the restart delay, where without stop_exit_codes it restarts."""
    pm2 = _pm2()
    niche = Path(sys.executable).with_name("niche")
    env = {k: v for k, v in os.environ.items() if k not in NEURON_VARS}
    env.update(PM2_HOME=str(tmp_path / "pm2home"), NICHE_BIN=str(niche), NETUID="1",
               EXTRA_ARGS="--axon.port 0")  # a configuration error: exit 2
    try:
        subprocess.run([pm2, "start", str(PM2 / "miner.config.js")], env=env, check=True,
                       capture_output=True, timeout=120)
        app = _jlist(pm2, env)
        delay = app["pm2_env"]["restart_delay"] / 1000
        deadline = time.monotonic() + 300
        while app["pm2_env"].get("exit_code") is None and time.monotonic() < deadline:
            time.sleep(0.5)  # the process imports torch and bittensor before it exits
            app = _jlist(pm2, env)
        assert app["pm2_env"].get("exit_code") == 2, app["pm2_env"]
        time.sleep(delay + 5)  # past the restart delay: a restart would have happened
        app = _jlist(pm2, env)
        assert app["pm2_env"]["restart_time"] == 0 and app["pid"] == 0, app["pm2_env"]
    finally:
        subprocess.run([pm2, "kill"], env=env, capture_output=True, timeout=60)


@pytest.mark.slow
def test_rehearsal_writes_its_logs_under_its_own_folder(tmp_path, tiny_root):
    """scripts/rehearse-miner-pm2.sh keeps everything under REHEARSAL_DIR: the app's pm2
    logs go to REHEARSAL_DIR/logs (NICHE_LOG_DIR), not into the checkout's logs/."""
    pm2 = _pm2()
    rehearsal = tmp_path / "rehearsal"
    repo_log = REPO / "logs" / "niche-miner-rehearsal-miner.err.log"
    repo_log_before = repo_log.stat().st_mtime_ns if repo_log.exists() else None
    env = {k: v for k, v in os.environ.items() if k not in NEURON_VARS}
    env.update(PM2_HOME=str(tmp_path / "pm2home"), PM2=pm2, REHEARSAL_DIR=str(rehearsal),
               HOME=str(tmp_path / "home"), NICHE_TINY_DIR=str(tiny_root),
               NICHE_BIN=str(Path(sys.executable).with_name("niche")))
    try:
        done = subprocess.run(["bash", str(REPO / "scripts" / "rehearse-miner-pm2.sh")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    finally:
        subprocess.run([pm2, "kill"], env=env, capture_output=True, timeout=60)
    assert (rehearsal / "logs" / "niche-miner-rehearsal-miner.out.log").exists()
    assert (rehearsal / "logs" / "niche-miner-rehearsal-miner.err.log").stat().st_size > 0
    after = repo_log.stat().st_mtime_ns if repo_log.exists() else None
    assert after == repo_log_before, "the rehearsal wrote into the checkout's logs/"
