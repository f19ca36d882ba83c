"""What operators and newcomers hit first: a closed stdout pipe, help texts, a busy metrics
port found before anything slow, the validator saying which state file and round it resumes,
one timestamp per pm2 line, no progress-bar redraws in logs, a clean checkout after npm."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from niche.cli import build_parser, main
from niche.devnet.localnet.supervisor import free_port
from niche.validator.scoring import Outcome, ScoreBook, ScoringConfig, UidScore
from niche.validator.state import ValidatorState

ROOT = Path(__file__).resolve().parent.parent
NICHE = [sys.executable, "-m", "niche.cli"]


def _state(path: Path, uids: int = 400) -> None:
    """A state file whose `status --json` is larger than a pipe's buffer (64 KiB)."""
    book = ScoreBook(cfg=ScoringConfig())
    book.uids = {uid: UidScore(f"5Hot{uid:040d}", 0.5, "kolors") for uid in range(uids)}
    with ValidatorState(path) as state:
        state.save_round(0, book, [Outcome(1, book.uids[1].hotkey, "kolors", latency=1.0)],
                         {1: 0.5})


def test_status_into_a_closed_pipe_ends_quietly(tmp_path):
    path = tmp_path / "state.sqlite"
    _state(path)
    # `niche validator status --json | head -c 10`: the reader leaves before the writer ends
    proc = subprocess.Popen([*NICHE, "validator", "status", "--state", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert head.startswith(b"{") and err == "", err


def test_validator_help_describes_the_step_check(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["validator", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "audit the answers with the step check" in text
    assert "by regenerating" not in text  # the old description
    assert "--dashboard.port" in text


def test_niche_help_lists_download_under_models(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("models"))
    assert "download" in line


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("flag", ["--metrics.port", "--dashboard.port"])
def test_busy_port_stops_the_validator_before_the_chain(tmp_path, busy_port, capsys, flag):
    missing = tmp_path / "no-chain.sqlite"  # never reached: the port is checked first
    code = main(["validator", "--netuid", "1", "--subtensor.network", "localnet",
                 "--localnet.path", str(missing), flag, str(busy_port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (f"error: {flag} {busy_port} on 127.0.0.1 is "
                                     "already in use: pick another port"), err
    assert not missing.exists()


def test_busy_metrics_port_stops_the_miner_before_the_models(tmp_path, busy_port, capsys):
    from niche.chain.local import LocalChain
    from niche.chain.wallets import create_wallet

    wallet = create_wallet("m", "h", tmp_path / "w")
    chain = LocalChain(tmp_path / "chain.sqlite", create=True)
    chain.create_subnet(1)
    chain.register(1, wallet)
    chain.close()
    code = main(["miner", "--netuid", "1", "--subtensor.network", "localnet",
                 "--localnet.path", str(tmp_path / "chain.sqlite"), "--wallet.name", "m",
                 "--wallet.hotkey", "h", "--wallet.path", str(tmp_path / "w"),
                 "--axon.ip", "127.0.0.1", "--axon.port", str(free_port()),
                 "--model", "flux-schnell",
                 "--model-path", str(tmp_path / "no-models"), "--metrics.port", str(busy_port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--metrics.port" in err[-1] and "already in use" in err[-1], err


def test_start_up_line_names_the_state_file_and_the_round(tmp_path):
    from niche.commands.validator import resume_line

    path = tmp_path / "state.sqlite"
    with ValidatorState(path) as state:
        assert resume_line(state) == f"state file {path}: new, starting at round 0"
    _state(path, uids=2)
    with ValidatorState(path) as state:
        state.record_weights(0, 77, {1: 1.0}, True, "ok")
        assert resume_line(state) == (f"state file {path}: resuming at round 1 (1 round(s) "
                                      "completed, last weights at round 0 (block 77))")


def test_one_timestamp_per_pm2_line(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node: pm2's configs are not used here")
    app = json.loads(subprocess.run(
        [node, "-e", "const c = require('./configs/pm2/common.js'); "
         "console.log(JSON.stringify(c.nicheApp({name: 'x', args: ['validator']})))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout)
    assert app["time"] is True and app["env"]["NICHE_LOG_TIME"] == "0"
    validator = json.loads(subprocess.run(
        [node, "-e", "console.log(JSON.stringify(require('./configs/pm2/validator.config.js')"
         ".apps[0]))"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "NETUID": "1", "DASHBOARD_PORT": "8095"}).stdout)
    assert build_parser().parse_args(validator["args"]).dashboard_port == 8095
    script = textwrap.dedent("""
        import logging
        from niche.logging_setup import setup_logging
        setup_logging(debug=True)  # (debug: no library imports, same format)
        logging.getLogger("niche.validator").info("round 3 done")
    """)
    for env, expected in ((app["env"], "INFO niche.validator: round 3 done"), ({}, None)):
        err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**os.environ, "NICHE_LOG_TIME": "1", **env}, timeout=120,
                             check=True).stderr.strip()
        if expected:
            assert err == expected.replace("INFO", "INFO")
        else:  # run by hand: our own timestamp
            assert err.endswith("INFO niche.validator: round 3 done") and err[:4].isdigit()


def test_no_progress_bars_in_a_log(tiny_root, capfd):
    """A neuron whose stderr is a pipe (pm2, `> log`) loads its models without tqdm redraws."""
    import argparse

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    from huggingface_hub.utils import enable_progress_bars

    from niche.commands.logging_args import setup_logging_from_args
    from niche.models.engine import Engine

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert not sys.stderr.isatty()  # as under pm2
        setup_logging_from_args(argparse.Namespace(debug=False, trace=False, logging_dir=None),
                                "niche-validator")
        assert not dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()
        capfd.readouterr()
        Engine(models=["kolors"], model_root=tiny_root, device="cpu",
               pipelines={"kolors": ["txt2img"]}).family("kolors")
        err = capfd.readouterr().err
        assert "it/s]" not in err and "Loading" not in err, err[-2000:]
    finally:
        for lib in (dlog, tlog):
            lib.enable_progress_bar()
        enable_progress_bars()
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_npm_leaves_the_lock_alone_in_any_folder(tmp_path):
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("no npm")
    folder = tmp_path / "a-checkout-named-otherwise"
    folder.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(ROOT / name, folder / name)
    before = (folder / "package-lock.json").read_text()
    subprocess.run([npm, "install", "--package-lock-only", "--ignore-scripts", "--offline",
                    "--no-audit", "--no-fund"], cwd=folder, capture_output=True, check=True,
                   timeout=120)
    assert (folder / "package-lock.json").read_text() == before
    assert json.loads(before)["name"] == json.loads((ROOT / "package.json").read_text())["name"]

