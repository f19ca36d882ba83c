"""Does cheating pay? Simulate many rounds of the validator's scoring with several miner
strategies and print each strategy's share of the weights.

Uses the validator's real scoring code (round_rewards, ScoreBook, choose_audits,
compute_weights); only the miners are simulated: each strategy has a latency distribution
and a verdict it would get if audited (honest passes, cheats fail), and the cached-image
miner is caught by the duplicate check that runs on every answer.

The second part takes the step check's detection probability per audited answer for
each cheat at production step counts (bench/adversary.py's output, built in as ADVERSARY;
`--detection NAME=P` to override, or `--from-adversary` to run `bench/adversary.py --quick`
first and take its figures) with every synthetic answer audited, and shows each cheat's
expected weight against an honest miner's under the failed-audit penalty (score reset +
exclusion rounds), plus a sweep over detection probabilities from 1/3 and the
exclusion_rounds each needs for the cheat to stay under 5 % of an honest miner.

The third part (`--only-capacity` alone) gives miners 1, 2 or 4 replicas and a declared
concurrency, sends each round min(declared, volume_cap) challenges at once, and shows what
the volume factor pays: more honest replicas earn more, over-claiming earns less.

The fourth part (`--only-dropped-fetch` alone) is a cheater that refuses the states fetch
of each audited (cheated) answer, so the audit ends as "unavailable" (a fault: reward 0 and
unavailable_penalty / audit_fraction zero rewards, no exclusion) instead of a caught cheat,
against honest miners, by audit fraction; and an honest miner whose fetches fail 2 % of
the time: refusing fetches must not pay, and honest faults must cost little.

    .venv/bin/python bench/incentives.py [--rounds 2000] [--audit-fraction 0.1] [--seed 1]
                                         [--detection "skip last step=1.0" ...]
                                         [--from-adversary] [--only-detection]
                                         [--only-capacity] [--only-dropped-fetch]
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
    unavailable,
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
    detection: float = 1.0  # probability that an audit of a cheating answer fails it
    drops_fetch: bool = False  # refuses the audit's states fetch of its cheated answers
    faults: float = 0.0  # share of audited answers whose states fetch fails (restarts, blips)


STRATEGIES = (
    Strategy("honest", 4, 6.0, True),
    Strategy("slow-honest", 2, 15.0, True),
    Strategy("garbage-fast", 2, 0.3, False),
    Strategy("fewer-steps", 2, 1.6, False),  # 1 step instead of 4: ~1/4 of the time
    Strategy("cached-image", 2, 0.05, False, replays=True),
    Strategy("cheats-10%", 2, 6.0, False, cheat_rate=0.1),  # honest, but 10% garbage-fast
)


def simulate(rounds: int, audit_fraction: float, seed: int, cfg: ScoringConfig,
             warmup: int = 100, strategies: tuple[Strategy, ...] = STRATEGIES) -> dict:
    rng = np.random.default_rng(seed)
    miners = []
    for s in strategies:
        for i in range(s.count):
            miners.append((len(miners), f"{s.name}-{i}", s))
    book = ScoreBook(cfg=cfg)
    share = {s.name: 0.0 for s in strategies}
    caught = {s.name: 0 for s in strategies}
    duplicates = {s.name: 0 for s in strategies}
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
                strategy = miners[o.uid][2]
                cheated = cheating.get(o.uid, False)
                if (cheated and strategy.drops_fetch) or rng.random() < strategy.faults:
                    final.append(unavailable(o, "connection refused"))  # a fault: no exclusion
                    continue
                passed = not (cheating.get(o.uid, False)
                              and rng.random() < strategy.detection)
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


HONEST_LATENCY = 6.0
ADVERSARY: dict[str, tuple[float, float]] = {
    # cheat: (compute saved, probability one audit catches it: the step check's real plan,
    # worst over models / pipelines / requests at production step counts);
    # `python bench/adversary.py --requests 2` on the tiny checkpoints (docs/step-check.md)
    "cache 2 of 28-30 steps": (0.07, 0.34),
    "cache 1 of 4 steps (schnell)": (0.25, 0.33),
    "cache 7 of 28-30 steps": (0.25, 0.81),
    "cache half the steps": (0.5, 0.98),
    "uncond branch reused, 3 of 30": (0.05, 0.52),
    "int8 W8A8 compute": (0.25, 1.0),
    "fp8 e4m3 compute": (0.25, 1.0),
    "half the steps, resampled": (0.5, 0.9),
    "first 2 of 30 steps at half size": (0.05, 1.0),
}
"""Filled from the adversary's printed table; the simulation itself takes any values."""


