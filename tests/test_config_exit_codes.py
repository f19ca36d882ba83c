"""Every configuration error of `niche miner` and `niche validator` exits 2 with one line,
before any model loads: pm2 holds a process that exits 2 (restarting cannot fix a wallet
name) instead of restarting it every few seconds."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.cli import main
from niche.devnet.localnet.supervisor import free_port

NETUID = 1


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgnet")
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in ("miner", "validator")}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["miner"])
    chain.register(NETUID, wallets["validator"], stake=100.0)
    chain.close()
    return root


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def _base(role: str, root: Path) -> dict[str, str]:
    flags = {"--netuid": str(NETUID), "--subtensor.network": "localnet",
             "--localnet.path": str(root / "chain.db"), "--wallet.name": role,
             "--wallet.hotkey": "hot", "--wallet.path": str(root / "wallets")}
    if role == "miner":
        flags.update({"--axon.ip": "127.0.0.1", "--axon.port": str(free_port()),
                      "--model": "flux-schnell", "--states.path": str(root / "st.sqlite")})
    else:
        flags.update({"--models": "flux-schnell",
                      "--neuron.state_path": str(root / "validator.sqlite")})
    return flags


def _mistakes(root: Path, busy: int) -> dict[str, dict[str, str]]:
    blocker = root / "a-file"
    blocker.write_text("x")
    return {
        "wallet": {"--wallet.name": "nobody"},
        "hotkey": {"--wallet.hotkey": "nothot"},
        "chain file": {"--localnet.path": str(root / "missing.db")},
        "network": {"--subtensor.network": "nonet"},
        "subnet": {"--netuid": "7"},
        "metrics port": {"--metrics.port": str(busy)},
        "model": {"--model": "sdxl"},
        "axon port": {"--axon.port": str(busy)},
        "states file": {"--states.path": str(blocker / "states.sqlite")},
    }


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_every_configuration_error_exits_2_in_one_line(role, net, busy_port, capsys):
    for what, change in _mistakes(net, busy_port).items():
        if role == "validator":
            if what in ("axon port", "states file"):
                continue
            if what == "model":
                change = {"--models": "sdxl"}
        flags = {**_base(role, net), **change}
        argv = [role, "--tiny"] + [x for pair in flags.items() for x in pair]
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error:")]
        assert code == 2, (role, what, err)
        assert len(errors) == 1 and "Traceback" not in "\n".join(err), (role, what, err)
        assert not any("loading" in line for line in err), (role, what, err)
