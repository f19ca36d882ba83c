"""A miner process dies or is stopped while a validator waits on it.

The miner runs as a real process (`serve()`: uvicorn, signal handlers, endpoint published on a
LocalChain file). Its engine is the StubEngine double from miner_support, changed to announce
"GENERATING" on stdout and hold the generation for a while: the test must land its signal
while a request is inside the GPU worker, which the real engine (40 ms per tiny image) gives
no window for.
"""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from miner_support import NETUID, make_request, module_net

from niche.devnet.localnet.supervisor import free_port
from niche.validator.client import MinerClient, MinerTarget, QueryStatus

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

MINER = textwrap.dedent("""
    import logging, sys, time
    sys.path.insert(0, sys.argv[1])
    from miner_support import StubEngine
    from niche.chain.local import LocalChain
    from niche.chain.wallets import load_wallet
    from niche.miner.server import serve
    from niche.miner.service import MinerConfig, MinerService
    from niche.protocol import ModelInfo, PipelineKind

    class Held(StubEngine):
        model = "flux-schnell"

        def served(self):
            return [ModelInfo(model="flux-schnell", pipelines=[PipelineKind.TXT2IMG])]

        def generate(self, params, image=None):
            print("GENERATING", params.prompt, flush=True)
            time.sleep(float(sys.argv[5]))
            out = super().generate(params, image)
            print("GENERATED", params.prompt, flush=True)
            return out

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    root, port = sys.argv[2], int(sys.argv[3])
    chain = LocalChain(root + "/chain.db")
    wallet = load_wallet(sys.argv[4], "hot", root + "/wallets")
    service = MinerService(Held(), wallet, MinerConfig(
        netuid=1, requests_per_minute=0, metagraph_refresh=3600), chain=chain)
    serve(service, "127.0.0.1", port)
    print("EXITING", flush=True)
""")


class MinerProcess:
    def __init__(self, root: Path, wallet: str, hold: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MINER, str(TESTS), str(root), str(self.port), wallet,
             str(hold)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_ready(self, timeout: float = 180) -> None:  # a deadline for hangs only
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.output)
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("miner did not start:\n" + "".join(self.output))

    def wait_for(self, marker: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.lines.get(timeout=0.1).startswith(marker):
                    return
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.output)
        raise AssertionError(f"no {marker}:\n" + "".join(self.output))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


net = module_net("faultnet")


def _in_thread(fn):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, box


def test_miner_killed_mid_request_round_moves_on(net, tiny_engine, tmp_path):
    """SIGKILL while the validator's request is in the miner's GPU worker: the client
    records the broken connection at once (no waiting for the timeout), the healthy miner
    is scored, and the round is persisted."""
    from test_faults_chain import _FluxOnly

    from niche.chain.wallets import create_wallet
    from niche.devnet.servers import BackgroundServer
    from niche.miner.server import create_app
    from niche.miner.service import MinerConfig, MinerService
    from niche.validator.service import Validator, ValidatorConfig
    from niche.validator.state import ValidatorState

    healthy_wallet = create_wallet("healthy", "hot", net.root / "wallets")
    healthy_uid = net.chain.register(NETUID, healthy_wallet)
    victim = MinerProcess(net.root, "miner", hold=60)
    victim_uid = net.chain.metagraph(NETUID).by_hotkey(net.miner_hotkey).uid
    healthy = MinerService(_FluxOnly(tiny_engine), healthy_wallet,
                           MinerConfig(netuid=NETUID, requests_per_minute=0), chain=net.chain)
    wallet = net.wallets["hi"]
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), timeout=20.0,
                             state_path=tmp_path / "state.db", audit_fraction=0.0, seed=5,
                             epoch_length=10_000, round_interval=0)
    state = ValidatorState(config.state_path)
    validator = Validator(config, net.chain, wallet, tiny_engine, MinerClient(wallet), state)
    try:
        victim.wait_ready()
        with BackgroundServer(create_app(healthy, refresh_metagraph=False)) as server:
            healthy.announce("127.0.0.1", server.port)
            killed: dict = {}

            def kill_when_generating():
                victim.wait_for("GENERATING")
                killed["at"] = time.monotonic()
                victim.kill()

            killer = threading.Thread(target=kill_when_generating, daemon=True)
            killer.start()
            report = asyncio.run(validator.run_round())  # the state is this thread's
            moved_on = time.monotonic() - killed["at"]
            killer.join(5)
    finally:
        victim.kill()
        healthy.close()
    by_uid = {o.uid: o for o in report.outcomes}
    dead, alive = by_uid[victim_uid], by_uid[healthy_uid]
    assert dead.status == "unreachable" and report.rewards[victim_uid] == 0.0, dead
    assert alive.status == "ok" and report.rewards[healthy_uid] > 0, alive
    # waiting for the dead miner would take its whole 20 s timeout; any less proves it did not
    assert moved_on < config.timeout, f"round took {moved_on:.1f}s after the kill"
    assert state.round_index == 1
    row = state.history(uid=victim_uid)[0]
    assert row.status == "unreachable" and row.reason
    state.close()


def test_sigterm_finishes_in_flight_work_and_exits_0(net):
    """SIGTERM while a generation runs and another waits in the queue: both callers get a
    verified image (or a documented refusal), new connections are refused, exit code 0."""
    miner = MinerProcess(net.root, "miner", hold=3.0)
    target = MinerTarget(0, net.miner_hotkey, miner.url)
    try:
        miner.wait_ready()
        client = MinerClient(net.wallets["hi"])
        first, box1 = _in_thread(lambda: asyncio.run(client.query(target, make_request(
            "first", 1, model="flux-schnell"))))
        miner.wait_for("GENERATING")
        second, box2 = _in_thread(lambda: asyncio.run(MinerClient(net.wallets["mid"]).query(
            target, make_request("second", 2, model="flux-schnell"))))
        # the second request is admitted before the signal: queued behind the first (the
        # miner's own queue says so), or on a slow box already generating
        deadline = time.monotonic() + 30
        while httpx.get(miner.url + "/healthz", timeout=10).json()["queue"] < 1 \
                and "GENERATING second" not in "".join(miner.output):
            assert time.monotonic() < deadline and second.is_alive(), "second never queued"
            time.sleep(0.05)
        miner.proc.send_signal(signal.SIGTERM)
        first.join(20)
        second.join(20)
        assert miner.proc.wait(20) == 0, "".join(miner.output)
    finally:
        miner.kill()
    one, two = box1["value"], box2["value"]
    assert one.status is QueryStatus.OK, one.reason
    assert one.image is not None and one.response.request_id == one.request_id
    assert two.status is QueryStatus.OK or (
        two.status is QueryStatus.HTTP_ERROR and two.http_status == 503), two.reason
    log = "".join(miner.output)
    assert "SIGTERM received" in log and "miner stopped" in log and "EXITING" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(miner.url + "/healthz", timeout=2)


def test_sigterm_during_startup_exits_0(net):
    """pm2 stop (SIGTERM) while the models are still loading: a clean exit 0, not death by
    signal."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "niche.cli", "miner", "--netuid", str(NETUID),
         "--subtensor.network", "localnet", "--localnet.path", str(net.root / "chain.db"),
         "--wallet.name", "miner", "--wallet.hotkey", "hot",
         "--wallet.path", str(net.root / "wallets"), "--axon.ip", "127.0.0.1",
         "--axon.port", str(port), "--tiny", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "loading" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output[-2000:]
    assert "SIGTERM" in output
