"""`niche validator` flags and start-up refusals: one line, no traceback, no model loaded."""
from __future__ import annotations

import errno
import sqlite3
import subprocess

import pytest

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.cli import build_parser, main
from niche.commands.validator import build_config
from niche.errors import NicheError


def parse(*extra):
    return build_parser().parse_args(["validator", "--netuid", "3", *extra])


def test_flags_build_the_config(tmp_path):
    args = parse("--neuron.sample_size", "8", "--neuron.timeout", "5", "--neuron.epoch_length",
                 "30", "--neuron.audit_fraction", "0.25", "--neuron.rounds", "2",
                 "--neuron.round_interval", "1.5", "--neuron.state_path",
                 str(tmp_path / "s.db"), "--models", "kolors", "flux-schnell",
                 "--neuron.emission_share", "kolors=0.7", "flux-schnell=0.3",
                 "--verify.threshold", "kolors=0.95", "--tiny", "--dtype", "bfloat16",
                 "--wallet.name", "v", "--wallet.hotkey", "h", "--subtensor.network",
                 "localnet", "--localnet.path", str(tmp_path / "c.db"))
    cfg = build_config(args)
    assert (cfg.netuid, cfg.sample_size, cfg.timeout, cfg.epoch_length) == (3, 8, 5.0, 30)
    assert (cfg.audit_fraction, cfg.rounds, cfg.round_interval) == (0.25, 2, 1.5)
    assert cfg.models == ("kolors", "flux-schnell")
    assert dict(cfg.scoring.model_shares) == {"kolors": 0.7, "flux-schnell": 0.3}
    assert cfg.verify.thresholds["kolors"] == 0.95
    assert (args.wallet_name, args.wallet_hotkey, args.subtensor_network) == ("v", "h",
                                                                             "localnet")
    assert args.tiny and args.dtype == "bfloat16"


@pytest.mark.parametrize("extra, message", [
    (["--neuron.audit_fraction", "1.5"], "audit_fraction"),
    (["--neuron.emission_share", "sdxl=1"], "not in --models"),
    (["--neuron.emission_share", "kolors"], "MODEL=VALUE"),
    (["--verify.threshold", "kolors=high"], "not a number"),
    (["--verify.threshold", "flux-schnell=2"], "a similarity is in (0, 1]"),
    (["--verify.threshold", "kolors=97"], "97 % is 0.97"),
    (["--verify.threshold", "kolors=-1"], "a similarity is in (0, 1]"),
    (["--verify.threshold", "kolors=0"], "a similarity is in (0, 1]"),
    (["--verify.threshold", "kolors=nan"], "a similarity is in (0, 1]"),
    (["--verify.threshold", "flux-schnel=0.9"], "'flux-schnel' is not one of --models"),
    (["--models", "kolors", "--verify.threshold", "flux-schnell=0.9"], "not one of --models"),
    (["--verify.threshold", "kolors/controlnet=0.9"], "unknown pipeline 'controlnet'"),
    (["--neuron.sample_size", "0"], "sample_size"),
])
def test_bad_flags_are_one_line_errors(extra, message, capsys):
    assert main(["validator", "--netuid", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


class EngineSpy:
    """Stands in for niche.models.engine.Engine: records every construction, then stops the
    start-up there (a NicheError, so `main` returns its exit code) instead of loading."""

    def __init__(self):
        self.built: list[dict] = []

    def __call__(self, **kwargs):
        self.built.append(kwargs)
        raise NicheError("engine spy: models would load here")


@pytest.fixture
def engine_spy(monkeypatch):
    import niche.models.engine

    spy = EngineSpy()
    monkeypatch.setattr(niche.models.engine, "Engine", spy)
    return spy


def _validator_argv(tmp_path, netuid: int) -> list[str]:
    return ["validator", "--netuid", str(netuid), "--subtensor.network", "localnet",
            "--localnet.path", str(tmp_path / "c.db"), "--wallet.name", "v",
            "--wallet.hotkey", "h", "--wallet.path", str(tmp_path / "w"),
            "--neuron.state_path", str(tmp_path / "s.db")]


def test_unregistered_validator_refuses_before_loading_models(tmp_path, capsys, engine_spy):
    wallet = create_wallet("v", "h", tmp_path / "w")
    chain = LocalChain(tmp_path / "c.db", create=True)
    chain.create_subnet(1)
    chain.close()
    code = main(_validator_argv(tmp_path, 1))
    err = capsys.readouterr().err
    assert code != 0 and "not registered on subnet 1" in err and "Traceback" not in err
    assert code == 3  # not registered: pm2 must not restart it (stop_exit_codes)
    assert main(_validator_argv(tmp_path, 9)) == 2  # configuration: pm2 holds it
    assert "subnet 9 does not exist" in capsys.readouterr().err
    # nothing was loaded or opened: no engine built, no state file created
    assert engine_spy.built == []
    assert not (tmp_path / "s.db").exists()

    # control: once registered, start-up gets as far as building the engine (the spy is live)
    chain = LocalChain(tmp_path / "c.db")
    chain.register(1, wallet, stake=10.0)
    chain.close()
    assert main(_validator_argv(tmp_path, 1)) != 0
    assert "engine spy: models would load here" in capsys.readouterr().err
    assert [b["models"] for b in engine_spy.built] == [["flux-schnell", "kolors"]]


@pytest.fixture
def full_disk(tmp_path):
    """A real 32 MiB tmpfs at tmp_path/full (root and mount(8) needed: skipped otherwise)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_is_one_line_before_the_models_load(tmp_path, full_disk, capsys,
                                                        engine_spy):
    """pm2 restarted a validator on a full disk every 10 s, each time loading the models
    before its first write failed (exit 1): now the write comes first, exit 2 (held)."""
    wallet = create_wallet("v", "h", tmp_path / "w")
    chain = LocalChain(tmp_path / "c.db", create=True)
    chain.create_subnet(1)
    chain.register(1, wallet, stake=10.0)
    chain.close()
    argv = _validator_argv(tmp_path, 1)
    argv[argv.index("--neuron.state_path") + 1] = str(full_disk / "s.db")
    assert main(argv) == 1  # the control: a state file is made, start-up reaches the models
    assert "engine spy" in capsys.readouterr().err and len(engine_spy.built) == 1
    # a reader (the dashboard, the gateway) keeps the file's -wal and -shm in place, so it
    # still opens on the full disk, as a killed validator's file does
    reader = sqlite3.connect(full_disk / "s.db")
    try:
        reader.execute("SELECT count(*) FROM meta").fetchone()
        _fill(full_disk)
        assert main(argv) == 2
    finally:
        reader.close()
    err = capsys.readouterr().err
    assert "disk is full" in err and "engine spy" not in err and "Traceback" not in err
    assert len(engine_spy.built) == 1  # no model loaded this time
