"""Validator rounds end to end on the real path: a LocalChain file, real wallets, miners
(the miner engineer's FastAPI server) on 127.0.0.1 backed by the real Engine on tiny
checkpoints, the validator's signed async client, regeneration, scoring, weights on chain.

The dishonest miners are real miners whose engine computes something else (another seed)
or replays its first image: cheat strategies, not test doubles.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from miner_support import announced_miners

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.localnet.supervisor import free_port
from niche.miner.service import MinerConfig
from niche.validator.client import MinerClient
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1


class OtherSeed:
    """A cheating miner's engine: answers with another seed's image, claims the asked one."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, params, image=None):
        return self.generate_with_states(params, image)[0]

    def generate_with_states(self, params, image=None):
        return self._engine.generate_with_states(
            params.model_copy(update={"seed": params.seed + 1}), image)


class Replayer(OtherSeed):
    """A cheating miner's engine: computes once, then answers everything with that image."""

    cached = None

    def generate_with_states(self, params, image=None):
        if self.cached is None:
            self.cached = self._engine.generate_with_states(params, image)
        return self.cached


class Only(OtherSeed):
    """A miner that declares one model (what its operator chose to serve)."""

    def __init__(self, engine, model):
        super().__init__(engine)
        self._model = model

    def served(self):
        return [m for m in self._engine.served() if m.model == self._model]

    def generate_with_states(self, params, image=None):
        return self._engine.generate_with_states(params, image)


def miners(chain, wallets, engines):
    """Start one miner server per (name, engine) and publish its endpoint on chain."""
    config = MinerConfig(netuid=NETUID, requests_per_minute=0)
    return announced_miners(chain, {name: (engine, wallets[name], config)
                                    for name, engine in engines.items()})


@pytest.fixture
def net(tmp_path_factory):
    """A fresh chain per test: the tests set weights and serve endpoints, so a shared one
    made them depend on their order."""
    root = tmp_path_factory.mktemp("valnet")
    names = ("validator", "honest", "kolors", "cheat", "replay", "dead")
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in names}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, weights_rate_limit=2, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[1:]}
    yield chain, wallets, uids, root
    chain.close()


def _dead_endpoint(chain, wallet):

    port = free_port()  # a port nobody listens on
    chain.serve(NETUID, wallet, "127.0.0.1", port)


def test_rounds_reward_honest_catch_cheats_and_set_weights(net, tiny_engine, tmp_path):
    chain, wallets, uids, _ = net
    _dead_endpoint(chain, wallets["dead"])
    engines = {"honest": Only(tiny_engine, "flux-schnell"),
               "kolors": Only(tiny_engine, "kolors"),
               "cheat": Only(OtherSeed(tiny_engine), "flux-schnell"),
               "replay": Only(Replayer(tiny_engine), "flux-schnell")}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell", "kolors"), rounds=2,
                             state_path=tmp_path / "state.db", audit_fraction=1.0, seed=42,
                             epoch_length=1000, round_interval=0, info_timeout=5.0,
                             scoring=ScoringConfig(exclusion_rounds=5,
                                                   model_shares={"flux-schnell": 0.5,
                                                                 "kolors": 0.5}))
    wallet = wallets["validator"]
    state = ValidatorState(config.state_path)
    validator = Validator(config, chain, wallet, tiny_engine, MinerClient(wallet), state)
    with miners(chain, wallets, engines):
        assert validator.run() == 0  # --neuron.rounds 2: two rounds, then a clean stop
    first, second = validator.reports
    table = validator.format_report(first)
    print(table + "\n" + validator.format_report(second))  # the operator's view (-s shows it)
    by_uid = {o.uid: o for o in first.outcomes}
    honest, kolors, cheat, replay, dead = (by_uid[uids[n]] for n in
                                           ("honest", "kolors", "cheat", "replay", "dead"))
    assert honest.status == "ok" and honest.audit_passed, table
    assert kolors.status == "ok" and kolors.audit_passed and kolors.model == "kolors", table
    assert honest.similarity >= 0.99 and kolors.similarity >= 0.99
    assert cheat.audited and cheat.audit_passed is False and "audit_failed" in cheat.reason
    assert first.rewards[cheat.uid] == 0.0 and validator.book.scores()[cheat.uid] == 0.0
    assert replay.status == "ok"  # its first answer is genuinely computed
    assert dead.status == "unreachable" and first.rewards[dead.uid] == 0.0
    assert first.rewards[honest.uid] > 0 and first.rewards[kolors.uid] > 0
    # each miner got its own prompt and seed; latencies measured by the validator
    assert honest.latency is not None and 0 < honest.latency < 24
    # weights: set on round 0 (first time), honest miners only, normalised
    assert first.weights is not None, first.weights_message
    assert set(first.weights) == {honest.uid, kolors.uid, replay.uid}
    assert abs(sum(first.weights.values()) - 1.0) < 1e-9
    history = chain.weights_history(NETUID)
    assert len(history) == 1
    # round 1: the cheater is excluded (not queried), the replayer caught without regenerating
    by_uid2 = {o.uid: o for o in second.outcomes}
    assert by_uid2[cheat.uid].status == "excluded"
    assert by_uid2[replay.uid].status == "duplicate_answer", validator.format_report(second)
    assert not by_uid2[replay.uid].audited
    assert by_uid2[honest.uid].status == "ok"
    assert second.weights is None and "next weights" in second.weights_message
    state.close()
    # everything is in the state file, reasons included
    with ValidatorState(config.state_path) as again:
        assert again.round_index == 2
        rows = again.history(uid=replay.uid)
        assert rows[0].status == "duplicate_answer" and "same image" in rows[0].reason
        assert again.last_weights().weights.keys() == first.weights.keys()
        book = again.load_book(config.scoring)
        assert book.is_excluded(wallets["cheat"].hotkey.ss58_address, 2)