def cheat_strategies(cheats: dict[str, tuple[float, float]]) -> tuple[Strategy, ...]:
    """4 honest miners and 2 per cheat; a cheater answers faster by the compute it saves."""
    return (Strategy("honest", 4, HONEST_LATENCY, True),) + tuple(
        Strategy(name, 2, max(0.05, HONEST_LATENCY * (1.0 - saved)), False, detection=q)
        for name, (saved, q) in cheats.items())


def relative_weights(cheats: dict[str, tuple[float, float]], rounds: int, seed: int,
                     cfg: ScoringConfig, audit_fraction: float = 1.0) -> dict[str, float]:
    """Per-miner weight of each cheat over an honest miner's (every answer audited)."""
    strategies = cheat_strategies(cheats)
    res = simulate(rounds, audit_fraction, seed, cfg, strategies=strategies)
    honest = res["share"]["honest"] / 4
    return {s.name: (res["share"][s.name] / s.count) / honest for s in strategies[1:]}


def exclusion_needed(saved: float, q: float, rounds: int, seed: int, cfg: ScoringConfig,
                     limit: float = 0.05) -> int | None:
    """Smallest exclusion_rounds (doubling, then bisecting) for which a cheat saving `saved`
    caught with probability `q` earns < limit of an honest miner; None if 3200 is not enough."""
    from dataclasses import replace

    def ratio(e: int) -> float:
        c = replace(cfg, exclusion_rounds=e)
        return relative_weights({"x": (saved, q)}, rounds, seed, c)["x"]

    if ratio(0) < limit:
        return 0
    hi = 1
    while ratio(hi) >= limit:
        hi *= 2
        if hi > 3200:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ratio(mid) < limit else (mid, hi)
    return hi


def detection_report(cheats: dict[str, tuple[float, float]], rounds: int, seed: int,
                     cfg: ScoringConfig) -> None:
    print(f"\ncheats against the step check, every synthetic answer audited "
          f"(audit_fraction=1), exclusion_rounds={cfg.exclusion_rounds}, honest latency "
          f"{HONEST_LATENCY:.1f}s, a cheater faster by the compute it saves:")
    print(f"{'cheat':<32}{'saved':>7}{'detect':>8}{'weight/honest':>15}  < 5 %?")
    rel = relative_weights(cheats, rounds, seed, cfg)
    for name, (saved, q) in cheats.items():
        print(f"{name:<32}{saved:>7.0%}{q:>8.2f}{rel[name]:>15.4f}  "
              f"{'yes' if rel[name] < 0.05 else 'NO'}")
    print("\ndetection sweep (a cheat saving 50 %, worst case for the penalty: fast answers):")
    print(f"{'detect':>8}{'weight/honest':>15}  < 5 %?  exclusion_rounds needed")
    for q in (1 / 3, 0.5, 2 / 3, 0.9, 1.0):
        r = relative_weights({"x": (0.5, q)}, rounds, seed, cfg)["x"]
        need = exclusion_needed(0.5, q, rounds, seed, cfg)
        print(f"{q:>8.2f}{r:>15.4f}  {'yes' if r < 0.05 else 'NO ':<6}  "
              f"{need if need is not None else '> 3200'}")


