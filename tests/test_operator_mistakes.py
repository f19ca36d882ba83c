"""A hurried operator's mistakes, each through the real `niche` CLI: one line, an exit code
pm2 holds (2, or 3 for a registration), and nothing loaded first. Each of these was a
traceback and exit 1 (pm2 restarting it every 10 s, reloading the models), a silent no-op
or a failure shown to API users."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_support import one_line_error

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.cli import main
from niche.devnet.localnet.supervisor import free_port


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("operator")
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(1, max_validators=4)
    chain.register(1, create_wallet("op", "miner", root / "wallets"))
    chain.register(1, create_wallet("op", "validator", root / "wallets"), stake=1000.0)
    create_wallet("op", "unregistered", root / "wallets")
    chain.close()
    return root


@pytest.fixture
def cli(capsys, monkeypatch):
    """`niche ARGS` in this process (its start-up checks come before any model loads), as
    a CompletedProcess; `env` set for the call."""
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def _chain(net: Path, hotkey: str) -> list[str]:
    return ["--subtensor.network", "localnet", "--localnet.path", str(net / "chain.db"),
            "--netuid", "1", "--wallet.name", "op", "--wallet.hotkey", hotkey,
            "--wallet.path", str(net / "wallets")]


def _miner(cli, net: Path, *extra: str, hotkey: str = "miner", env=None):
    return cli("miner", *_chain(net, hotkey), "--axon.ip", "127.0.0.1", "--axon.port",
                str(free_port()), "--tiny", "--device", "cpu", "--model", "flux-schnell",
                "--states.path", str(net / f"states-{free_port()}.sqlite"), *extra, env=env)


def _validator(cli, net: Path, *extra: str, env=None):
    return cli("validator", *_chain(net, "validator"), "--tiny", "--device", "cpu",
                "--models", "flux-schnell", "--neuron.rounds", "1",
                "--neuron.state_path", str(net / "vstate.sqlite"), *extra, env=env)


def _not_loaded(done: subprocess.CompletedProcess) -> None:
    assert "loading" not in done.stderr and "Loading" not in done.stderr, done.stderr[-2000:]


def test_a_hotkey_path_that_is_a_folder(cli, net):
    hotkeys = net / "wallets" / "folder" / "hotkeys"
    (hotkeys / "miner").mkdir(parents=True, exist_ok=True)
    (net / "wallets" / "folder" / "coldkeypub.txt").write_text(
        (net / "wallets" / "op" / "coldkeypub.txt").read_text())
    done = cli("miner", *_chain(net, "miner")[:-4], "--wallet.name", "folder",
                "--wallet.hotkey", "miner", "--wallet.path", str(net / "wallets"),
                "--axon.ip", "127.0.0.1", "--axon.port", str(free_port()), "--tiny")
    assert "is a folder, not a key file" in one_line_error(done)


@pytest.mark.parametrize("value", ["four", "0"])
def test_a_bad_thread_count_in_the_environment(cli, net, value):
    done = _miner(cli, net, env={"NICHE_NUM_THREADS": value})
    assert f"NICHE_NUM_THREADS={value!r}" in one_line_error(done)
    _not_loaded(done)


@pytest.mark.parametrize("flags,said", [
    (["--num-threads", "-3"], "--num-threads must be at least 1, not -3"),
    (["--num-threads", "10000"], "--num-threads 10000 is more than"),
    (["--blacklist.allow_hotkeys", "notanss58"], "'notanss58' is not an SS58 hotkey address"),
], ids=["threads", "too-many-threads", "allow-hotkeys"])
def test_a_bad_miner_flag(cli, net, flags, said):
    done = _miner(cli, net, *flags)
    assert said in one_line_error(done)
    _not_loaded(done)


def test_a_prompts_file_that_is_not_utf8(cli, net):
    prompts = net / "latin1.txt"
    prompts.write_bytes("a red caf\xe9 at dusk\n".encode("latin-1"))
    done = _validator(cli, net, "--neuron.prompts_file", str(prompts))
    assert "is not UTF-8 text" in one_line_error(done)
    _not_loaded(done)


def test_one_port_given_twice(cli, net):
    port = str(free_port())
    miner = cli("miner", *_chain(net, "miner"), "--axon.ip", "127.0.0.1",
                 "--axon.port", port, "--metrics.port", port, "--tiny")
    assert f"--metrics.port {port} is the same port as --axon.port" in one_line_error(miner)
    _not_loaded(miner)
    validator = _validator(cli, net, "--metrics.port", port, "--dashboard.port", port)
    assert "--dashboard.port" in one_line_error(validator) and "same port" in validator.stderr
    _not_loaded(validator)


def test_a_gateway_signing_with_an_unregistered_hotkey_exits_3(cli, net):
    done = cli("gateway", "serve", *_chain(net, "unregistered"), "--models",
                "flux-schnell", "--gateway.port", str(free_port()),
                "--gateway.db", str(net / "gw.sqlite"))
    line = one_line_error(done, code=3)
    assert "gateway hotkey" in line and "not registered on subnet 1" in line
    assert not (net / "gw.sqlite").exists()


def test_a_metagraph_refresh_of_zero(cli, net):
    for value in ("0", "-1", "inf", "soon"):
        done = _miner(cli, net, "--metagraph.refresh", value)
        assert done.returncode == 2 and "expected seconds > 0" in done.stderr


def test_a_gateway_given_another_validators_state_or_another_file(cli, net):
    from niche.validator.state import ValidatorState

    theirs = net / "their-state.sqlite"
    with ValidatorState(theirs) as state:
        state.bind("localnet", 1, "5SomeOtherValidatorHotkey")
    args = ["gateway", "serve", *_chain(net, "validator"), "--models", "flux-schnell",
            "--gateway.port", str(free_port()), "--gateway.db", str(net / "gw2.sqlite")]
    done = cli(*args, "--gateway.validator_state", str(theirs))
    line = one_line_error(done)
    assert "belongs to network localnet, netuid 1, hotkey 5SomeOtherValidatorHotkey" in line
    chain = net / "chain.db"  # not a validator state at all
    done = cli(*args, "--gateway.validator_state", str(chain))
    assert "not a niche validator state" in one_line_error(done)
    assert not (net / "gw2.sqlite").exists()


@pytest.mark.parametrize("command", ["miner", "generate", "bench"])
def test_a_device_torch_does_not_know(cli, net, command):
    """--device tpu was a torch RuntimeError traceback and exit 1 once the models loaded
    (under pm2: restarted every 10 s)."""
    if command == "miner":
        done = _miner(cli, net, "--device", "tpu")
    elif command == "generate":
        done = cli("generate", "--tiny", "--model", "kolors", "--prompt", "x", "--seed", "7",
                   "--out", str(net / "g.png"), "--device", "cuda:abc")
    else:
        done = cli("bench", "--tiny", "--device", "tpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "argument --device" in done.stderr and "is not a device niche runs on" in done.stderr
    _not_loaded(done)


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999", "x"])
def test_a_bench_seed_outside_the_protocols_range(cli, seed):
    done = cli("bench", "--tiny", "--seed", seed)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "argument --seed" in done.stderr


@pytest.mark.parametrize("flags,said", [
    (["--name", "a\nb"], "printable characters"),
    (["--name", "x\x1b[31mred"], "printable characters"),
    (["--name", "   "], "not only blanks"),
    (["--name", "ok", "--per-day", "99999999999999999999999"], "--per-day must be in 1.."),
    (["--name", "ok", "--per-minute", str(2**70)], "--per-minute must be in 1.."),
], ids=["newline", "escape", "blank", "huge-day", "huge-minute"])
def test_a_gateway_key_with_a_bad_name_or_limit(cli, tmp_path, flags, said):
    db = tmp_path / "gateway.sqlite"
    done = cli("gateway", "keys", "create", *flags, "--gateway.db", str(db))
    assert said in one_line_error(done)


def test_a_localnet_with_more_neurons_than_uids(cli, tmp_path):
    done = cli("localnet", "--miners", "64", "--workdir", str(tmp_path / "ln"),
               "--prepare-only")
    assert "run at most 63 miners" in one_line_error(done)
    assert not (tmp_path / "ln" / "chain.sqlite").exists()
