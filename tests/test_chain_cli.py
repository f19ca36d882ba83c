"""`niche chain ...` through niche.cli.main, on a real chain file and real wallets."""
from __future__ import annotations

import argparse
import json

import pytest

from niche.cli import main
from niche.commands.chain_args import add_chain_args, add_wallet_args


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_localnet_round_trip(tmp_path, capsys):
    db, wp = tmp_path / "chain.db", tmp_path / "wallets"
    code, out, _ = run(capsys, "chain", "create-subnet", "--localnet.path", db, "--netuid", 7,
                       "--tempo", 12)
    assert code == 0 and "subnet 7" in out and "tempo 12" in out
    for name in ("val", "miner"):
        code, out, _ = run(capsys, "chain", "wallet-create", "--wallet.name", name,
                           "--wallet.hotkey", "hk", "--wallet.path", wp)
        assert code == 0 and "hotkey 5" in out
    net = ["--subtensor.network", "localnet", "--localnet.path", db, "--netuid", 7]
    code, out, _ = run(capsys, "chain", "register", *net, "--wallet.name", "val",
                       "--wallet.hotkey", "hk", "--wallet.path", wp, "--stake", 500)
    assert code == 0 and "as uid 0 on subnet 7" in out
    code, out, _ = run(capsys, "chain", "register", *net, "--wallet.name", "miner",
                       "--wallet.hotkey", "hk", "--wallet.path", wp)
    assert code == 0 and "as uid 1" in out
    code, out, _ = run(capsys, "chain", "metagraph", *net, "--json")
    data = json.loads(out)
    assert code == 0 and data["netuid"] == 7
    assert [(n["uid"], n["stake"], n["validator_permit"]) for n in data["neurons"]] == [
        (0, 500.0, True), (1, 0.0, False)]
    code, out, _ = run(capsys, "chain", "metagraph", *net)
    lines = out.splitlines()
    assert code == 0 and lines[1].split()[:4] == ["UID", "HOTKEY", "STAKE", "VPERMIT"]
    assert lines[2].split()[0] == "0" and "500.000" in lines[2] and "yes" in lines[2]


@pytest.mark.parametrize("argv, message", [
    (["chain", "metagraph", "--subtensor.network", "mainnet", "--netuid", "1"],
     "unknown network 'mainnet'"),
    (["chain", "metagraph", "--subtensor.network", "localnet", "--netuid", "1"],
     "needs --localnet.path"),
    (["chain", "metagraph", "--subtensor.network", "localnet", "--localnet.path", "{db}",
      "--netuid", "3"], "subnet 3 does not exist"),
    (["chain", "register", "--subtensor.network", "localnet", "--localnet.path", "{db}",
      "--netuid", "1", "--wallet.name", "ghost", "--wallet.path", "{tmp}"],
     "coldkeypub.txt of wallet 'ghost'"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, message):
    db = tmp_path / "c.db"
    main(["chain", "create-subnet", "--localnet.path", str(db), "--netuid", "1"])
    capsys.readouterr()
    argv = [a.format(db=db, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code != 0 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_chain_file_via_cli(tmp_path, capsys):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\x00garbage" * 500)
    code, _, err = run(capsys, "chain", "metagraph", "--subtensor.network", "localnet",
                       "--localnet.path", bad, "--netuid", 1)
    assert code == 1 and "not a readable niche chain file" in err and "create-subnet" in err


def test_real_network_register_needs_yes(tmp_path, capsys, monkeypatch):
    """On a real network `register` prints its plan and does nothing without --yes."""
    import bittensor as bt
    from test_chain_subtensor import FakeSDK  # no node can run here: the SDK object is faked

    sdk = FakeSDK()
    monkeypatch.setattr(bt, "Subtensor", lambda target: sdk)
    wp = tmp_path / "w"
    main(["chain", "wallet-create", "--wallet.name", "op", "--wallet.path", str(wp)])
    capsys.readouterr()
    argv = ["chain", "register", "--subtensor.network", "test", "--netuid", "2",
            "--wallet.name", "op", "--wallet.path", str(wp)]
    code, out, err = run(capsys, *argv)
    assert code == 1 and "would burn-register" in out and "0.500000 TAO" in out
    assert "--yes" in err and not any("BurnedRegister" in c for c in sdk.calls)
    code, out, _ = run(capsys, *argv, "--yes")
    assert code == 0 and "as uid 5 on subnet 2 (test)" in out


def test_shared_flag_helpers():
    parser = argparse.ArgumentParser()
    add_chain_args(parser)
    add_wallet_args(parser)
    args = parser.parse_args([])
    assert (args.netuid, args.subtensor_network, args.localnet_path) == (None, "finney", None)
    assert (args.wallet_name, args.wallet_hotkey) == ("default", "default")
    assert args.wallet_path == "~/.bittensor/wallets" and args.subtensor_chain_endpoint is None
    args = parser.parse_args(["--netuid", "4", "--subtensor.network", "localnet",
                              "--localnet.path", "/tmp/x.db", "--wallet.name", "a",
                              "--wallet.hotkey", "b", "--subtensor.chain_endpoint", "ws://h:1"])
    assert (args.netuid, args.localnet_path.name, args.wallet_name, args.wallet_hotkey) == (
        4, "x.db", "a", "b")
    assert args.subtensor_chain_endpoint == "ws://h:1"
