"""`niche miner` as an operator runs it: clear one-line refusals, then a real process that
publishes its endpoint on the local chain, answers a signed query and stops on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from miner_support import NETUID, make_request, module_net

from niche.cli import main
from niche.devnet.localnet.supervisor import free_port
from niche.validator.client import MinerClient, QueryStatus

REPO = Path(__file__).resolve().parents[1]


net = module_net("clinet")


def argv(net, wallet: str, port: int, *extra: str) -> list[str]:
    return ["miner", "--netuid", str(NETUID), "--subtensor.network", "localnet",
            "--localnet.path", str(net.root / "chain.db"), "--wallet.name", wallet,
            "--wallet.hotkey", "hot", "--wallet.path", str(net.root / "wallets"),
            "--axon.ip", "127.0.0.1", "--axon.port", str(port), "--tiny", "--device", "cpu",
            *extra]


def test_unregistered_hotkey_refuses_to_start(net, capsys):
    assert main(argv(net, "stranger", free_port())) == 3  # pm2 stop_exit_codes: no restart loop
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: miner hotkey") and "not registered on subnet 1" in err
    assert len(err.splitlines()) == 1


def test_port_in_use_refuses_to_start(net, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(argv(net, "miner", busy.getsockname()[1])) == 2  # pm2 holds it
    err = capsys.readouterr().err.strip()
    assert "already in use" in err and len(err.splitlines()) == 1


def test_wildcard_ip_needs_external_ip(net, capsys):
    args = argv(net, "miner", free_port())
    args[args.index("127.0.0.1")] = "0.0.0.0"
    assert main(args) == 2
    assert "--axon.external_ip" in capsys.readouterr().err


def test_miner_process_serves_endpoint_and_stops_cleanly(net, tmp_path):
    port = free_port()
    log_path = tmp_path / "miner.log"
    hi = net.wallets["hi"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "neurons" / "miner.py"),
             *argv(net, "miner", port, "--model", "flux-schnell")[1:]],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        endpoint = None
        while time.monotonic() < deadline and proc.poll() is None:
            endpoint = net.chain.metagraph(NETUID).by_hotkey(net.miner_hotkey).endpoint
            if endpoint is not None and endpoint.port == port:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        assert proc.poll() is None, log_path.read_text()[-2000:]
        assert endpoint is not None and (endpoint.ip, endpoint.port) == ("127.0.0.1", port)
        result = asyncio.run(MinerClient(hi).query(
            (1, net.miner_hotkey, endpoint.url), make_request("a boat", 5,
                                                              model="flux-schnell")))
        assert result.status is QueryStatus.OK, result.reason
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log_path.read_text()
    assert f"endpoint 127.0.0.1:{port} served on subnet {NETUID}" in text
    assert "generate caller=" in text and "status=200" in text
    assert "miner stopped" in text
    assert "answers' states kept 600s for the audits:" in text and "cap auto:" in text


def test_cheat_flag_is_localnet_only(net, capsys):
    args = argv(net, "miner", free_port(), "--localnet.cheat", "other-seed")
    args[args.index("localnet")] = "finney"
    assert main(args) == 2
    assert "only runs on --subtensor.network localnet" in capsys.readouterr().err
    assert main(argv(net, "miner", free_port(), "--localnet.cheat", "nonsense")) == 2
    assert "choose from" in capsys.readouterr().err


def test_a_variant_that_does_not_verify_refuses_to_start(net, capsys):
    assert main(argv(net, "miner", free_port(), "--model", "flux-schnell",
                     "--quant", "flux-schnell=gguf-q4")) == 2  # a ConfigError
    err = capsys.readouterr().err.strip()
    assert "flux-schnell with gguf-q4 does not verify against the bf16 reference: " \
           "similarity" in err and "threshold 0.956" in err
    assert len(err.splitlines()) == 1
