"""No audit can be dodged for free, whichever answer it is drawn from, and no honest miner
pays for another validator's rows.

- A volume probe whose states cannot be fetched costs what a dodged scored answer does (a
  miner declaring more replicas than it has, answering the extra probes with garbage and
  refusing their fetches, earned 1.7-1.9x an honest one-GPU miner at audit fractions of
  0.05-0.2); a miner cannot tell its scored challenge from its probes by their order.
- A dodged organic audit costs audit_fraction / draw dodged challenges (the gateway queues a
  `draw` share of the answers), and a passed one counts for 1/draw answers served.
- The organic queue keeps its signer: a validator claims only the rows its own hotkey asked
  (a miner keeps states per caller, so another validator's fetch finds none), lets go of the
  claims a crashed validator left, and upgrades an older queue file in place.

Real miners on 127.0.0.1 with the tiny FLUX.1-schnell, the validator's signed client,
audits, scoring and SQLite files; the hooks only remove states where a dodging miner would."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest
from gateway_support import make_chain
from miner_support import make_request
from test_gateway_organic import _answer, _request, audit_queue_once, organic_config
from test_validator_service import NETUID, Only, miners
from test_validator_volume import Claims

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.protocol import StatesCommitment
from niche.validator import scoring
from niche.validator.client import MinerClient, MinerTarget, as_target
from niche.validator.organic import STALE_CLAIM_SECONDS, OrganicQueue
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState


# ------------------------------------------------------------------ volume probes
class _ProbeDodger(MinerClient):
    """The validator's client; the dodging miner's states of its probe answers are gone
    when their fetch comes (what a miner answering probes with garbage would do)."""

    def __init__(self, wallet, validator_hotkey: str):
        super().__init__(wallet)
        self.validator_hotkey = validator_hotkey
        self.drop: set[str] = set()
        self.store = None

    async def fetch_states(self, target, request_id, *args, **kwargs):
        if request_id in self.drop:
            with self.store._lock:
                self.store._kept.pop((self.validator_hotkey, request_id), None)
        return await super().fetch_states(target, request_id, *args, **kwargs)


class _Recording(Validator):
    async def _query(self, challenges, probes, neurons):
        self.probe_ids = {c.request_id for c in probes}
        self.sent_order = []
        query_many = self.client.query_many

        async def recorded(pairs, *args, **kwargs):
            self.sent_order = [request.request_id for _, request in pairs]
            return await query_many(pairs, *args, **kwargs)

        self.client.query_many = recorded
        try:
            return await super()._query(challenges, probes, neurons)
        finally:
            del self.client.query_many


@pytest.mark.slow
def test_a_probe_whose_states_are_refused_costs_like_a_dodged_challenge(tiny_engine, tmp_path):
    names = ("validator", "single", "dodger")
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in names}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[1:]}
    engines = {"single": Only(tiny_engine, "flux-schnell"), "dodger": Claims(tiny_engine, 2)}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1, seed=3,
                             state_path=tmp_path / "state.db", audit_fraction=1.0,
                             epoch_length=1000, round_interval=0, info_timeout=10.0)
    vali = wallets["validator"].hotkey.ss58_address
    client = _ProbeDodger(wallets["validator"], vali)
    validator = _Recording(config, chain, wallets["validator"], tiny_engine, client,
                           ValidatorState(config.state_path))
    try:
        with miners(chain, wallets, engines) as running:
            client.store = running["dodger"].service.states
            original = validator._audit

            async def audit(*args, **kwargs):  # the probes are known once the round sent them
                client.drop = set(validator.probe_ids)
                return await original(*args, **kwargs)

            validator._audit = audit
            report = asyncio.run(validator.run_round())
    finally:
        validator.state.close()
        chain.close()
    table = validator.format_report(report)
    by = {o.uid: o for o in report.outcomes}
    dodger, single = by[uids["dodger"]], by[uids["single"]]
    assert dodger.probes == 2 and dodger.status == scoring.UNAVAILABLE, table
    assert "volume probe" in dodger.reason and report.rewards[dodger.uid] == 0.0, table
    assert dodger.audit_passed is None  # a fault of availability: no exclusion
    assert not validator.book.is_excluded(wallets["dodger"].hotkey.ss58_address, 1)
    assert single.status == "ok" and single.audit_passed and report.rewards[single.uid] > 0
    assert len(validator.probe_ids) == 1 and len(validator.sent_order) == 3


def test_the_scored_challenge_is_not_always_sent_or_fetched_first(tiny_engine, tmp_path):
    """The order of sends (and of a miner's fetches) comes from the audit's secret
    randomness: over 40 rounds of 1 scored + 3 probes, the scored one leads about a quarter
    of the time."""
    net = make_chain(tmp_path, miners=1)
    config = organic_config(tmp_path, None)
    with ValidatorState(config.state_path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine,
                              MinerClient(net.validator), state)
        firsts = [validator._secret_order(4)[0] for _ in range(40)]
    net.chain.close()
    assert all(sorted(validator._secret_order(4)) == [0, 1, 2, 3] for _ in range(5))
    assert 3 <= firsts.count(0) <= 20 and len(set(firsts)) == 4


# ------------------------------------------------------------------ organic draws
def test_a_dodged_organic_audit_costs_audit_fraction_over_draw_challenges(tmp_path,
                                                                          tiny_engine):
    """The gateway queued a tenth of its answers: the one drawn, unfetchable, costs ten
    dodged challenges (50 zero rewards at the defaults), so dodging every organic audit
    costs what dodging every challenge does."""
    net = make_chain(tmp_path, miners=1)  # registered, serves nothing: the fetch fails
    queue_path = tmp_path / "organic.sqlite"
    queue = OrganicQueue(queue_path, signer=net.validator_hotkey, draw=0.1)
    uid = net.uids["miner1"]
    answer = _answer("away-miner-01").model_copy(update={"states": StatesCommitment(
        shape=[1, 16, 64], sha256=["ab" * 32] * 4, compute_dtype="float32")})
    queue.submit(MinerTarget(uid, net.wallets["miner1"].hotkey.ss58_address,
                             "http://127.0.0.1:1"), _request("away-miner-01"), answer, 0.1)
    validator, outcomes = audit_queue_once(net, tmp_path, queue_path, tiny_engine)
    net.chain.close()
    outcome = outcomes[uid]
    assert outcome.status == scoring.UNAVAILABLE and outcome.unavailable_answers == \
        pytest.approx(10.0)
    cfg = validator.config.scoring
    book = scoring.ScoreBook(cfg)
    book.uids[uid] = scoring.UidScore(hotkey=outcome.hotkey, score=0.5)
    book.apply(0, [outcome], {})
    assert book.scores()[uid] == pytest.approx(0.5 * (1 - cfg.alpha) ** (
        cfg.unavailable_zeros * 10))


def test_unavailable_answers_add_up_within_a_round():
    outcome = scoring.Outcome(1, "5hk", "flux-schnell")
    once = scoring.unavailable(outcome, "scored answer")
    twice = scoring.unavailable(once, "volume probe", answers=1.0)
    organic = scoring.unavailable(twice, "organic", answers=10.0)
    assert (once.unavailable_answers, twice.unavailable_answers,
            organic.unavailable_answers) == (1.0, 2.0, 12.0)
    assert organic.reason == once.reason  # the first reason stays
    cfg = scoring.ScoringConfig()
    book = scoring.ScoreBook(cfg)
    book.uids[1] = scoring.UidScore(hotkey="5hk", score=1.0)
    book.apply(0, [twice], {})
    assert book.scores()[1] == pytest.approx((1 - cfg.alpha) ** (2 * cfg.unavailable_zeros))


@pytest.mark.slow
def test_a_passed_organic_audit_counts_for_one_over_draw_answers(tmp_path, tiny_engine):
    """Serving users must pay for the GPU time it takes from challenges: a passed audit of
    an answer queued at draw 0.25 stands for four answers served."""
    net = make_chain(tmp_path, miners=1)
    queue_path = tmp_path / "organic.sqlite"
    queue = OrganicQueue(queue_path, signer=net.validator_hotkey, draw=0.25)
    with miners(net.chain, net.wallets, {"miner1": Only(tiny_engine, "flux-schnell")}) as m:
        neuron = net.chain.metagraph(NETUID).by_hotkey(m["miner1"].hotkey)
        request = make_request("a user's lighthouse", 4, model="flux-schnell", steps=4,
                               width=64, height=64)
        result = asyncio.run(MinerClient(net.validator).query(as_target(neuron), request))
        assert result.ok, result.reason
        queue.submit(as_target(neuron), request, result.response, result.latency,
                     image=result.image_bytes)
        validator, outcomes = audit_queue_once(net, tmp_path, queue_path, tiny_engine)
    net.chain.close()
    assert validator._organic_passed == {neuron.uid: pytest.approx(4.0)}, outcomes


# ------------------------------------------------------------------ the queue's signer
def test_a_validator_claims_only_its_own_rows(tmp_path):
    path = tmp_path / "q.sqlite"
    ours, theirs = OrganicQueue(path, signer="5ours"), OrganicQueue(path, signer="5theirs")
    target = MinerTarget(4, "5miner", "http://127.0.0.1:1")
    ours.submit(target, _request("ours-0001"), _answer("ours-0001"), 0.5)
    theirs.submit(target, _request("theirs-0001"), _answer("theirs-0001"), 0.5)
    assert [i.challenge.request_id for i in ours.claim(10, 300)] == ["ours-0001"]
    assert [i.challenge.request_id for i in theirs.claim(10, 300)] == ["theirs-0001"]
    assert ours.claim(10, 300) == [] and theirs.claim(10, 300) == []


def test_claims_a_stopped_validator_left_are_let_go(tmp_path):
    now = [1000.0]
    queue = OrganicQueue(tmp_path / "q.sqlite", signer="5ours", clock=lambda: now[0])
    target = MinerTarget(4, "5miner", "http://127.0.0.1:1")
    queue.submit(target, _request("left-claimed"), _answer("left-claimed"), 0.5)
    assert len(queue.claim(10, 300)) == 1  # then the validator is killed mid-round
    now[0] += STALE_CLAIM_SECONDS + 1
    assert queue.claim(10, 300) == []
    status, reason, image = sqlite3.connect(tmp_path / "q.sqlite").execute(
        "SELECT status, reason, json_extract(response, '$.image') FROM organic").fetchone()
    assert status == "skipped" and "stopped before its verdict" in reason and image == ""


def test_a_queue_file_of_an_older_release_is_upgraded_and_its_rows_let_go(tmp_path, caplog):
    path = tmp_path / "q.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE organic (
            id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, uid INTEGER NOT NULL,
            hotkey TEXT NOT NULL, url TEXT NOT NULL, request TEXT NOT NULL,
            response TEXT NOT NULL, latency REAL, status TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '', similarity REAL, audited REAL);""")
    import time
    old.execute("INSERT INTO organic (created, uid, hotkey, url, request, response, latency, "
                "status) VALUES (?, 4, '5miner', '', ?, ?, 0.5, 'pending')",
                (time.time(), _request("old-row-0001").model_dump_json(),
                 _answer("old-row-0001").model_dump_json()))
    old.commit()
    old.close()
    queue = OrganicQueue(path, signer="5ours", draw=0.5)
    again = OrganicQueue(path, signer="5ours")  # the other process opens it too
    target = MinerTarget(4, "5miner", "http://127.0.0.1:1")
    queue.submit(target, _request("new-row-0001"), _answer("new-row-0001"), 0.5)
    with caplog.at_level("WARNING", logger="niche.validator"):
        (item,) = again.claim(10, 300)
    assert item.challenge.request_id == "new-row-0001" and item.draw == 0.5
    assert "1 answer(s) queued by a gateway older than this validator" in caplog.text
    rows = dict(sqlite3.connect(path).execute(
        "SELECT json_extract(request, '$.request_id'), reason FROM organic"))
    assert rows["old-row-0001"] == "queued by an older gateway: signer unknown"


@pytest.mark.parametrize(("signer", "draw"), [("", 0.1), ("5ours", 0.0), ("5ours", 1.5)])
def test_a_queue_without_a_signer_or_with_a_bad_draw_is_refused(tmp_path, signer, draw):
    from niche.validator.organic import QueueError

    with pytest.raises(QueueError):
        OrganicQueue(tmp_path / "q.sqlite", signer=signer, draw=draw)