def _validator_cmd(chain_path, wallets_root, state, rounds=None):
    cmd = [sys.executable, "-m", "niche.cli", "validator", "--netuid", str(NETUID),
           "--subtensor.network", "localnet", "--localnet.path", str(chain_path),
           "--wallet.name", "validator", "--wallet.hotkey", "hot",
           "--wallet.path", str(wallets_root), "--neuron.state_path", str(state),
           "--neuron.round_interval", "0.2", "--neuron.audit_fraction", "0.5",
           "--neuron.seed", "7", "--models", "flux-schnell", "--tiny",
           "--dtype", "float32"]  # the miners' (tiny_engine): steps recompute in their dtype
    if rounds is not None:
        cmd += ["--neuron.rounds", str(rounds)]
    return cmd


def _wait_for(path: Path, text: str, proc, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"validator exited {proc.returncode}:\n{path.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged in {timeout}s:\n{path.read_text()}")


def _rounds_consistent(state_path: Path) -> int:
    conn = sqlite3.connect(state_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    done = int(conn.execute("SELECT value FROM meta WHERE key='round'").fetchone()[0])
    rounds = [r for (r,) in conn.execute("SELECT DISTINCT round FROM history ORDER BY round")]
    conn.close()
    assert rounds == list(range(done))
    return done


@pytest.mark.slow
def test_process_sigkill_then_resume_then_sigterm(net, tiny_engine, tmp_path):
    """The `niche validator` process: SIGKILL mid-loop leaves the state file intact; a restart
    continues at the next round; SIGTERM finishes the round in flight and exits 0."""
    chain, wallets, uids, root = net
    state = tmp_path / "state.db"
    log = tmp_path / "validator.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    engines = {"honest": Only(tiny_engine, "flux-schnell")}
    with miners(chain, wallets, engines):
        with open(log, "w") as out:
            proc = subprocess.Popen(_validator_cmd(chain.path, root / "wallets", state),
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for(log, "round 1 block", proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        after_kill = _rounds_consistent(state)
        assert after_kill >= 2

        with open(log, "w") as out:
            proc = subprocess.Popen(_validator_cmd(chain.path, root / "wallets", state,
                                                   rounds=1000),
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for(log, f"round {after_kill} block", proc)  # resumed where it was
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert "validator stopped after" in text and "Traceback" not in text
        assert f"round {after_kill - 1} block" not in text
        assert _rounds_consistent(state) >= after_kill + 1
    # the honest miner kept a positive score across the restarts
    with ValidatorState(state) as st:
        assert st.load_book(ScoringConfig()).scores()[uids["honest"]] > 0


def test_lost_permit_skips_rounds_and_keeps_scores(net, tiny_engine, tmp_path, caplog):
    """A validator whose permit goes mid-run (its stake fell out of the top K) would be
    refused by every miner (403); scoring that would zero honest miners. Its rounds are
    skipped instead, nothing saved, until the permit is back."""
    import asyncio
    import logging

    chain, wallets, uids, _ = net
    engines = {"honest": Only(tiny_engine, "flux-schnell")}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1,
                             state_path=tmp_path / "state.db", audit_fraction=0.0, seed=3,
                             epoch_length=1000, round_interval=0, info_timeout=5.0)
    wallet = wallets["validator"]
    hotkey = wallet.hotkey.ss58_address
    state = ValidatorState(config.state_path)
    validator = Validator(config, chain, wallet, tiny_engine, MinerClient(wallet), state)
    honest = uids["honest"]
    with miners(chain, wallets, engines):
        first = asyncio.run(validator.run_round())
        assert {o.uid: o.status for o in first.outcomes}[honest] == "ok"
        score = validator.book.scores()[honest]
        assert score > 0 and state.round_index == 1

        chain.set_stake(NETUID, hotkey, 0.0)
        with caplog.at_level(logging.INFO, logger="niche.validator"):
            skipped = [asyncio.run(validator.run_round()) for _ in range(2)]
            assert all(r.outcomes == [] and r.rewards == {} for r in skipped)
            assert "round skipped" in skipped[0].weights_message
            assert "no validator permit" in skipped[0].weights_message
            assert validator.book.scores()[honest] == score and state.round_index == 1
            lost = [r for r in caplog.records if "permit lost" in r.getMessage()]
            assert len(lost) == 1 and lost[0].levelno == logging.WARNING  # once, not per round

            chain.set_stake(NETUID, hotkey, 100.0)
            back = asyncio.run(validator.run_round())
            assert any("permit is back" in r.getMessage() for r in caplog.records)
        assert {o.uid: o.status for o in back.outcomes}[honest] == "ok"
        assert back.round == 1 and state.round_index == 2 and validator.permit_missing is None
    assert 'niche_validator_failures_total{kind="no_permit"} 1.0' in \
        validator.metrics.render().decode()
    state.close()
