"""A miner that refuses the validator's states fetch (401 / 403) refuses the validator
itself: its permit, stake or clock as the miner sees them. That is never a caught cheat. One
miner refusing is that miner's unavailability (it earns nothing and pays what a dodge pays,
so refusing the audits it would fail never pays); most of a round refusing, or the chain
saying the validator lost its permit since the round began, is the validator's fault, and
the answers stay unaudited (neither paid nor charged).

Real miners on 127.0.0.1 (the tiny FLUX.1-schnell), the validator's signed client, audit,
scoring and SQLite state; the only hooks change the chain or a miner's policy between the
answers and the audit, where a metagraph refresh or an operator's restart would."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from miner_support import announced_miners

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.miner.service import MinerConfig
from niche.validator.audit import REFUSALS_FOR_FAULT, AuditResult, forgive_refusals
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1


def _refused(i: int = 0) -> AuditResult:
    return AuditResult(False, 0.0, f"states: states request refused: HTTP 403 ({i})",
                       unavailable=True, refused=True)


PASSED = AuditResult(True, 1.0)


@pytest.mark.parametrize(("refused", "others", "forgiven"), [
    (1, 0, False),  # one miner (even the only one) refusing: its unavailability
    (2, 0, False),  # too few to say it is the validator
    (REFUSALS_FOR_FAULT, 0, True), (3, 2, True), (3, 3, False), (4, 4, False), (5, 4, True)])
def test_refusals_put_the_fault_on_the_validator_only_when_most_refuse(refused, others,
                                                                       forgiven):
    results = [_refused(i) for i in range(refused)] + [PASSED] * others
    hotkeys = [f"5miner{i}" for i in range(refused + others)]
    out = forgive_refusals(results, hotkeys, None)
    assert [r.unaudited for r in out[:refused]] == [forgiven] * refused
    assert all(r.unavailable != forgiven for r in out[:refused])
    assert out[refused:] == results[refused:]  # the rest as they were


@pytest.mark.parametrize("answers", [3, 4, 8])
def test_one_miner_refusing_many_answers_is_never_the_validators_fault(answers):
    """Refusals are counted per miner: one hotkey with its scored answer, its probes and
    its organic answers in one batch, refusing them all, is still that miner's dodge."""
    results = [_refused(i) for i in range(answers)] + [PASSED]
    hotkeys = ["5dodger"] * answers + ["5honest"]
    assert forgive_refusals(results, hotkeys, None) == results
    alone = forgive_refusals(results[:answers], hotkeys[:answers], None)
    assert alone == results[:answers]


def test_the_chain_saying_the_validator_lost_its_permit_forgives_any_refusal():
    out = forgive_refusals([_refused(), PASSED, PASSED, PASSED], ["5a", "5b", "5c", "5d"],
                           "no validator permit")
    assert out[0].unaudited and not out[0].unavailable and "validator's fault" in out[0].reason
    assert out[1:] == [PASSED] * 3
    assert forgive_refusals([PASSED], ["5a"], "no validator permit") == [PASSED]


class _Hooked(MinerClient):
    """The validator's client; `before_fetch` runs once, before the round's first states
    fetch (between the answers and the audit)."""

    def __init__(self, wallet, before_fetch):
        super().__init__(wallet)
        self.before_fetch, self.hooked = before_fetch, False

    async def fetch_states(self, *args, **kwargs):
        if not self.hooked:
            self.hooked = True
            self.before_fetch()
        return await super().fetch_states(*args, **kwargs)


def _subnet(root: Path, miners: int):
    names = ["validator", "rival"] + [f"miner{i + 1}" for i in range(miners)]
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in names}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=1, min_validator_stake=1.0)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    chain.register(NETUID, wallets["rival"], stake=10.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[2:]}
    return chain, wallets, uids


def _validator(root: Path, chain, wallets, engine, before_fetch) -> Validator:
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1, seed=5,
                             state_path=root / "state.db", audit_fraction=1.0,
                             epoch_length=1000, round_interval=0)
    return Validator(config, chain, wallets["validator"], engine,
                     _Hooked(wallets["validator"], before_fetch),
                     ValidatorState(config.state_path))


