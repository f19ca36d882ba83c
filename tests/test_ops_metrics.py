"""Metrics on their own port: the miner's axon no longer serves /metrics; the metrics server
binds 127.0.0.1 unless --metrics.host says otherwise; miner metrics carry uid, stake,
incentive and registration; the validator exports rounds, answers, audits, failures and
weights set."""
from __future__ import annotations

import httpx
import pytest
import torch
from miner_support import NETUID, StubEngine, build_net, running_miner

from niche.chain.wallets import create_wallet
from niche.cli import build_parser
from niche.devnet.localnet.supervisor import free_port
from niche.errors import ConfigError
from niche.metrics_server import start_metrics_server
from niche.miner.metrics import MinerMetrics
from niche.validator.client import MinerClient
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and " " in line:
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                return float(value)
    raise AssertionError(f"{name} not in metrics:\n{text}")


def test_axon_port_no_longer_serves_metrics_the_metrics_port_does(tmp_path):
    net = build_net(tmp_path)
    net.chain.set_stake(NETUID, net.miner_hotkey, 7.5)
    with running_miner(net, StubEngine()) as m:
        assert httpx.get(m.url + "/metrics").status_code == 404
        assert m.metrics_url.startswith("http://127.0.0.1:")
        text = httpx.get(m.metrics_url).text
    uid = net.chain.metagraph(NETUID).by_hotkey(net.miner_hotkey).uid
    assert _value(text, "niche_miner_registered") == 1.0
    assert _value(text, "niche_miner_uid") == uid
    assert _value(text, "niche_miner_stake") == 7.5
    assert _value(text, "niche_miner_incentive") == 0.0
    assert ("niche_miner_gpu_memory_allocated_bytes" in text) == torch.cuda.is_available()


def test_a_deregistered_miner_reports_zero():
    metrics = MinerMetrics()
    metrics.set_neuron(None, block=12)
    text = metrics.render().decode()
    assert _value(text, "niche_miner_registered") == 0.0
    assert _value(text, "niche_miner_uid") == -1.0
    assert _value(text, "niche_miner_metagraph_block") == 12.0


@pytest.mark.parametrize("command", [["miner", "--netuid", "1"], ["validator", "--netuid", "1"]])
def test_metrics_flags_default_off_and_local(command):
    args = build_parser().parse_args(command)
    assert args.metrics_port is None and args.metrics_host == "127.0.0.1"
    args = build_parser().parse_args([*command, "--metrics.port", "9100", "--metrics.host",
                                      "0.0.0.0"])
    assert args.metrics_port == 9100 and args.metrics_host == "0.0.0.0"


def test_metrics_server_binds_loopback_and_a_busy_port_is_one_line():
    server = start_metrics_server(MinerMetrics().registry, 0)
    try:
        assert server.server.server_address[0] == "127.0.0.1"
        with pytest.raises(ConfigError, match=f"--metrics.port {server.port} on 127.0.0.1 "
                                              "is already in use"):
            start_metrics_server(MinerMetrics().registry, server.port)
    finally:
        server.close()
    with pytest.raises(ConfigError, match="0..65535"):
        start_metrics_server(MinerMetrics().registry, 70000)


def test_validator_exports_rounds_answers_audits_and_weights(tmp_path, tiny_engine):
    from test_validator_service import Only, miners

    from niche.chain.local import LocalChain

    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets")
               for n in ("validator", "honest", "dead")}
    clock = [1000.0]
    chain = LocalChain(tmp_path / "chain.db", create=True, clock=lambda: clock[0])
    clock[0] += 120 * chain.block_time  # weights land at block 120, not at a genesis block 0
    chain.create_subnet(NETUID, weights_rate_limit=2, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    for name in ("honest", "dead"):
        chain.register(NETUID, wallets[name])
    chain.serve(NETUID, wallets["dead"], "127.0.0.1", free_port())  # nobody listens there
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1,
                             state_path=tmp_path / "state.db", audit_fraction=1.0, seed=3,
                             epoch_length=1000, round_interval=0, info_timeout=5.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
    with ValidatorState(config.state_path) as state:
        validator = Validator(config, chain, wallets["validator"], tiny_engine,
                              MinerClient(wallets["validator"]), state)
        server = start_metrics_server(validator.metrics.registry, 0)
        try:
            with miners(chain, wallets, {"honest": Only(tiny_engine, "flux-schnell")}):
                assert validator.run() == 0
            text = httpx.get(server.url).text
        finally:
            server.close()
    chain.close()
    assert _value(text, "niche_validator_rounds_total") == 1.0
    assert 'niche_validator_answers_total{status="ok"} 1.0' in text
    assert 'niche_validator_answers_total{status="unreachable"} 1.0' in text
    assert 'niche_validator_audits_total{outcome="pass"} 1.0' in text
    assert 'niche_validator_weights_set_total{result="ok"} 1.0' in text
    assert _value(text, "niche_validator_last_weights_block") == validator.last_weights_block \
        == 120