@dataclass(frozen=True)
class Capacity:
    """A miner's replicas and the concurrency it declares in /v1/info."""

    name: str
    replicas: int
    declared: int
    latency: float = HONEST_LATENCY  # median seconds per generation on one replica


CAPACITIES = (
    Capacity("1 replica, declares 1", 1, 1),
    Capacity("2 replicas, declares 2", 2, 2),
    Capacity("4 replicas, declares 4", 4, 4),
    Capacity("1 replica, declares 4", 1, 4),  # over-claims: one GPU behind a claim of four
    Capacity("2 replicas, declares 4", 2, 4),
)


def capacity_outcome(uid: int, c: Capacity, rng: np.random.Generator, cfg: ScoringConfig,
                     timeout: float = TIMEOUT) -> Outcome:
    """One round for a miner: min(declared, volume_cap) challenges at once, served first in
    first out by its replicas (request i ends after ceil((i+1)/replicas) generations); the
    miner's queue refuses what cannot finish by the deadline, as the real gate does."""
    k = max(1, min(c.declared, cfg.volume_cap))
    ends = []
    busy_until = [0.0] * c.replicas
    for _ in range(k):
        slot = int(np.argmin(busy_until))
        took = c.latency * float(rng.lognormal(0.0, 0.15))
        if busy_until[slot] + took > timeout:
            continue  # 429 cannot_start_in_time: not delivered
        busy_until[slot] += took
        ends.append(busy_until[slot])
    first = ends[0] if ends else None
    return Outcome(uid, f"hk{uid}", "flux-schnell", status=OK if ends else "timeout",
                   latency=first, timeout=timeout, audited=True, audit_passed=True,
                   probes=k, verified=len(ends), span=max(ends) if ends else None)


def capacity_shares(rounds: int, seed: int, cfg: ScoringConfig,
                    capacities: tuple[Capacity, ...] = CAPACITIES, warmup: int = 50
                    ) -> dict[str, float]:
    """Average weight of each capacity profile (one miner each) with the real scoring."""
    rng = np.random.default_rng(seed)
    book = ScoreBook(cfg=cfg)
    share = {c.name: 0.0 for c in capacities}
    measured = 0
    for r in range(rounds):
        outcomes = [capacity_outcome(uid, c, rng, cfg) for uid, c in enumerate(capacities)]
        book.apply(r, outcomes, round_rewards(outcomes, cfg))
        if r >= warmup:
            for uid, w in compute_weights(book.scores(), book.models(),
                                          cfg.model_shares).items():
                share[capacities[uid].name] += w
            measured += 1
    return {k: v / max(measured, 1) for k, v in share.items()}


def capacity_report(rounds: int, seed: int, cfg: ScoringConfig) -> None:
    shares = capacity_shares(rounds, seed, cfg)
    one = shares[CAPACITIES[0].name]
    print(f"\ncapacity that pays (volume_cap={cfg.volume_cap}, {HONEST_LATENCY:.0f}s per "
          f"generation, {TIMEOUT:.0f}s timeout, every answer verified):")
    print(f"{'miner':<26}{'replicas':>9}{'declares':>9}{'weight':>9}{'vs 1 replica':>14}")
    for c in CAPACITIES:
        print(f"{c.name:<26}{c.replicas:>9}{c.declared:>9}{shares[c.name]:>9.3f}"
              f"{shares[c.name] / one:>14.2f}")