@pytest.mark.slow
def test_a_permit_lost_between_answers_and_audit_charges_no_miner(tmp_path, tiny_engine):
    """A rival out-stakes the validator and the miners' metagraph refresh lands before the
    audit: every miner refuses the fetch (403 no_validator_permit), as it must. No miner is
    charged or excluded, and the next round (permit back) pays them."""
    chain, wallets, uids = _subnet(tmp_path, 2)
    config = MinerConfig(netuid=NETUID, requests_per_minute=0)
    rival = wallets["rival"].hotkey.ss58_address
    with announced_miners(chain, {n: (tiny_engine, wallets[n], config) for n in uids}) as m:
        def out_staked() -> None:
            chain.set_stake(NETUID, rival, 1000.0)
            for miner in m.values():
                miner.service.refresh_metagraph()

        validator = _validator(tmp_path, chain, wallets, tiny_engine, out_staked)
        report = asyncio.run(validator.run_round())
        table = validator.format_report(report)
        for uid in uids.values():
            outcome = {o.uid: o for o in report.outcomes}[uid]
            assert outcome.status == "unaudited" and "HTTP 403" in outcome.reason, table
            assert "no_validator_permit" in outcome.reason, table
        chain.set_stake(NETUID, rival, 10.0)  # the permit is back
        for miner in m.values():
            miner.service.refresh_metagraph()
        report = asyncio.run(validator.run_round())
        validator.state.close()
    assert not any(validator.book.is_excluded(wallets[n].hotkey.ss58_address, 2)
                   for n in uids)
    assert all(report.rewards[uid] > 0 for uid in uids.values()), \
        validator.format_report(report)
    chain.close()


@pytest.mark.slow
def test_one_miner_refusing_the_fetch_is_unavailable_not_forgiven(tmp_path, tiny_engine):
    """Only miner1 refuses (its operator raised --min_stake above the validator's stake
    between the answer and the audit): with the validator in good standing on the chain
    and the other miners serving it, the refusal is miner1's own unavailability (unpaid,
    charged as a dodge), never a cheat and never excluded."""
    chain, wallets, uids = _subnet(tmp_path, 3)
    configs = {n: (tiny_engine, wallets[n],
                   MinerConfig(netuid=NETUID, requests_per_minute=0)) for n in uids}
    with announced_miners(chain, configs) as m:
        def raise_min_stake() -> None:
            m["miner1"].service.config.min_stake = 1e9

        validator = _validator(tmp_path, chain, wallets, tiny_engine, raise_min_stake)
        report = asyncio.run(validator.run_round())
        validator.state.close()
    table = validator.format_report(report)
    outcomes = {o.uid: o for o in report.outcomes}
    refused = outcomes[uids["miner1"]]
    assert refused.status == "states_unavailable" and "low_stake" in refused.reason, table
    assert report.rewards[uids["miner1"]] == 0
    assert not validator.book.is_excluded(wallets["miner1"].hotkey.ss58_address, 1)
    for name in ("miner2", "miner3"):
        assert outcomes[uids[name]].audit_passed and report.rewards[uids[name]] > 0, table
    chain.close()


def test_several_hotkeys_of_one_coldkey_or_one_box_count_as_one_miner():
    """Three hotkeys refusing, two honest miners beside them: forgiven only when the three
    are three operators; one coldkey, or one host, behind them is one miner dodging."""
    results = [_refused(i) for i in range(3)] + [PASSED] * 2
    hotkeys = ["5sybA", "5sybB", "5sybC", "5honest1", "5honest2"]
    apart = forgive_refusals(results, hotkeys, None,
                             coldkeys={"5sybA": "5cA", "5sybB": "5cB", "5sybC": "5cC"},
                             hosts={"5sybA": "10.0.0.1", "5sybB": "10.0.0.2",
                                    "5sybC": "10.0.0.3"})
    assert all(r.unaudited for r in apart[:3])
    one_coldkey = forgive_refusals(results, hotkeys, None,
                                   coldkeys={h: "5cold" for h in hotkeys[:3]})
    assert one_coldkey == results
    one_box = forgive_refusals(results, hotkeys, None,
                               hosts={"5sybA": "10.0.0.9", "5sybB": "10.0.0.9",
                                      "5sybC": "10.0.0.8"})
    assert one_box == results
