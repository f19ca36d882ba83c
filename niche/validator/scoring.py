"""Rewards, moving averages and weights. Pure functions over plain data: no I/O here.

reward(answer) = 0                                   no answer, error, invalid image,
                                                     duplicate answer, failed audit
               = (base + (1 - base) * speed) * volume   otherwise, with
speed          = w * (1 - latency / timeout)         absolute: how much of the deadline is left
               + (1 - w) * (fastest / latency)       relative: against the fastest valid answer
                                                     of the same workload (model, pipeline,
                                                     size, steps) this round
volume         = 1                                   one challenge (declared concurrency 1)
               = min(k, verified * typical / span) / sqrt(k)
                                                     k = min(declared, volume_cap) challenges
                                                     sent at once; verified = valid answers
                                                     among them; span = latency of the last
                                                     valid one; typical = median latency of
                                                     the valid scored answers of the workload
                                                     this round. Delivering all k in one
                                                     typical answer's time gives sqrt(k)
                                                     (SN23's sqrt-of-volume scale); what was
                                                     claimed but not delivered costs linearly.
                 + organic_weight * min(organic, volume_cap)
                                                     organic = the miner's answers to users (via
                                                     the gateway) that passed their audit this
                                                     round: serving users pays.
score[uid]     = (1 - alpha) * score[uid] + alpha * reward      (EMA; new hotkey starts at 0)
failed audit   -> score = 0 and the hotkey is excluded (not queried, reward 0) for
                  `exclusion_rounds` rounds (fraud: wrong states or hashes, a refused or
                  malformed states answer).
unavailable    -> the states of an audited answer could not be fetched for reasons of
                  availability (connection refused/reset, timeout after the retries, the
                  miner restarted and lost them): a fault, not fraud. The answer earns 0 and
                  the EMA takes `unavailable_penalty` zero rewards for it (score x
                  (1 - alpha)^unavailable_penalty), no exclusion. The penalty makes "cheat,
                  then refuse the audit's fetch" earn less than honest work at any audit
                  fraction the validator uses (bench/incentives.py); an honest miner keeps
                  its states across restarts, so it rarely pays it.
weights        = per model m: share[m] * score[uid] / sum(score of m's uids); the share of a
                 model with no scoring uid goes to the other models in proportion; normalised.
See docs/scoring.md for why these numbers.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

OK = "ok"

# Reasons recorded for a zero reward that the validator itself decides (the client's
# QueryResult statuses - timeout, http_error, bad_image, ... - are recorded as they come).
AUDIT_FAILED = "audit_failed"
EXCLUDED = "excluded"
NO_MODEL = "no_supported_model"
NO_STATES = "no_states"
UNAVAILABLE = "states_unavailable"
"""An audited answer whose states could not be fetched (availability, not fraud)."""
UNVERIFIABLE = "unverifiable"
"""An audited answer declaring a dtype or kernels the validator cannot reproduce: a zero
reward (the EMA decays), no exclusion."""
OWN_RATE = "own_rate_limit"
"""A miner whose advertised rate for this validator allows no request this round (a rate
below the median miner's): a zero reward for the rounds it offers no service, so a miner
cannot freeze a good score by advertising a rate that is never spent; no exclusion."""
UNAUDITED = "unaudited"
"""An answer picked for audit that the validator itself could not audit (its own error, a
dtype or kernel it cannot reproduce): not paid as verified, and no penalty either: the EMA
does not move for it."""


@dataclass(frozen=True)
class ScoringConfig:
    alpha: float = 0.1
    """EMA weight of the newest round: ~1/alpha rounds of memory."""
    base: float = 0.2
    """Reward of a valid answer that arrives just before the deadline: serving at all counts."""
    speed_weight: float = 0.5
    """Split of the speed term between the absolute (timeout) and relative (fastest) parts."""
    exclusion_rounds: int = 50
    """Rounds a hotkey that failed an audit is excluded: what a caught cheat loses."""
    model_shares: Mapping[str, float] = field(
        default_factory=lambda: {"flux-schnell": 0.5, "kolors": 0.5})
    volume_cap: int = 4
    """Most challenges sent to one miner at once (its declared concurrency, capped): the
    most parallel throughput a round can pay for, sqrt(volume_cap) at best."""
    organic_weight: float = 0.1
    """Added to the volume factor per organic answer that passed its audit this round (up
    to volume_cap of them): what serving users through the gateway earns."""
    unavailable_penalty: float = 5.0
    """Zero rewards the EMA takes for an audited answer whose states could not be fetched
    (a fault of availability), divided by `audit_fraction`: a cheater that refuses the
    fetches of its audited answers loses as much per cheated answer whatever share is
    audited, so refusing does not pay (bench/incentives.py); an honest miner loses
    `unavailable_penalty` rewards per failed fetch on average, far short of a caught
    cheat's exclusion."""
    audit_fraction: float = 1.0
    """The share of answers the validator audits (ValidatorConfig sets it)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if not 0.0 <= self.base <= 1.0 or not 0.0 <= self.speed_weight <= 1.0:
            raise ValueError("base and speed_weight must be in [0, 1]")
        if self.exclusion_rounds < 0:
            raise ValueError("exclusion_rounds must be >= 0")
        if any(v < 0 for v in self.model_shares.values()):
            raise ValueError("model shares must be >= 0")
        if self.volume_cap < 1:
            raise ValueError("volume_cap must be >= 1")
        if self.organic_weight < 0:
            raise ValueError("organic_weight must be >= 0")
        if self.unavailable_penalty < 0:
            raise ValueError("unavailable_penalty must be >= 0")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError("audit_fraction must be in [0, 1]")

    @property
    def unavailable_zeros(self) -> float:
        """Zero rewards the EMA takes for one unavailable audited answer."""
        return self.unavailable_penalty / max(self.audit_fraction, 0.01)


@dataclass(frozen=True)
class Outcome:
    """What happened to one miner in one round, as scoring sees it."""

    uid: int
    hotkey: str
    model: str | None
    workload: tuple = ()
    status: str = OK
    reason: str = ""
    latency: float | None = None
    timeout: float = 30.0
    audited: bool = False
    audit_passed: bool | None = None
    similarity: float | None = None
    probes: int = 1
    """Challenges sent to this miner at once this round (1 + the volume probes)."""
    verified: int = 0
    """Valid answers among the probes (in time, well formed, new, not failing an audit)."""
    span: float | None = None
    """Seconds from sending the probes to the last valid answer."""
    organic: float = 0.0
    """Organic answers (the gateway's users) this miner served, as their passed audits
    show them: each passed audit counts for 1/draw answers (the gateway queues a `draw`
    share of them), so serving users pays for the GPU time they take from challenges."""
    unavailable_answers: float = 0.0
    """This round's audited answers whose states could not be fetched, each weighted by
    `audit_fraction` over the chance it was drawn (a challenge or a volume probe: 1; an
    organic answer: audit_fraction / its draw): the EMA takes `unavailable_zeros` zero
    rewards per unit, so dodging any one audit never pays however rarely it is drawn."""

    @property
    def valid(self) -> bool:
        """Answered in time with a well-formed image and not caught cheating."""
        return (self.status == OK and self.latency is not None
                and self.audit_passed is not False)

    @property
    def unavailable(self) -> bool:
        """Its audit could not fetch the states for reasons of availability."""
        return self.status == UNAVAILABLE


def unverifiable(outcome: Outcome, reason: str) -> Outcome:
    """`outcome` of an answer whose declared dtype or kernels this validator cannot
    recompute: earns nothing (a zero reward), but is no caught cheat (no exclusion)."""
    return replace(outcome, status=UNVERIFIABLE, reason=f"{UNVERIFIABLE}: {reason}",
                   audited=True, audit_passed=None)


def unavailable(outcome: Outcome, reason: str, answers: float = 1.0) -> Outcome:
    """`outcome` after an audit could not fetch the states (connection, timeout, lost on
    a restart): earns nothing this round, but is no caught cheat (audit_passed stays None,
    so nothing excludes the hotkey). `answers`: that answer's weight (see
    `Outcome.unavailable_answers`), added to the round's earlier ones; the first reason
    stays."""
    if outcome.status == UNAVAILABLE:
        return replace(outcome, unavailable_answers=outcome.unavailable_answers + answers)
    return replace(outcome, status=UNAVAILABLE, reason=f"{UNAVAILABLE}: {reason}",
                   audited=True, audit_passed=None,
                   unavailable_answers=outcome.unavailable_answers + answers)


def speed_reward(latency: float, timeout: float, fastest: float, cfg: ScoringConfig) -> float:
    """Strictly decreasing in latency on (0, timeout]; base at the deadline (fastest>latency
    cannot happen), 1 for an instant answer."""
    if timeout <= 0:
        return 0.0
    latency = max(latency, 1e-6)
    if latency > timeout:
        return 0.0
    absolute = 1.0 - latency / timeout
    relative = min(1.0, max(fastest, 1e-6) / latency)
    speed = cfg.speed_weight * absolute + (1.0 - cfg.speed_weight) * relative
    return cfg.base + (1.0 - cfg.base) * speed


def volume_factor(probes: int, verified: int, span: float | None, typical: float,
                  cfg: ScoringConfig) -> float:
    """What a miner's parallel throughput multiplies its reward by: 1 for one challenge;
    for k > 1 the answers it delivered per `typical` answer's time, over sqrt(k). Honest
    delivery of k gives sqrt(k) (more replicas pay, with SN23's diminishing returns);
    claiming k and delivering d < k gives d / sqrt(k), less than claiming d. `typical` is
    the round's median, not the miner's own latency: holding answers back to look
    parallel only makes the span longer."""
    if probes <= 1:
        return 1.0
    if span is None:  # no valid answer (verified 0 needs no test of its own: it gives 0)
        return 0.0
    k = min(int(probes), cfg.volume_cap)
    delivered = min(float(k), verified * max(typical, 1e-6) / max(span, 1e-6))
    return delivered / math.sqrt(k)


def round_rewards(outcomes: Sequence[Outcome], cfg: ScoringConfig) -> dict[int, float]:
    """Reward per uid for one round: in [0, 1] for one challenge, up to sqrt(volume_cap)
    for a miner that delivers its declared concurrency, plus organic_weight per organic
    answer that passed its audit (up to volume_cap of them)."""
    latencies: dict[tuple, list[float]] = {}
    for o in outcomes:
        if o.valid:
            latencies.setdefault((o.model, o.workload), []).append(
                float(o.latency))  # type: ignore[arg-type]  # valid: set
    fastest = {key: min(values) for key, values in latencies.items()}
    typical = {key: float(np.median(values)) for key, values in latencies.items()}
    rewards = {}
    for o in outcomes:
        if not o.valid:
            rewards[o.uid] = 0.0
        else:
            key = (o.model, o.workload)
            volume = volume_factor(o.probes, o.verified, o.span, typical[key], cfg) \
                + cfg.organic_weight * min(max(0, o.organic), cfg.volume_cap)
            rewards[o.uid] = speed_reward(float(o.latency), o.timeout,  # type: ignore[arg-type]
                                          fastest[key], cfg) * volume
    return rewards


@dataclass
class UidScore:
    hotkey: str
    score: float = 0.0
    model: str | None = None


@dataclass
class ScoreBook:
    """Moving scores per uid plus hotkey exclusions; the validator's memory between rounds."""

    cfg: ScoringConfig = field(default_factory=ScoringConfig)
    uids: dict[int, UidScore] = field(default_factory=dict)
    excluded_until: dict[str, int] = field(default_factory=dict)
    """hotkey -> first round in which it may be queried again."""

    def is_excluded(self, hotkey: str, round_index: int) -> bool:
        return self.excluded_until.get(hotkey, -1) > round_index

    def sync_hotkeys(self, hotkeys: Mapping[int, str]) -> list[int]:
        """Forget uids that left and reset uids whose hotkey changed (a new miner earns its
        own score). Returns the uids that were reset."""
        reset = []
        for uid in list(self.uids):
            if uid not in hotkeys:
                del self.uids[uid]
        for uid, hotkey in hotkeys.items():
            entry = self.uids.get(uid)
            if entry is None or entry.hotkey != hotkey:
                if entry is not None:
                    reset.append(uid)
                self.uids[uid] = UidScore(hotkey=hotkey)
        return reset

    def apply(self, round_index: int, outcomes: Iterable[Outcome],
              rewards: Mapping[int, float]) -> None:
        a = self.cfg.alpha
        for o in outcomes:
            entry = self.uids.get(o.uid)
            if entry is None or entry.hotkey != o.hotkey:
                entry = self.uids[o.uid] = UidScore(hotkey=o.hotkey)
            if o.model:
                entry.model = o.model
            if o.audit_passed is False:
                entry.score = 0.0
                self.excluded_until[o.hotkey] = round_index + 1 + self.cfg.exclusion_rounds
                continue
            if o.status == UNAUDITED:  # no verdict: neither paid nor penalised
                continue
            if o.unavailable:  # a fault: zero rewards, no exclusion
                entry.score *= (1.0 - a) ** (self.cfg.unavailable_zeros
                                             * max(1.0, o.unavailable_answers))
                continue
            entry.score = (1.0 - a) * entry.score + a * float(rewards.get(o.uid, 0.0))
        for hotkey in [h for h, until in self.excluded_until.items() if until <= round_index]:
            del self.excluded_until[hotkey]

    def scores(self) -> dict[int, float]:
        return {uid: e.score for uid, e in self.uids.items()}

    def models(self) -> dict[int, str | None]:
        return {uid: e.model for uid, e in self.uids.items()}


def compute_weights(scores: Mapping[int, float], models: Mapping[int, str | None],
                    shares: Mapping[str, float],
                    served: Mapping[int, Sequence[str]] | None = None) -> dict[int, float]:
    """Per-model emission shares, then normalised; empty when no uid has earned anything.
    A uid in `served` with several of the shared models (it is challenged on each in
    proportion to the shares) competes in each model's group with that part of its score,
    instead of only in the group of the model it was last challenged on."""
    per_model: dict[str, dict[int, float]] = {}
    for uid, score in scores.items():
        if score <= 0.0:
            continue
        several = [m for m in (served or {}).get(uid, ()) if shares.get(m, 0.0) > 0]
        if len(several) > 1:
            mass = sum(shares[m] for m in several)
            for m in several:
                per_model.setdefault(m, {})[uid] = float(score) * shares[m] / mass
            continue
        model = models.get(uid)
        if model in shares:
            per_model.setdefault(model, {})[uid] = float(score)  # type: ignore[arg-type]
    live = {m: shares[m] for m in per_model if shares[m] > 0}
    total_share = sum(live.values())
    if total_share <= 0:
        return {}
    weights: dict[int, float] = {}
    for model, share in live.items():
        group = per_model[model]
        mass = sum(group.values())
        for uid, score in group.items():
            weights[uid] = weights.get(uid, 0.0) + (share / total_share) * score / mass
    norm = sum(weights.values())
    return {uid: w / norm for uid, w in sorted(weights.items())}


def choose_audits(rng: np.random.Generator, candidates: Sequence[int],
                  fraction: float) -> list[int]:
    """Pick round(fraction * n) of the candidates (stochastic rounding, so the expected
    number is exactly fraction * n) uniformly, AFTER the answers are in: a miner cannot
    know whether its answer will be regenerated."""
    n = len(candidates)
    if n == 0 or fraction <= 0:
        return []
    if fraction >= 1:
        return list(candidates)
    expected = fraction * n
    k = int(expected) + int(rng.random() < expected - int(expected))
    if k == 0:
        return []
    picked = rng.choice(n, size=k, replace=False)
    return [candidates[int(i)] for i in sorted(picked)]


def weights_due(current_block: int, last_set_block: int | None, epoch_length: int,
                rate_limit: int) -> bool:
    """Set weights once per epoch, never faster than the chain's rate limit allows."""
    if last_set_block is None:
        return True
    return current_block - last_set_block >= max(int(epoch_length), int(rate_limit), 1)
