"""`niche validator` stopped (SIGTERM, as pm2 stop does) while it is still starting: loading
models can take minutes, and a stop then must be a clean exit 0, not death by signal. (A stop
once rounds run is tests/test_validator_service.py::test_process_sigkill_then_resume_then_sigterm.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from miner_support import NETUID, build_net

REPO = Path(__file__).resolve().parents[1]


def test_validator_sigterm_during_startup_exits_0(tmp_path):
    net = build_net(tmp_path)
    net.chain.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "niche.cli", "validator", "--netuid", str(NETUID),
         "--subtensor.network", "localnet", "--localnet.path", str(tmp_path / "chain.db"),
         "--wallet.name", "hi", "--wallet.hotkey", "hot", "--wallet.path",
         str(tmp_path / "wallets"), "--neuron.state_path", str(tmp_path / "state.db"),
         "--models", "flux-schnell", "--tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    state = tmp_path / "state.db"
    try:
        # The state file is opened after the SIGTERM handler is installed and the chain checks
        # pass, right before the models load: its appearance, not a guessed delay, says the
        # validator is inside start-up. The deadline only bounds a hang.
        deadline = time.monotonic() + 180
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.exists() and proc.poll() is None, proc.communicate(timeout=60)[0]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, output[-2000:]
    assert "SIGTERM" in output
