"""`niche chain metagraph --hotkey SS58`: one hotkey's row with emission and trust columns,
on a real local chain file; the bittensor adapter maps the SDK's emission and trust."""
from __future__ import annotations

import json
from types import SimpleNamespace

import bittensor as bt

from niche.chain.subtensor import SubtensorChain
from niche.cli import main


def _net(tmp_path, capsys):
    db, wp = tmp_path / "chain.db", tmp_path / "wallets"
    assert main(["chain", "create-subnet", "--localnet.path", str(db), "--netuid", "3"]) == 0
    hotkeys = {}
    for name in ("val", "miner"):
        assert main(["chain", "wallet-create", "--wallet.name", name, "--wallet.hotkey", "hk",
                     "--wallet.path", str(wp)]) == 0
        hotkeys[name] = capsys.readouterr().out.split("hotkey ")[-1].split()[0]
    net = ["--subtensor.network", "localnet", "--localnet.path", str(db), "--netuid", "3"]
    for name in ("val", "miner"):
        assert main(["chain", "register", *net, "--wallet.name", name, "--wallet.hotkey", "hk",
                     "--wallet.path", str(wp)]) == 0
    capsys.readouterr()
    return net, hotkeys


def test_hotkey_filter_shows_one_row_with_emission_and_trust(tmp_path, capsys):
    net, hotkeys = _net(tmp_path, capsys)
    assert main(["chain", "metagraph", *net, "--hotkey", hotkeys["miner"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["UID", "HOTKEY", "STAKE", "VPERMIT", "ENDPOINT", "INCENTIVE",
                                "EMISSION", "TRUST", "UPDATED"]
    assert len(lines) == 3 and lines[2].split()[:2] == ["1", hotkeys["miner"]]
    assert main(["chain", "metagraph", *net, "--hotkey", hotkeys["val"], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [n["hotkey"] for n in data["neurons"]] == [hotkeys["val"]]
    assert data["neurons"][0]["emission"] == 0.0 and data["neurons"][0]["trust"] == 0.0


def test_unknown_hotkey_is_one_line(tmp_path, capsys):
    net, _ = _net(tmp_path, capsys)
    assert main(["chain", "metagraph", *net, "--hotkey", "5Nobody"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hotkey 5Nobody is not registered on subnet 3" in err[0]


def test_subtensor_adapter_maps_emission_and_trust():
    neuron = SimpleNamespace(uid=0, hotkey="5Hot", coldkey="5Cold",
                             total_stake=bt.Balance.from_tao(10), validator_permit=False,
                             axon=None, last_update=5, incentive=0.5, trust=0.75,
                             emission=bt.Balance.from_tao(0.125))
    sdk = SimpleNamespace(subnets=SimpleNamespace(
        metagraph=lambda netuid, commitments=True: SimpleNamespace(block=9, neurons=[neuron])))
    mg = SubtensorChain("test", sdk=sdk, sleep=lambda _s: None).metagraph(1)
    assert mg.neurons[0].emission == 0.125 and mg.neurons[0].trust == 0.75
