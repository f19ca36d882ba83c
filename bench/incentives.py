"""Does cheating pay? Simulate many rounds of the validator's scoring with several miner
strategies and print each strategy's share of the weights.

Uses the validator's real scoring code (round_rewards, ScoreBook, choose_audits,
compute_weights); only the miners are simulated: each strategy has a latency distribution
and a verdict it would get if audited (honest passes, cheats fail), and the cached-image
miner is caught by the duplicate check that runs on every answer.

    .venv/bin/python bench/incentives.py [--rounds 2000] [--audit-fraction 0.1] [--seed 1]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from niche.validator.scoring import (
    AUDIT_FAILED,
    OK,
    Outcome,
    ScoreBook,
    ScoringConfig,
    choose_audits,
    compute_weights,
    round_rewards,
)

TIMEOUT = 24.0  # FLUX.1-schnell challenge timeout


@dataclass(frozen=True)
class Strategy:
    name: str
    count: int
    latency: float  # median seconds
    honest: bool  # passes an audit
    replays: bool = False  # answers with an earlier image: caught by the duplicate check
    cheat_rate: float = 1.0  # for mixed strategies: fraction of rounds it cheats


STRATEGIES = (
    Strategy("honest", 4, 6.0, True),
    Strategy("slow-honest", 2, 15.0, True),
    Strategy("garbage-fast", 2, 0.3, False),
    Strategy("fewer-steps", 2, 1.6, False),  # 1 step instead of 4: ~1/4 of the time
    Strategy("cached-image", 2, 0.05, False, replays=True),
    Strategy("cheats-10%", 2, 6.0, False, cheat_rate=0.1),  # honest, but 10% garbage-fast
)


def simulate(rounds: int, audit_fraction: float, seed: int, cfg: ScoringConfig,
             warmup: int = 100) -> dict:
    rng = np.random.default_rng(seed)
    miners = []
    for s in STRATEGIES:
        for i in range(s.count):
            miners.append((len(miners), f"{s.name}-{i}", s))
    book = ScoreBook(cfg=cfg)
    share = {s.name: 0.0 for s in STRATEGIES}
    caught = {s.name: 0 for s in STRATEGIES}
    duplicates = {s.name: 0 for s in STRATEGIES}
    regenerations = 0
    answers = 0
    measured = 0
    for r in range(rounds):
        outcomes = []
        cheating = {}
        for uid, hotkey, s in miners:
            if book.is_excluded(hotkey, r):
                outcomes.append(Outcome(uid, hotkey, "flux-schnell", status="excluded",
                                        reason="excluded", timeout=TIMEOUT))
                continue
            cheats = (not s.honest) and rng.random() < s.cheat_rate
            cheating[uid] = cheats
            latency = (0.3 if cheats and s.cheat_rate < 1 else s.latency) * float(
                rng.lognormal(0.0, 0.15))
            if s.replays:  # the duplicate check needs no regeneration and never misses
                duplicates[s.name] += 1
                outcomes.append(Outcome(uid, hotkey, "flux-schnell", status="duplicate_answer",
                                        reason="duplicate_answer", latency=latency,
                                        timeout=TIMEOUT))
                continue
            outcomes.append(Outcome(uid, hotkey, "flux-schnell", latency=latency,
                                    timeout=TIMEOUT))
        answers += len([o for o in outcomes if o.status != "excluded"])
        valid = [o.uid for o in outcomes if o.status == OK]
        audited = set(choose_audits(rng, valid, audit_fraction))
        regenerations += len(audited)
        final = []
        for o in outcomes:
            if o.uid in audited:
                passed = not cheating.get(o.uid, False)
                if not passed:
                    caught[miners[o.uid][2].name] += 1
                o = Outcome(o.uid, o.hotkey, o.model, status=o.status,
                            reason="" if passed else AUDIT_FAILED, latency=o.latency,
                            timeout=o.timeout, audited=True, audit_passed=passed)
            final.append(o)
        rewards = round_rewards(final, cfg)
        book.apply(r, final, rewards)
        if r >= warmup:
            weights = compute_weights(book.scores(), book.models(), cfg.model_shares)
            for uid, w in weights.items():
                share[miners[uid][2].name] += w
            measured += 1
    return {
        "share": {k: v / max(measured, 1) for k, v in share.items()},
        "caught": caught,
        "duplicates": duplicates,
        "regen_per_answer": regenerations / max(answers, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--audit-fraction", type=float, default=0.1)
    parser.add_argument("--exclusion-rounds", type=int, default=ScoringConfig().exclusion_rounds)
    parser.add_argument("--alpha", type=float, default=ScoringConfig().alpha)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cfg = ScoringConfig(alpha=args.alpha, exclusion_rounds=args.exclusion_rounds,
                        model_shares={"flux-schnell": 1.0})
    result = simulate(args.rounds, args.audit_fraction, args.seed, cfg)
    print(f"rounds={args.rounds} audit_fraction={args.audit_fraction} alpha={cfg.alpha} "
          f"exclusion_rounds={cfg.exclusion_rounds} timeout={TIMEOUT}s")
    print(f"{'strategy':<14}{'miners':>7}{'latency_s':>10}{'share':>9}{'per_miner':>11}"
          f"{'audit_fails':>12}{'dup_fails':>10}")
    for s in STRATEGIES:
        share = result["share"][s.name]
        print(f"{s.name:<14}{s.count:>7}{s.latency:>10.2f}{share:>9.3f}{share / s.count:>11.3f}"
              f"{result['caught'][s.name]:>12}{result['duplicates'][s.name]:>10}")
    print(f"regenerations per scored answer: {result['regen_per_answer']:.3f}")
    print("\naudit-fraction sweep (per-miner share):")
    names = [s.name for s in STRATEGIES]
    print(f"{'p':>6}" + "".join(f"{n:>14}" for n in names) + f"{'regen/ans':>11}")
    for p in (0.02, 0.05, 0.1, 0.2, 0.5):
        res = simulate(args.rounds, p, args.seed, cfg)
        print(f"{p:>6.2f}" + "".join(
            f"{res['share'][s.name] / s.count:>14.3f}" for s in STRATEGIES)
            + f"{res['regen_per_answer']:>11.3f}")


if __name__ == "__main__":
    main()
