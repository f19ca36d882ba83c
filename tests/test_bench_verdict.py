"""`niche bench`'s verdict: the expected score at the measured latency on the validators'
scoring curve, and with --netuid the share against the miners earning on a real (local)
chain whose validator set weights."""
from __future__ import annotations

import json
import re

import pytest

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.cli import main
from niche.earnings import Subnet, Verdict, format_verdict, pool_share, verdict
from niche.validator.scoring import ScoringConfig, speed_reward

TINY = ["bench", "--tiny", "--model", "flux-schnell", "--runs", "2", "--device", "cpu"]


def test_scores_follow_the_scoring_curve():
    v = verdict("flux-schnell", 6.0, 8.0, 24.0, True)
    # base + (1 - base) * (w * (1 - 6/24) + (1 - w) * fastest/latency), base 0.2, w 0.5
    assert v.earns and v.score_fastest == pytest.approx(0.2 + 0.8 * (0.375 + 0.5))
    assert v.score_behind_2x == pytest.approx(0.2 + 0.8 * (0.375 + 0.25))
    assert v.score_p90 == pytest.approx(speed_reward(8.0, 24.0, 8.0, ScoringConfig()))
    assert "25.0% of the 24 s deadline" in v.reason
    text = format_verdict(v)
    assert text.startswith("verdict for flux-schnell: EARNS")
    assert "expected score      0.900 if no miner" in text and "--netuid N" in text


def test_too_slow_or_not_verifying_earns_nothing():
    late = verdict("kolors", 40.0, 41.0, 32.0, True)
    assert not late.earns and "exceeds the 32 s deadline" in late.reason
    assert format_verdict(late).startswith("verdict for kolors: DOES NOT EARN")
    wrong = verdict("kolors", 2.0, 2.0, 32.0, False, Subnet(1, "localnet", (0.5, 0.5)))
    assert not wrong.earns and "step check" in wrong.reason
    assert wrong.subnet is not None and wrong.subnet["share_low"] == 0.0


def test_pool_share_anchors_the_top_miner():
    # others' scores proportional to incentive, the top one at 1 (low) or base (high)
    assert pool_share(0.9, [0.6, 0.4], 1.0) == pytest.approx(0.9 / (0.9 + 1.0 / 0.6))
    assert pool_share(0.9, [0.6, 0.4], 0.2) == pytest.approx(0.9 / (0.9 + 0.2 / 0.6))
    assert pool_share(0.9, [], 1.0) == 1.0 and pool_share(0.0, [1.0], 1.0) == 0.0


def test_bench_verdict_against_a_local_subnet(tmp_path, capsys):
    chain_path = tmp_path / "chain.sqlite"
    wallets = {n: create_wallet(n, "hot", tmp_path / "w") for n in ("v", "m1", "m2")}
    chain = LocalChain(chain_path, create=True)
    chain.create_subnet(1, weights_rate_limit=0, max_validators=1)
    chain.register(1, wallets["v"], stake=1000.0)
    uids = [chain.register(1, wallets[m]) for m in ("m1", "m2")]
    result = chain.set_weights(1, wallets["v"], uids, [0.75, 0.25], 0)
    assert result.success, result.message
    incentives = sorted(n.incentive for n in chain.metagraph(1).neurons if n.incentive > 0)
    chain.close()
    assert len(incentives) == 2
    flags = [*TINY, "--no-verify", "--netuid", "1", "--subtensor.network", "localnet",
             "--localnet.path", str(chain_path)]
    assert main([*flags, "--json"]) == 0
    (v,) = json.loads(capsys.readouterr().out)["verdicts"]
    assert v["earns"] and v["verifies"] is None and v["timeout"] > v["latency"] > 0
    assert "not verified (--no-verify)" in v["reason"]
    assert v["subnet"]["earning_miners"] == 2
    assert v["subnet"]["share_low"] == pytest.approx(
        pool_share(v["score_fastest"], incentives, 1.0))
    assert v["subnet"]["share_low"] < v["subnet"]["share_high"] < 1
    text = format_verdict(Verdict(**v))  # what the table ends with (one bench run is enough)
    line = next(x for x in text.splitlines() if "share on netuid 1 (localnet)" in x)
    low, high = (float(x) for x in re.findall(r"([\d.]+)% to ([\d.]+)%", line)[0])
    assert low == pytest.approx(100 * v["subnet"]["share_low"], abs=0.06)
    assert high == pytest.approx(100 * v["subnet"]["share_high"], abs=0.06)
    assert "against the 2 miner(s) earning now" in line


def test_bench_unknown_netuid_is_one_line_before_measuring(tmp_path, capsys):
    chain = LocalChain(tmp_path / "chain.sqlite", create=True)
    chain.close()
    assert main([*TINY, "--netuid", "9", "--subtensor.network", "localnet",
                 "--localnet.path", str(tmp_path / "chain.sqlite")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "subnet 9 does not exist" in err[0]
