"""What a miner answering in a measured time earns under the validators' scoring
(niche/validator/scoring.py): `niche bench` ends with this verdict.

Per answer, reward = base + (1 - base) * (w * (1 - latency / timeout) + (1 - w) * fastest /
latency); a miner that answers every round validly converges (EMA) to that reward as its
score, and its weight is its score over the sum of the scores of the miners serving the same
model, times the model's emission share. The scores of a subnet's miners are not on chain,
but their incentives are proportional to them: anchored at the top miner scoring between the
lowest (`base`) and highest (1) reward a valid answer can get, they give the range of the
share a newcomer would take.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from niche.validator.scoring import ScoringConfig, speed_reward

SCORING = ScoringConfig()
"""The validators' default scoring (what `niche validator` runs without flags)."""


@dataclass(frozen=True)
class Subnet:
    """The miners of a live subnet, as the metagraph shows them."""

    netuid: int
    network: str
    incentives: tuple[float, ...]
    """Incentive of every miner earning any (validators and idle uids left out)."""


@dataclass(frozen=True)
class Verdict:
    model: str
    latency: float
    """Median seconds per image measured here (the network's transfer comes on top)."""
    p90: float
    timeout: float
    verifies: bool | None
    earns: bool
    reason: str
    score_fastest: float
    """Steady score when no miner of the model is faster."""
    score_behind_2x: float
    """Steady score when the fastest miner of the model answers in half the time."""
    score_p90: float
    """Steady score if every answer took the p90 time (and no one is faster)."""
    subnet: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steady_score(latency: float, timeout: float, fastest: float,
                 cfg: ScoringConfig = SCORING) -> float:
    """The score a miner converges to when every answer is valid and takes `latency`."""
    return speed_reward(latency, timeout, min(fastest, latency), cfg)


def pool_share(score: float, incentives: Sequence[float], top_score: float) -> float:
    """Share of a model's emission pool for a newcomer at `score` joining miners whose
    scores are proportional to `incentives`, the top one at `top_score`."""
    top = max(incentives, default=0.0)
    others = sum(incentives) / top * top_score if top > 0 else 0.0
    return score / (score + others) if score > 0 else 0.0


def verdict(model: str, latency: float, p90: float, timeout: float, verifies: bool | None,
            subnet: Subnet | None = None, cfg: ScoringConfig = SCORING) -> Verdict:
    """The verdict for one model measured at `latency` (median) and `p90` seconds."""
    fastest = steady_score(latency, timeout, latency, cfg)
    behind = steady_score(latency, timeout, latency / 2, cfg)
    slow = steady_score(p90, timeout, p90, cfg)
    if verifies is False:
        earns, reason = False, ("the output does not pass the step check: every audit "
                                "fails, the score is zeroed and the hotkey excluded")
    elif latency > timeout:
        earns, reason = False, (f"the median {latency:.2f} s exceeds the {timeout:.0f} s "
                                "deadline: answers arrive too late to score")
    else:
        earns = True
        reason = (f"answers in {100 * latency / timeout:.1f}% of the {timeout:.0f} s deadline"
                  + ("" if p90 <= timeout else
                     f"; the p90 {p90:.2f} s is past it (those answers score 0)"))
        if verifies is None:
            reason += "; not verified (--no-verify)"
    detail = None
    if subnet is not None:
        miners = [i for i in subnet.incentives if i > 0]
        detail = {
            "netuid": subnet.netuid, "network": subnet.network, "earning_miners": len(miners),
            "share_low": pool_share(fastest if earns else 0.0, miners, 1.0),
            "share_high": pool_share(fastest if earns else 0.0, miners, cfg.base),
        }
    return Verdict(model=model, latency=latency, p90=p90, timeout=timeout, verifies=verifies,
                   earns=earns, reason=reason, score_fastest=fastest, score_behind_2x=behind,
                   score_p90=slow, subnet=detail)


def subnet_from_metagraph(metagraph: Any, network: str) -> Subnet:
    """Every uid earning incentive (a validator permit holder earns dividends, not
    incentive, so incentive > 0 already singles out the miners)."""
    return Subnet(netuid=int(metagraph.netuid), network=network,
                  incentives=tuple(float(n.incentive) for n in metagraph.neurons
                                   if n.incentive > 0))


def format_verdict(v: Verdict) -> str:
    lines = [f"verdict for {v.model}: {'EARNS' if v.earns else 'DOES NOT EARN'}: {v.reason}"]
    if v.earns:
        lines += [
            f"  expected score      {v.score_fastest:.3f} if no miner of {v.model} is faster, "
            f"{v.score_behind_2x:.3f} if the fastest answers in half your time "
            f"(scoring curve: {SCORING.base:g} at the deadline, 1 instant and fastest)",
            f"  at your p90         {v.score_p90:.3f} ({v.p90:.2f} s per answer)",
        ]
    s = v.subnet
    if s is None:
        lines.append("  share               --netuid N (with the chain flags) compares it with "
                     "the miners on that subnet")
    elif not s["earning_miners"]:
        lines.append(f"  share on netuid {s['netuid']} ({s['network']}): no miner earns "
                     "incentive yet: a valid miner would take the whole pool of its model")
    else:
        lines.append(
            f"  share on netuid {s['netuid']} ({s['network']}): "
            f"{100 * s['share_low']:.1f}% to {100 * s['share_high']:.1f}% of the {v.model} "
            f"miners' pool against the {s['earning_miners']} miner(s) earning now (every one "
            f"counted as serving this model; the top one scoring 1 to {SCORING.base:g}), "
            "times the "
            "model's emission share set by the validators")
    return "\n".join(lines)