def dropped_fetch_report(rounds: int, seed: int, cfg: ScoringConfig) -> None:
    """A cheater that refuses the states fetch of every audited (cheated) answer: the fetch
    fails as unavailable (earns 0, no exclusion) instead of failing the audit (exclusion).
    Its weight against an honest miner's, by audit fraction and by compute saved; and an
    honest miner whose fetches fail 2 % of the time (restarts without a states store,
    network blips past the retries)."""
    from dataclasses import replace

    print(f"\ncheat, then drop the fetch (unavailable: reward 0 and unavailable_penalty="
          f"{cfg.unavailable_penalty:g} / p zero rewards, no exclusion); weight per miner over an "
          "honest miner's:")
    fractions = (0.05, 0.1, 0.2, 0.5, 1.0)
    print(f"{'strategy':<30}{'penalty':>8}" + "".join(f"{'p=' + format(p, 'g'):>9}"
                                                     for p in fractions))
    rows = [("drops fetch, saves 50 %", 0.5, 0.0, cfg.unavailable_penalty),
            ("drops fetch, saves 90 %", 0.9, 0.0, cfg.unavailable_penalty),
            ("drops fetch, saves 50 %", 0.5, 0.0, 1.0),
            ("honest, 2 % fetches fail", 0.0, 0.02, cfg.unavailable_penalty)]
    for name, saved, faults, penalty in rows:
        c = replace(cfg, unavailable_penalty=penalty)
        cells = [dropped_fetch_ratio(saved, faults, p, rounds, seed, c) for p in fractions]
        print(f"{name:<30}{penalty:>8g}" + "".join(f"{v:>9.3f}" for v in cells))


def dropped_fetch_ratio(saved: float, faults: float, audit_fraction: float, rounds: int,
                        seed: int, cfg: ScoringConfig) -> float:
    """Weight per miner of 2 miners over an honest one's (4 honest at HONEST_LATENCY): a
    cheater saving `saved` of the compute that drops every audited fetch (saved > 0), or an
    honest miner whose audited fetches fail with probability `faults`."""
    from dataclasses import replace

    strategies = (Strategy("honest", 4, HONEST_LATENCY, True),
                  Strategy("x", 2, max(0.05, HONEST_LATENCY * (1.0 - saved)),
                           honest=saved == 0.0, drops_fetch=saved > 0, faults=faults))
    res = simulate(rounds, audit_fraction, seed, replace(cfg, audit_fraction=audit_fraction),
                   strategies=strategies)
    return (res["share"]["x"] / 2) / (res["share"]["honest"] / 4)


def _detections(pairs: list[str] | None) -> dict[str, tuple[float, float]]:
    cheats = dict(ADVERSARY)
    for pair in pairs or []:
        name, _, value = pair.rpartition("=")
        saved = cheats.get(name, (0.5, 1.0))[0]
        cheats[name] = (saved, float(value))
    return cheats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--audit-fraction", type=float, default=0.1)
    parser.add_argument("--exclusion-rounds", type=int, default=ScoringConfig().exclusion_rounds)
    parser.add_argument("--alpha", type=float, default=ScoringConfig().alpha)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--detection", nargs="*", default=None, metavar="CHEAT=P",
                        help="detection probability per audited answer (default: ADVERSARY)")
    parser.add_argument("--from-adversary", action="store_true",
                        help="run `bench/adversary.py --quick` first and take its detections")
    parser.add_argument("--only-detection", action="store_true",
                        help="skip the strategy table and the audit-fraction sweep")
    parser.add_argument("--only-capacity", action="store_true",
                        help="only the capacity table (replicas and declared concurrency)")
    parser.add_argument("--only-dropped-fetch", action="store_true",
                        help="only the 'cheat, then drop the fetch' table")
    args = parser.parse_args()
    cfg = ScoringConfig(alpha=args.alpha, exclusion_rounds=args.exclusion_rounds,
                        model_shares={"flux-schnell": 1.0})
    cheats = _detections(args.detection)
    if args.from_adversary:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import adversary

        adversary.main(["--quick"])
        cheats = adversary.summary(adversary.LAST_RUN)
    if args.only_capacity:
        capacity_report(args.rounds, args.seed, cfg)
        return
    if args.only_dropped_fetch:
        dropped_fetch_report(args.rounds, args.seed, cfg)
        return
    if args.only_detection:
        detection_report(cheats, args.rounds, args.seed, cfg)
        return
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
    detection_report(cheats, args.rounds, args.seed, cfg)
    capacity_report(args.rounds, args.seed, cfg)
    dropped_fetch_report(args.rounds, args.seed, cfg)


if __name__ == "__main__":
    main()
