"""This validator's network failing during the audit is its fault, not the miners': when
every states fetch of a batch gets no HTTP answer (timed out, connection failed) and they
span at least own_faults.MIN_MINERS operators, the answers are left unaudited, as the round's
queries already judge an outage (own_faults.round_fault). One miner cut off while the others
answer is that miner's unavailability, charged as before.

Real tiny FLUX.1-schnell miners on three loopback addresses (hosts count as operators),
a real validator round; the outage is the validator's own states connections failing with
ENETUNREACH, what a route flap on its box does."""
from __future__ import annotations

import errno
from dataclasses import replace

import aiohttp
import pytest
from gateway_support import NETUID, Only, make_chain

from niche.devnet.servers import BackgroundServer
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.protocol import STATES_PATH
from niche.validator.audit import AuditConfig, AuditResult, forgive_outage, unaudited
from niche.validator.client import MinerClient
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

MODEL = "flux-schnell"


def _cut(reason="states: ClientOSError: Network is unreachable (4 tries)"):
    return AuditResult(False, 0.0, reason, unavailable=True, cut_off=True)


PASSED = AuditResult(True, 0.9, "ok")
REFUSED_404 = AuditResult(False, 0.0, "states: HTTP 404", unavailable=True)


@pytest.mark.parametrize(("results", "hotkeys", "coldkeys", "forgiven"), [
    ([_cut(), _cut(), _cut()], ["a", "b", "c"], {}, True),
    # a cut-off miner among ones whose fetches worked: the network was up
    ([_cut(), _cut(), PASSED], ["a", "b", "c"], {}, False),
    ([_cut(), _cut(), REFUSED_404], ["a", "b", "c"], {}, False),
    # too few operators to tell an outage from miners going away
    ([_cut(), _cut()], ["a", "b"], {}, False),
    ([_cut(), _cut(), _cut()], ["a", "a", "b"], {}, False),
    ([_cut(), _cut(), _cut()], ["a", "b", "c"], {"a": "k", "b": "k", "c": "k"}, False),
    # answers never fetched (unverifiable, unaudited) say nothing of the network
    ([_cut(), _cut(), _cut(), unaudited("past keep time"),
      AuditResult(False, 0.0, "fp8", unverifiable=True)], ["a", "b", "c", "d", "e"], {}, True),
])
def test_forgive_outage(results, hotkeys, coldkeys, forgiven):
    after = forgive_outage(results, hotkeys, coldkeys=coldkeys)
    cut = [i for i, r in enumerate(results) if r.cut_off]
    assert all(after[i].unaudited for i in cut) is forgiven
    assert all(after[i] is results[i] for i in range(len(results)) if i not in cut)
    if forgiven:
        assert "this validator's network" in after[cut[0]].reason


class StatesUnreachable(MinerClient):
    """This validator's route to `cut` (all miners when None) is gone once answers are in:
    its states connections fail with ENETUNREACH."""

    def __init__(self, wallet, cut: set[str] | None = None) -> None:
        super().__init__(wallet)
        self.cut = cut

    async def _exchange(self, http, method, url, path, body, hotkey, *args, **kwargs):
        if path == STATES_PATH and (self.cut is None or hotkey in self.cut):
            raise aiohttp.ClientOSError(errno.ENETUNREACH, "Network is unreachable")
        return await super()._exchange(http, method, url, path, body, hotkey, *args,
                                       **kwargs)


@pytest.fixture(scope="module")
def subnet(tmp_path_factory, tiny_engine):
    """Three honest miners, each on its own loopback address (its own host)."""
    root = tmp_path_factory.mktemp("outage")
    net = make_chain(root, miners=3)
    config = MinerConfig(netuid=NETUID, requests_per_minute=0,
                         allow_hotkeys=(net.validator_hotkey,))
    running = []
    try:
        for i in (1, 2, 3):
            service = MinerService(Only(tiny_engine, MODEL), net.wallets[f"miner{i}"], config,
                                   chain=net.chain)
            server = BackgroundServer(create_app(service, refresh_metagraph=False),
                                      ip=f"127.0.0.{i}").start()
            service.announce(f"127.0.0.{i}", server.port)
            running.append((service, server))
        yield net
    finally:
        for service, server in running:
            server.stop()
            service.close()
        net.chain.close()


def _round(net, tiny_engine, path, client) -> tuple[list, dict[int, float]]:
    """One validator round on the state file `path`: its rows, then every uid's score."""
    config = ValidatorConfig(netuid=NETUID, models=(MODEL,), rounds=1, seed=4,
                             state_path=path, round_interval=0, audit_fraction=1.0,
                             audit=AuditConfig(fetch_timeout=2.0),
                             scoring=ScoringConfig(model_shares={MODEL: 1.0}))
    with ValidatorState(path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine, client, state)
        assert validator.run() == 0
        rows = [r for r in state.history(limit=50) if r.round == state.round_index - 1]
        return rows, validator.book.scores()


def test_the_validators_outage_during_the_audit_charges_no_miner(subnet, tiny_engine,
                                                                 tmp_path):
    path = tmp_path / "v.sqlite"
    _, earned = _round(subnet, tiny_engine, path, MinerClient(subnet.validator))
    assert sorted(uid for uid, score in earned.items() if score > 0) == [1, 2, 3]
    rows, after = _round(subnet, tiny_engine, path, StatesUnreachable(subnet.validator))
    assert len(rows) == 3
    for row in rows:  # neither paid as verified nor held against the miner
        assert row.status == "unaudited", (row.status, row.reason)
        assert "this validator's network" in (row.reason or "")
    assert after == earned


def test_one_miner_cut_off_while_the_others_answer_is_charged(subnet, tiny_engine,
                                                             tmp_path):
    cut = subnet.wallets["miner2"].hotkey.ss58_address
    rows = {r.hotkey: r for r in _round(subnet, tiny_engine, tmp_path / "v.sqlite",
                                        StatesUnreachable(subnet.validator, {cut}))[0]}
    assert rows[cut].status == "states_unavailable" and rows[cut].reward == 0
    assert "Network is unreachable" in (rows[cut].reason or "")
    assert all(r.status == "ok" and r.audit_passed for h, r in rows.items() if h != cut)


def test_replace_keeps_the_cut_off_flag():
    assert replace(_cut(), reason="x").cut_off  # dataclass field, not a property
