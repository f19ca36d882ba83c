"""The validator and its registration: no permit -> refuses to start (exit code 3) or waits
with --wait-for-permit; no miner scores -> still a valid weight vector (all to its own uid);
deregistered mid-run -> ERROR line and exit code 3 after the round is persisted. Real
LocalChain files, real wallets, the real Engine on tiny checkpoints (no miners needed)."""
from __future__ import annotations

import functools
import logging
import threading

import miner_support
import pytest

from niche.chain.base import NotRegisteredError
from niche.chain.local import LocalChain
from niche.chain.registration import DEREGISTERED_EXIT_CODE
from niche.chain.wallets import create_wallet
from niche.cli import main
from niche.errors import ConfigError
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1


@pytest.fixture
def net(tmp_path):
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in ("validator", "other")}
    chain = LocalChain(tmp_path / "chain.db", create=True, block_time=0.05)
    chain.create_subnet(NETUID, max_uids=1, immunity_period=0, weights_rate_limit=0,
                        min_validator_stake=1.0)
    yield chain, wallets, tmp_path
    chain.close()


def make_validator(chain, wallet, tmp_path, tiny_engine, **config) -> Validator:
    config.setdefault("rounds", 1)
    cfg = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), round_interval=0,
                          epoch_length=1, audit_fraction=0.0, seed=1, **config)
    state = ValidatorState(tmp_path / "state.db")
    return Validator(cfg, chain, wallet, tiny_engine, MinerClient(wallet), state)


class InThread:
    """Build and run a Validator in its own thread (its SQLite state belongs to that thread)."""

    def __init__(self, *args, **config):
        self.code: int | None = None
        self.ready = threading.Event()
        self.validator: Validator
        self.round_index: int | None = None
        self.thread = threading.Thread(target=self._run, args=args, kwargs=config,
                                       daemon=True)
        self.thread.start()
        assert self.ready.wait(120), "validator not built"

    def _run(self, *args, **config) -> None:
        self.validator = make_validator(*args, **config)
        self.ready.set()
        try:
            self.code = self.validator.run()
        finally:
            self.round_index = self.validator.state.round_index

    def stop(self) -> None:
        self.validator.stop()
        self.thread.join(120)


wait_for = functools.partial(miner_support.wait_for, timeout=120.0)


def test_cli_refuses_to_start_without_a_permit(net, capsys):
    chain, _, root = net
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in ("validator",)}
    chain.register(NETUID, wallets["validator"], stake=0.0)
    code = main(["validator", "--netuid", str(NETUID), "--subtensor.network", "localnet",
                 "--localnet.path", str(chain.path), "--wallet.name", "validator",
                 "--wallet.hotkey", "hot", "--wallet.path", str(root / "wallets"),
                 "--models", "flux-schnell", "--tiny"])
    err = capsys.readouterr().err
    assert code == DEREGISTERED_EXIT_CODE == 3
    assert "no validator permit on subnet 1" in err and "--wait-for-permit" in err
    assert len(err.strip().splitlines()) == 1


def test_permitless_validator_run_refuses(net, tiny_engine):
    chain, wallets, root = net
    chain.register(NETUID, wallets["validator"], stake=0.0)
    validator = make_validator(chain, wallets["validator"], root, tiny_engine)
    with pytest.raises(NotRegisteredError, match="no validator permit") as e:
        validator.run()
    assert e.value.exit_code == 3
    assert chain.weights_history(NETUID) == []


def test_waits_for_a_permit_then_sets_weights_to_itself(net, tiny_engine, caplog):
    chain, wallets, root = net
    uid = chain.register(NETUID, wallets["validator"], stake=0.0)
    caplog.set_level(logging.INFO, logger="niche.validator")
    run = InThread(chain, wallets["validator"], root, tiny_engine,
                   wait_for_permit=True, permit_poll=0.05)
    wait_for(lambda: any("waiting for a validator permit" in r.getMessage()
                         for r in caplog.records), "the waiting line")
    assert chain.weights_history(NETUID) == []
    chain.set_stake(NETUID, wallets["validator"].hotkey.ss58_address, 10.0)
    run.thread.join(120)
    assert run.code == 0
    (report,) = run.validator.reports
    assert report.outcomes == []  # no miner on the subnet
    assert report.weights == {uid: 1.0}, report.weights_message
    assert "all weight to this validator's own uid" in report.weights_message
    (row,) = chain.weights_history(NETUID)
    assert row["uids"] == [uid] and row["weights"] == [1.0]


def test_a_stop_signal_ends_the_wait_for_a_permit(net, tiny_engine, caplog):
    chain, wallets, root = net
    chain.register(NETUID, wallets["validator"], stake=0.0)
    caplog.set_level(logging.WARNING, logger="niche.validator")
    run = InThread(chain, wallets["validator"], root, tiny_engine,
                   wait_for_permit=True, permit_poll=30)
    wait_for(lambda: any("waiting for a validator permit" in r.getMessage()
                         for r in caplog.records), "the waiting line")
    run.stop()
    assert run.code == 0 and run.validator.reports == []


@pytest.mark.parametrize("keep_running", [False, True])
def test_deregistered_mid_run(net, tiny_engine, caplog, keep_running):
    chain, wallets, root = net
    uid = chain.register(NETUID, wallets["validator"], stake=10.0)
    caplog.set_level(logging.INFO, logger="niche.validator")
    run = InThread(chain, wallets["validator"], root, tiny_engine, rounds=None,
                   keep_running_when_deregistered=keep_running)
    validator = run.validator
    try:
        wait_for(lambda: validator.reports, "a first round")
        # the permit goes with the stake; a newcomer takes the only uid
        chain.set_stake(NETUID, wallets["validator"].hotkey.ss58_address, 0.0)
        assert chain.register(NETUID, wallets["other"]) == uid
        wait_for(lambda: any("DEREGISTERED" in r.getMessage() for r in caplog.records),
                 "the deregistration line")
        if keep_running:
            last = validator.reports[-1].round  # reports keeps the last 10 only
            wait_for(lambda: any(r.round > last and "no uid of ours" in r.weights_message
                                 for r in list(validator.reports)),
                     "more rounds, one of them due to set weights")
            assert run.thread.is_alive() and validator.exit_code == 0
    finally:
        run.stop()
    errors = [r for r in caplog.records if "DEREGISTERED" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert f"uid {uid} now belongs to {wallets['other'].hotkey.ss58_address}" \
        in errors[0].getMessage()
    assert run.code == (0 if keep_running else DEREGISTERED_EXIT_CODE)
    # the round that noticed it was persisted
    assert run.round_index == validator.reports[-1].round + 1


def test_permit_poll_must_be_positive():
    with pytest.raises(ConfigError, match="--permit-poll"):
        ValidatorConfig(netuid=1, permit_poll=0)
