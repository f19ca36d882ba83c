"""The table `niche localnet` prints at the end: what each miner earned, read from the
validator's state file and the local chain (the weights shown are the chain's own)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from niche.devnet.localnet.plan import LocalnetPlan


@dataclass(frozen=True)
class ScoreRow:
    uid: int
    name: str
    hotkey: str
    model: str | None
    cheat: str | None
    answered: int
    verified: int
    audited: int
    mean_latency: float | None
    score: float
    weight: float
    incentive: float


def collect(plan: LocalnetPlan) -> tuple[list[ScoreRow], dict]:
    """Rows for every miner plus facts about the run (rounds done, weight block)."""
    from niche.chain.local import LocalChain
    from niche.validator.scoring import ScoringConfig
    from niche.validator.state import ValidatorState

    chain = LocalChain(plan.chain_path)
    try:
        metagraph = chain.metagraph(plan.netuid)
        validator = plan.role("validator")[0]
        history = chain.weights_history(plan.netuid, validator.hotkey)
    finally:
        chain.close()
    chain_weights: dict[int, float] = {}
    weight_block = None
    if history:
        last = history[-1]
        chain_weights = dict(zip(last["uids"], last["weights"], strict=False))
        weight_block = last.get("block")

    rounds_done = 0
    scores: dict[int, float] = {}
    rows_by_uid: dict[int, list] = {}
    if validator.state_path and Path(validator.state_path).exists():
        with ValidatorState(validator.state_path, read_only=True) as state:
            rounds_done = state.round_index
            book = state.load_book(ScoringConfig())
            scores = {uid: entry.score for uid, entry in book.uids.items()}
            for row in state.history(limit=100000):
                rows_by_uid.setdefault(row.uid, []).append(row)

    rows = []
    for proc in plan.role("miner"):
        neuron = metagraph.by_hotkey(proc.hotkey)
        if neuron is None:
            continue
        mine = rows_by_uid.get(neuron.uid, [])
        ok = [r for r in mine if r.status == "ok"]
        latencies = [r.latency for r in ok if r.latency is not None]
        rows.append(ScoreRow(
            uid=neuron.uid, name=proc.name, hotkey=proc.hotkey, model=proc.model,
            cheat=proc.cheat, answered=len(ok),
            verified=sum(1 for r in mine if r.audited and r.audit_passed),
            audited=sum(1 for r in mine if r.audited),
            mean_latency=mean(latencies) if latencies else None,
            score=scores.get(neuron.uid, 0.0),
            weight=chain_weights.get(neuron.uid, 0.0),
            incentive=neuron.incentive,
        ))
    facts = {"rounds": rounds_done, "weights_block": weight_block,
             "weights_set": bool(history), "validator": validator.name}
    return sorted(rows, key=lambda r: r.uid), facts


def render(rows: list[ScoreRow], facts: dict) -> str:
    width = max([11, *(len(r.cheat or "") for r in rows)])
    header = (f"{'uid':>3}  {'miner':<8} {'hotkey':<10} {'model':<13} {'behaviour':<{width}} "
              f"{'verified':>8} {'latency':>8} {'score':>6} {'weight':>7} {'incentive':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        latency = f"{r.mean_latency:.2f}s" if r.mean_latency is not None else "-"
        lines.append(
            f"{r.uid:>3}  {r.name:<8} {r.hotkey[:8] + '..':<10} {r.model or '-':<13} "
            f"{r.cheat or 'honest':<{width}} {f'{r.verified}/{r.audited}':>8} {latency:>8} "
            f"{r.score:>6.3f} {r.weight:>7.3f} {r.incentive:>9.3f}")
    if facts.get("weights_set"):
        lines.append(f"weights: set on the local chain by {facts['validator']} at block "
                     f"{facts['weights_block']} (the column above is read back from the chain)")
    else:
        lines.append("weights: none set on the local chain yet")
    return "\n".join(lines)
