"""The validator loop. One round:

metagraph -> Info of each sampled miner -> one fresh challenge per miner -> query_many
(concurrent, deadline, latency on our clock) -> cheap checks on every answer (size, mode,
duplicates) -> audit a random fraction (chosen after the answers are in) by regenerating
-> rewards + EMA -> persist the round (one transaction) -> set weights when the epoch and
the chain's rate limit allow.

SIGTERM / SIGINT stop the loop after the current round is persisted (exit 0); a SIGKILL
loses at most the round in flight, never the state file.

Registration: the validator starts only with a validator permit (or waits for one with
`wait_for_permit`), and checks on every round's metagraph that its hotkey still holds its
uid; deregistered, it stops with DEREGISTERED_EXIT_CODE unless told to keep running.
"""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from niche.chain.base import Chain, ChainError, Metagraph, Neuron
from niche.chain.registration import (
    DEREGISTERED_EXIT_CODE,
    RegistrationWatch,
    permit_problem,
    require_permit,
)
from niche.errors import ConfigError, InvalidRequest
from niche.protocol import GenerationParams, InfoResponse, PipelineKind
from niche.runtime import RuntimeWatch, describe, runtime_info
from niche.validator import scoring
from niche.validator.audit import (
    AuditConfig,
    Auditor,
    AuditResult,
    forgive_outage,
    forgive_refusals,
    unaudited,
)
from niche.validator.challenges import (
    Challenge,
    ChallengeFactory,
    ModelPlan,
    Target,
    engine_conditioner,
    model_rng,
    pick_model,
    plan_from_spec,
    round_rng,
)
from niche.validator.checks import DUPLICATE, AnswerIndex, fingerprint, shape_problem
from niche.validator.client import MinerClient, QueryResult, as_target
from niche.validator.metrics import ValidatorMetrics
from niche.validator.organic import MIN_DRAW, OrganicItem, OrganicQueue, QueueError
from niche.validator.own_faults import VALIDATOR_ERROR, round_fault
from niche.validator.pacing import RateBudgets, caller_rate, paced_interval
from niche.validator.prompts import PromptSource
from niche.validator.scoring import OK, Outcome, ScoreBook, ScoringConfig
from niche.validator.state import Answer, ValidatorState
from niche.validator.steps import StepChecker, StepThresholds
from niche.validator.verify import Verifier, VerifyConfig

if TYPE_CHECKING:
    from bittensor import Wallet

    from niche.models.engine import ImageEngine

log = logging.getLogger("niche.validator")


@dataclass
class ValidatorConfig:
    netuid: int
    models: Sequence[str] = ("flux-schnell", "kolors")
    state_path: Path | None = None
    """None: default_state_path(network, netuid, hotkey) (the CLI resolves it)."""
    sample_size: int = 64
    """Most miners queried per round (a random sample when there are more)."""
    timeout: float | None = None
    """Seconds a miner has to answer; None = each model's own challenge timeout."""
    epoch_length: int = 100
    """Blocks between two weight settings (never below the chain's rate limit)."""
    audit_fraction: float = 1.0
    """Share of valid answers audited (step check: a few steps' cost, so all by default)."""
    rounds: int | None = None
    """Stop after this many rounds (None: run until signalled)."""
    round_interval: float = 12.0
    """Seconds from the start of one round to the start of the next."""
    seed: int | None = None
    """Challenge seed; None = a fresh secret one per process (recommended on a real net)."""
    info_timeout: float = 5.0
    answer_memory_rounds: int = 1000
    prompts_file: Path | None = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    step_thresholds: StepThresholds = field(default_factory=StepThresholds)
    version_key: int = 0
    organic_queue: Path | None = None
    """The gateway's queue of organic answers to audit (niche/validator/organic.py)."""
    organic_per_round: int = 16
    """Most organic answers audited per round, oldest first."""
    organic_max_age: float = 300.0
    """Older organic answers are skipped: a miner keeps states for 600 s."""
    wait_for_permit: bool = False
    """Without a validator permit, wait (polling every permit_poll seconds) instead of
    refusing to start."""
    permit_poll: float = 60.0
    keep_running_when_deregistered: bool = False
    """Keep running rounds after the hotkey lost its uid instead of stopping with
    DEREGISTERED_EXIT_CODE."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ConfigError("--neuron.audit_fraction must be in [0, 1]")
        if self.sample_size < 1:
            raise ConfigError("--neuron.sample_size must be >= 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("--neuron.timeout must be > 0")
        if self.epoch_length < 1:
            raise ConfigError("--neuron.epoch_length must be >= 1")
        if self.rounds is not None and self.rounds < 0:
            raise ConfigError("--neuron.rounds must be >= 0")
        if self.round_interval < 0:
            raise ConfigError("--neuron.round_interval must be >= 0")
        if self.permit_poll <= 0:
            raise ConfigError("--permit-poll must be > 0 seconds")
        if self.scoring.audit_fraction != self.audit_fraction:  # scales the unavailable penalty
            self.scoring = replace(self.scoring, audit_fraction=self.audit_fraction)


RATE_RETRY_WAIT = 1.2
"""Seconds before asking again what a miner refused as over its rate (its bucket refills a
request a second at the default 60 a minute)."""
ENDPOINTS_FRESH = 5.0
"""Seconds a metagraph read for miners' endpoints is reused during audits."""
STOP_FAULTS = frozenset({"timeout", "unreachable", "no_endpoint", "http_error",
                         scoring.UNAVAILABLE})
"""What a miner answers when it is being stopped (the whole machine going down, `pm2 stop
all`): in a round the validator was asked to stop during, these are not scored."""


@dataclass
class RoundReport:
    round: int
    block: int
    outcomes: list[Outcome]
    rewards: dict[int, float]
    weights: dict[int, float] | None = None
    weights_message: str = ""
    seconds: float = 0.0
    scores: dict[int, float] = field(default_factory=dict)
    """EMA scores right after this round."""


def _operators(neurons: Sequence[Neuron]) -> dict[str, dict[str, str]]:
    """Each hotkey's coldkey and host on the metagraph, which `audit.count_operators`
    counts operators by (the `coldkeys=` and `hosts=` of the forgive_* rules)."""
    return {"coldkeys": {n.hotkey: n.coldkey for n in neurons},
            "hosts": {n.hotkey: n.endpoint.ip for n in neurons if n.endpoint}}


class Validator:
    """Owns one round at a time; all collaborators are passed in (tests build real ones)."""

    def __init__(self, config: ValidatorConfig, chain: Chain, wallet: Wallet,
                 engine: ImageEngine, client: MinerClient, state: ValidatorState,
                 extra_engines: Sequence[ImageEngine] = ()):
        self.config = config
        self.chain = chain
        self.wallet = wallet
        self.engine = engine
        self.client = client
        self.state = state
        self.hotkey = wallet.hotkey.ss58_address
        state.bind(chain.network, config.netuid, self.hotkey)
        state.record_round_interval(config.round_interval)  # the gateway's first guess
        self.registration = RegistrationWatch(self.hotkey, config.netuid, "validator")
        self.permit_missing: str | None = None
        """Why rounds are being skipped (the permit was lost mid-run), None while it is held."""
        self.own_fault: str | None = None
        """Why the last round was not scored (own_faults.round_fault), None when it was."""
        self.exit_code = 0
        self.seed = config.seed if config.seed is not None else secrets.randbits(63)
        self._audit_rng = np.random.default_rng(secrets.randbits(128))
        self.book: ScoreBook = state.load_book(config.scoring)
        start = state.round_index
        self.answers = AnswerIndex(state.recent_answers(start - config.answer_memory_rounds))
        last = state.last_weights()
        self.last_weights_block: int | None = last.block if last else None
        self.plans = self._plans()
        prompts = (PromptSource.from_file(config.prompts_file) if config.prompts_file
                   else PromptSource())
        needs_image = any(p.needs_image for plan in self.plans.values() for p in plan.pipelines)
        conditioner = engine_conditioner(engine, prompts=prompts) if needs_image else None
        self.factory = ChallengeFactory(self.plans, prompts, conditioner, engine.resolve)
        self.verifier = Verifier(engine, config.verify)
        self.auditor = Auditor(engine, self.verifier,
                               StepChecker(engine, config.step_thresholds,
                                           extra_engines=extra_engines),
                               client, config.audit)
        self.organic = (OrganicQueue(config.organic_queue, signer=self.hotkey)
                        if config.organic_queue else None)
        self.metrics = ValidatorMetrics()
        self.runtime = RuntimeWatch(runtime_info(engine))
        log.info("runtime: %s", describe(self.runtime.mine))
        """Our libraries/device/dtypes; a miner running others gets one warning per change."""
        self._stop = threading.Event()
        self._organic_passed: dict[int, float] = {}
        """uid -> organic answers that passed their audit this round (count as volume)."""
        self._organic_verdicts: list[tuple[int, bool | None, str, float | None]] = []
        """This round's organic verdicts (id, passed, reason, similarity), written after it
        is saved."""
        self._advertised: dict[int, InfoResponse] = {}
        """uid -> its last /v1/info (its rate limit paces the rounds)."""
        self.paced_interval = 0.0
        """Seconds the median miner's advertised rate needs between round starts (`_pace`)."""
        self._budgets = RateBudgets()
        self._paced_uids: set[int] = set()
        """uids already said to sit rounds out (said once)."""
        self._endpoints: tuple[float, dict[str, str]] = (-math.inf, {})
        """(when read, hotkey -> endpoint URL) for the audit fetches' `endpoint_of`."""
        self._endpoints_reading: asyncio.Task | None = None
        self.client.endpoint_of = self._endpoint_of
        self._must_audit: set[str] = set()
        """Request ids of this round's answers that look like an earlier answer: audited
        whatever the audit fraction draws."""
        self._scored_on: dict[int, tuple[str, ...]] = state.load_scored_on(self.book)
        """uid -> the models it is scored on (logged when it changes; kept in the state, so
        the first weights after a restart split a multi-model miner's score alike)."""
        self.reports: list[RoundReport] = []
        """The last few rounds' reports (newest last), for status pages and tests."""

    def _plans(self) -> dict[str, ModelPlan]:
        """One plan per model, each allowed shape checked against the engine at start-up so
        a misconfigured model fails now, in one line, not in the middle of a round."""
        plans = {}
        for model in self.config.models:
            plan = plan_from_spec(self.engine.spec(model), timeout=self.config.timeout)
            for (width, height), steps in ((size, s) for size in plan.sizes for s in plan.steps):
                try:
                    self.engine.resolve(GenerationParams(
                        model=model, prompt="a", seed=0, width=width, height=height,
                        steps=steps, guidance=plan.guidance))
                except InvalidRequest as exc:
                    raise ConfigError(f"model {model}: its challenge shape {width}x{height}, "
                                      f"{steps} steps is refused by the engine ({exc})") from None
            plans[model] = plan
        return plans

    # ------------------------------------------------------------------ the loop
    def stop(self, signum: int | None = None, _frame: Any = None) -> None:
        """Finish the round in hand, then exit (a signal handler, or called directly)."""
        if not self._stop.is_set():
            cause = signal.Signals(signum).name if signum is not None else "stop"
            log.info("%s received: finishing the current round", cause)
        self._stop.set()

    def run(self) -> int:
        """Run rounds until `rounds` is reached or a signal arrives. Returns the exit code."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.stop)
        done = 0
        try:
            self._check_registered()
            while not self._stop.is_set():
                if self.config.rounds is not None and done >= self.config.rounds:
                    break
                started = time.monotonic()
                try:
                    report = asyncio.run(self.run_round())
                except ChainError as exc:  # the chain is down or busy: nothing was persisted
                    self.metrics.failures.labels("chain").inc()
                    wait = max(self.config.round_interval, 1.0)
                    log.warning("round %d not run: %s; retrying in %.0fs",
                                self.state.round_index, exc, wait)
                    self._stop.wait(min(wait, threading.TIMEOUT_MAX))
                    continue
                log.info(self.format_report(report))
                self.reports = (self.reports + [report])[-10:]
                done += 1
                if self.exit_code or (self.config.rounds is not None
                                      and done >= self.config.rounds):
                    break
                wait = max(self.config.round_interval, self.paced_interval) - \
                    (time.monotonic() - started)
                if wait > 0:
                    self._stop.wait(min(wait, threading.TIMEOUT_MAX))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("validator stopped after %d round(s); state in %s (exit code %d)", done,
                 self.state.path, self.exit_code)
        return self.exit_code

    def _check_registered(self) -> None:
        """Registered (else NotRegisteredError), with a validator permit or, with
        wait_for_permit, waiting for one (a log line per poll; a stop signal ends the wait)."""
        while True:
            metagraph = self.chain.metagraph(self.config.netuid)
            neuron = metagraph.require(self.hotkey, "validator")
            self.registration.check(metagraph, log)
            problem = permit_problem(neuron, self.config.netuid)
            if problem is None:
                return
            if not self.config.wait_for_permit:
                require_permit(neuron, self.config.netuid)
            log.warning("waiting for a validator permit (uid %d, stake %g on subnet %d); "
                        "checking again in %.0fs", neuron.uid, neuron.stake,
                        self.config.netuid, self.config.permit_poll)
            if self._stop.wait(self.config.permit_poll):
                return

    def _watch_registration(self, metagraph: Metagraph) -> None:
        """Deregistered: the round still runs and persists (its scores stay in the state
        file) but, unless configured to keep running, it is the last one."""
        if self.registration.deregistered or self.registration.check(metagraph, log) is None:
            return
        if self.config.keep_running_when_deregistered:
            log.error("still running rounds (--keep-running-when-deregistered); weights "
                      "will be refused until the hotkey is registered again")
            return
        log.error("stopping after this round: exit code %d (pm2 does not restart it; "
                  "register the hotkey again, then `pm2 restart`)", DEREGISTERED_EXIT_CODE)
        self.exit_code = DEREGISTERED_EXIT_CODE

    def _permit_lost(self, metagraph: Metagraph) -> bool:
        """True while this validator holds no permit. Miners refuse such a validator (403), so
        a round would score every one of them as refusing and drag honest scores down; the
        round is skipped instead, with scores, state and round index untouched, until the
        permit is back (one WARNING when it goes, one INFO when it returns)."""
        neuron = metagraph.by_hotkey(self.hotkey)
        problem = permit_problem(neuron, self.config.netuid) if neuron is not None else None
        if problem is not None and self.permit_missing is None:
            log.warning("validator permit lost at block %d: rounds are skipped until it is "
                        "back (scores kept); %s", metagraph.block, problem)
            self.metrics.failures.labels("no_permit").inc()
        elif problem is None and self.permit_missing is not None:
            log.info("validator permit is back at block %d: rounds resume", metagraph.block)
        self.permit_missing = problem
        return problem is not None

    def _own_fault(self, candidates: list[Neuron],
                   answered: dict[int, tuple[Challenge, QueryResult]],
                   outcomes: dict[int, Outcome], round_index: int) -> bool:
        """True when every miner asked this round failed in a way that says this machine is
        cut off (own_faults.round_fault): the round is not scored, every score stays, and
        its index moves on (the next round's challenges are new). One WARNING when such
        rounds start, one INFO when they end."""
        asked = []
        for neuron in candidates:
            if neuron.uid in answered:
                result = answered[neuron.uid][1]
                asked.append((result.status.value,
                              result.error.reason if result.error is not None else ""))
            elif neuron.uid in outcomes:  # its /v1/info failed, or it serves nothing we ask
                asked.append((outcomes[neuron.uid].status, ""))
        fault = round_fault(asked)
        if fault is not None and self.own_fault is None:
            log.warning("round %d not scored, nor the next ones like it: %s", round_index,
                        fault)
            self.metrics.failures.labels("own_fault").inc()
        elif fault is None and self.own_fault is not None:
            log.info("round %d: miners answer again; rounds are scored", round_index)
        self.own_fault = fault
        return fault is not None

    # ------------------------------------------------------------------ one round
    async def run_round(self) -> RoundReport:
        started = time.monotonic()
        round_index = self.state.round_index
        metagraph = self.chain.metagraph(self.config.netuid)
        self._watch_registration(metagraph)
        if self._permit_lost(metagraph):
            return RoundReport(round_index, metagraph.block, [], {},
                               weights_message=f"round skipped: {self.permit_missing}",
                               seconds=time.monotonic() - started, scores=self.book.scores())
        rng = round_rng(self.seed, round_index)
        reset = self.book.sync_hotkeys({n.uid: n.hotkey for n in metagraph.neurons})
        if reset:
            log.info("round %d: new hotkeys on uids %s start from zero", round_index, reset)
        outcomes: dict[int, Outcome] = {}
        candidates = self._sample(metagraph, rng, round_index, outcomes)
        declared: dict[int, int] = {}
        targets = await self._targets(candidates, outcomes, declared,
                                      model_rng(self.seed, round_index))
        targets = self._pace(metagraph, targets, declared, outcomes)
        extra = [t for t in targets for _ in range(declared.get(t.uid, 1) - 1)]
        challenges, probes = primaries(self.factory.make_round(rng, targets + extra))
        for target in targets:
            if target.uid not in {c.uid for c in challenges}:
                outcomes[target.uid] = Outcome(target.uid, target.hotkey, target.model,
                                               status=scoring.NO_MODEL,
                                               reason="no pipeline this validator can ask")
        answered, probed = await self._query(challenges, probes, candidates)
        if self._own_fault(candidates, answered, outcomes, round_index):
            # no scores; the index moves on, so the next round's challenges are new
            self.state.save_round(round_index, self.book, [], {},
                                  keep_answer_rounds=self.config.answer_memory_rounds)
            return RoundReport(round_index, metagraph.block, [], {},
                               weights_message=f"round not scored: {self.own_fault}",
                               seconds=time.monotonic() - started, scores=self.book.scores())
        self._must_audit = set()
        fresh = self._cheap_checks(challenges, answered, outcomes, round_index)
        valid_probes = self._probe_checks(probed, round_index, fresh)
        await self._audit(challenges, answered, outcomes, candidates, valid_probes)
        self._count_volume(challenges, answered, outcomes, probed, valid_probes)
        self._organic_passed, self._organic_verdicts = {}, []
        await self._audit_organic(metagraph, outcomes)  # a failed organic audit has the last word
        for uid, passed in self._organic_passed.items():  # serving users counts as volume
            if uid in outcomes and outcomes[uid].audit_passed is not False:
                outcomes[uid] = replace(outcomes[uid], organic=passed)
        final = list(outcomes.values())
        own = [o.uid for o in final if o.status == VALIDATOR_ERROR]
        if own:
            log.warning("round %d: uids %s not scored: this validator failed to ask them "
                        "(see the warnings above)", round_index, own)
            final = [o for o in final if o.status != VALIDATOR_ERROR]
        if self._stop.is_set():  # stopped mid-round: miners stopping beside us lose nothing
            spared = [o for o in final if o.status in STOP_FAULTS]
            if spared:
                log.info("stop requested mid-round: uids %s (%s) are not scored this round",
                         [o.uid for o in spared], ", ".join(sorted({o.status for o in spared})))
                final = [o for o in final if o.status not in STOP_FAULTS]
        rewards = scoring.round_rewards(final, self.config.scoring)
        self.book.apply(round_index, final, rewards)
        self.answers.prune(round_index - self.config.answer_memory_rounds)
        self.state.save_round(round_index, self.book, final, rewards, fresh,
                              keep_answer_rounds=self.config.answer_memory_rounds,
                              scored_on=self._scored_on)
        await self._record_organic()  # after the round is saved: see _record_organic
        report = RoundReport(round_index, metagraph.block, final, rewards,
                             seconds=time.monotonic() - started, scores=self.book.scores())
        self._maybe_set_weights(report, metagraph)
        report.seconds = time.monotonic() - started
        self.metrics.round_done(round_index, final, report.seconds)
        return report

    def _sample(self, metagraph: Metagraph, rng: np.random.Generator, round_index: int,
                outcomes: dict[int, Outcome]) -> list[Neuron]:
        pool = []
        for n in metagraph.neurons:
            if n.hotkey == self.hotkey or n.endpoint is None:
                continue
            if self.book.is_excluded(n.hotkey, round_index):
                outcomes[n.uid] = Outcome(n.uid, n.hotkey, self.book.uids.get(
                    n.uid, scoring.UidScore(n.hotkey)).model, status=scoring.EXCLUDED,
                    reason=f"failed an audit; excluded until round "
                           f"{self.book.excluded_until[n.hotkey]}")
                continue
            pool.append(n)
        if len(pool) > self.config.sample_size:
            picked = rng.choice(len(pool), size=self.config.sample_size, replace=False)
            pool = [pool[int(i)] for i in sorted(picked)]
        return pool

    async def _targets(self, neurons: list[Neuron], outcomes: dict[int, Outcome],
                       declared: dict[int, int] | None = None,
                       rng: np.random.Generator | None = None) -> list[Target]:
        """Ask each miner what it serves; a miner serving none of our models scores 0. A
        miner serving several is challenged on one of them per round, drawn with `rng` in
        proportion to the model shares, so every model it serves is scored over the rounds.
        `declared` gets each miner's concurrency, capped at the scoring's volume_cap."""
        infos = await self.client.info_many(neurons, timeout=self.config.info_timeout)
        targets = []
        for neuron, info in zip(neurons, infos, strict=False):
            served = info.info
            if not info.ok or served is None:
                outcomes[neuron.uid] = Outcome(neuron.uid, neuron.hotkey, None,
                                               status=info.status.value,
                                               reason=info.reason or "no info")
                continue
            self.runtime.observe(neuron.uid, neuron.hotkey, served.runtime)
            offered = {m.model: tuple(m.pipelines) for m in served.models}
            shares = self.config.scoring.model_shares
            model = pick_model(rng or model_rng(self.seed, -1), offered, self.config.models,
                               shares)
            self._log_scored_on(neuron.uid, offered, shares)
            if model is None:
                outcomes[neuron.uid] = Outcome(
                    neuron.uid, neuron.hotkey, None, status=scoring.NO_MODEL,
                    reason=f"serves {sorted(offered)}, none of {list(self.config.models)}")
                continue
            targets.append(Target(neuron.uid, neuron.hotkey, model,
                                  offered[model] or (PipelineKind.TXT2IMG,)))
            if declared is not None:
                declared[neuron.uid] = max(1, min(int(served.concurrency),
                                                  self.config.scoring.volume_cap))
            self._advertised[neuron.uid] = served
        return targets

    async def _endpoint_of(self, hotkey: str) -> str | None:
        """`hotkey`'s endpoint URL on chain now (the metagraph read at most every 5 s, one
        read at a time: the fetches of several miners failing at once share it): a miner
        that restarted on another port mid-audit is fetched there."""
        read_at, urls = self._endpoints
        if time.monotonic() - read_at > ENDPOINTS_FRESH:
            loop = asyncio.get_running_loop()
            reading = self._endpoints_reading
            if reading is None or reading.get_loop() is not loop or reading.done():
                reading = self._endpoints_reading = loop.create_task(self._read_endpoints())
            urls = await asyncio.shield(reading)
        return urls.get(hotkey)

    async def _read_endpoints(self) -> dict[str, str]:
        metagraph = await asyncio.to_thread(self.chain.metagraph, self.config.netuid)
        urls = {n.hotkey: n.endpoint.url for n in metagraph.neurons if n.endpoint}
        self._endpoints = (time.monotonic(), urls)
        return urls

    def _pace(self, metagraph: Metagraph, targets: list[Target], declared: dict[int, int],
              outcomes: dict[int, Outcome]) -> list[Target]:
        """Keep this round within each miner's advertised rate for this hotkey
        (niche/validator/pacing.py): the rounds are spaced to what the median miner allows
        for its challenge and volume probes (one log line when that is longer than
        --neuron.round_interval), and a miner whose own budget is spent gets fewer probes or
        sits the round out (a zero reward: a rate that is never spent must not freeze a
        score; one log line the first time)."""
        share = metagraph.stake_share(self.hotkey, missing=1.0)
        rates = {t.uid: caller_rate(self._advertised[t.uid], share) for t in targets
                 if t.uid in self._advertised}
        needs = sorted(paced_interval(declared.get(uid, 1), rate)
                       for uid, rate in rates.items())
        paced = needs[(len(needs) - 1) // 2] if needs else 0.0  # the (lower) median
        if paced > self.config.round_interval and round(paced) != round(self.paced_interval):
            log.info("rounds at least %.1fs apart (not %gs): the median miner's advertised "
                     "rate (its /v1/info) allows no more for a challenge and its volume "
                     "probes", paced, self.config.round_interval)
        effective = max(self.config.round_interval, paced)
        if abs(effective - max(self.config.round_interval, self.paced_interval)) > 0.5:
            # the gateway leaves the challenges the share this pace takes (until it has
            # measured two rounds, this is all it knows)
            self.state.record_round_interval(effective)
        self.paced_interval = paced
        kept, waiting = [], []
        for target in targets:
            allowed = self._budgets.allowance(target.hotkey, rates.get(target.uid))
            if allowed is not None and allowed < 1:
                waiting.append(target.uid)
                outcomes[target.uid] = Outcome(
                    target.uid, target.hotkey, target.model, status=scoring.OWN_RATE,
                    reason=f"its advertised rate ({rates[target.uid]:g} a minute for this "
                           "validator) allows no request this round")
                continue
            if allowed is not None:
                declared[target.uid] = min(declared.get(target.uid, 1), allowed)
                self._budgets.spend(target.hotkey, declared[target.uid])
            kept.append(target)
        first = [uid for uid in waiting if uid not in self._paced_uids]
        if first:
            log.info("uids %s sit out rounds until their advertised rate allows a request "
                     "(asked as often as it allows; a zero reward meanwhile)", first)
        self._paced_uids |= set(waiting)
        self._budgets.forget({n.hotkey for n in metagraph.neurons})
        return kept

    def _log_scored_on(self, uid: int, offered: dict, shares) -> None:
        """One INFO line per miner when the models it is scored on change."""
        both = tuple(m for m in self.config.models if m in offered)
        if self._scored_on.get(uid) == both:
            return
        self._scored_on[uid] = both
        if both:
            log.info("uid %d serves %s; scored on %s", uid, ", ".join(sorted(offered)),
                     ", ".join(f"{m} (share {shares.get(m, 0.0):g})" for m in both))

    async def _query(self, challenges: list[Challenge], probes: list[Challenge],
                     neurons: list[Neuron]
                     ) -> tuple[dict[int, tuple[Challenge, QueryResult]],
                                list[tuple[Challenge, QueryResult]]]:
        """Every challenge at once (a miner's volume probes beside its scored one), in a
        secret random order: a miner must not tell its scored challenge from its probes by
        which arrives first (a probe's dodged audit costs as much, but a probe answered with
        garbage would still pay when unaudited)."""
        by_uid = {n.uid: n for n in neurons}
        sent = challenges + probes
        order = self._secret_order(len(sent))
        started = time.monotonic()
        shuffled = await self.client.query_many(
            [(by_uid[sent[i].uid], sent[i].request()) for i in order])
        results = _unshuffled(order, shuffled)
        await self._retry_rate_limited(challenges, results, by_uid, started)
        answered = {c.uid: (c, r) for c, r in zip(challenges, results, strict=False)}
        return answered, list(zip(probes, results[len(challenges):], strict=True))

    async def _retry_rate_limited(self, challenges: list[Challenge],
                                  results: list[QueryResult], by_uid: dict[int, Neuron],
                                  started: float) -> None:
        """Ask once more, RATE_RETRY_WAIT later, a scored challenge a miner refused as over
        its rate: this validator kept within each miner's rate (`_pace`), so the refusal
        spent tokens its gateway took from the same hotkey's bucket, not the miner's fault.
        Volume probes are not asked again (a refused probe verifies nothing), and the retry
        is spent from the miner's budget like any request, so retries cannot keep its
        bucket empty round after round. The answer's latency counts from the first send: a
        refusal never buys a head start."""
        again = [i for i, r in enumerate(results[:len(challenges)])
                 if r.http_status == 429 and r.error is not None
                 and r.error.reason == "rate_limited"]
        if not again:
            return
        for i in again:
            self._budgets.drained(challenges[i].hotkey)
            self._budgets.spend(challenges[i].hotkey, 1)
        await asyncio.sleep(RATE_RETRY_WAIT)
        resent = time.monotonic()
        retried = await self.client.query_many(
            [(by_uid[challenges[i].uid], challenges[i].request()) for i in again])
        for i, result in zip(again, retried, strict=True):
            if result.latency is not None:
                result.latency += resent - started
            results[i] = result
        log.info("uids %s refused a request as over their rate (this hotkey's gateway shares "
                 "it): asked once more, latency counted from the first send",
                 sorted({challenges[i].uid for i in again}))

    def _probe_checks(self, probed: list[tuple[Challenge, QueryResult]], round_index: int,
                      fresh: list[Answer]) -> list[tuple[Challenge, QueryResult]]:
        """The volume probes' answers that count: the cheap checks of a scored answer
        (status, deadline, size, states, not seen before)."""
        valid = []
        seen = {a.sha256 for a in fresh}
        for c, result in probed:
            image = result.image
            if (result.status.value != OK or image is None or result.latency is None
                    or result.latency > c.timeout or shape_problem(image, *c.params.size)
                    or result.response is None or result.response.states is None
                    or self._unreproducible(c, result)):
                continue
            fp = fingerprint(image)
            if self.answers.exact(fp) is not None or fp.sha256 in seen:
                continue
            if self.answers.match(fp) is not None:  # perceptually: audited for sure
                self._must_audit.add(c.request_id)
            seen.add(fp.sha256)
            answer = Answer(fp.sha256, fp.phash, c.uid, round_index)
            self.answers.add(answer)
            fresh.append(answer)
            valid.append((c, result))
        return valid

    def _count_volume(self, challenges: list[Challenge],
                      answered: dict[int, tuple[Challenge, QueryResult]],
                      outcomes: dict[int, Outcome], probed: list[tuple[Challenge, QueryResult]],
                      valid_probes: list[tuple[Challenge, QueryResult]]) -> None:
        """Record each probed miner's probes, verified answers and span on its outcome."""
        sent: dict[int, int] = {}
        for c, _ in probed:
            sent[c.uid] = sent.get(c.uid, 0) + 1
        for c in challenges:
            if c.uid not in sent:
                continue
            o = outcomes[c.uid]
            latencies = [float(r.latency) for p, r in valid_probes  # type: ignore[arg-type]
                         if p.uid == c.uid]
            if o.valid:
                latencies.append(float(o.latency))  # type: ignore[arg-type]  # valid: set
            outcomes[c.uid] = replace(o, probes=1 + sent[c.uid], verified=len(latencies),
                                      span=max(latencies) if latencies else None)

    def _cheap_checks(self, challenges: list[Challenge],
                      answered: dict[int, tuple[Challenge, QueryResult]],
                      outcomes: dict[int, Outcome], round_index: int) -> list[Answer]:
        """Every answer: status from the client, then size/mode, then duplicates."""
        fresh: list[Answer] = []
        seen_this_round: dict[str, int] = {}
        for c in challenges:
            _, result = answered[c.uid]
            status, latency, reason, image = (result.status.value, result.latency,
                                              result.reason, result.image)
            base = Outcome(uid=c.uid, hotkey=c.hotkey, model=c.params.model,
                           workload=c.workload, latency=latency, timeout=c.timeout)
            if status != OK or image is None:
                outcomes[c.uid] = replace(base, status=status if status != OK else "bad_image",
                                          reason=reason or "no image")
                continue
            if latency is not None and latency > c.timeout:
                outcomes[c.uid] = replace(base, status="timeout", reason=(
                    f"answered in {latency:.1f}s, after the {c.timeout:.0f}s deadline"))
                continue
            problem = shape_problem(image, *c.params.size)
            if problem:
                outcomes[c.uid] = replace(base, status=problem.split(":")[0], reason=problem)
                continue
            if result.response is None or result.response.states is None:
                outcomes[c.uid] = replace(base, status=scoring.NO_STATES, reason=(
                    "the answer commits to no sampler states, so it cannot be audited"))
                continue
            problem = self._unreproducible(c, result)
            if problem:  # every such answer, audited or not: else it pays when not drawn
                outcomes[c.uid] = scoring.unverifiable(base, problem)
                continue
            fp = fingerprint(image)
            earlier = self.answers.exact(fp)
            twin = seen_this_round.get(fp.sha256)
            if earlier is not None or twin is not None:
                what = (f"same image as uid {earlier.uid} in round {earlier.round}"
                        if earlier is not None else f"same image as uid {twin} this round")
                outcomes[c.uid] = replace(base, status=DUPLICATE, reason=what)
            else:
                outcomes[c.uid] = base
                similar = self.answers.match(fp)
                if similar is not None:  # perceptually: audited for sure, never zeroed
                    self._must_audit.add(c.request_id)
                    log.info("uid %d's answer looks like uid %d's of round %d: audited",
                             c.uid, similar.uid, similar.round)
            seen_this_round[fp.sha256] = c.uid
            answer = Answer(fp.sha256, fp.phash, c.uid, round_index)
            self.answers.add(answer)
            fresh.append(answer)
        return fresh

    def _unreproducible(self, challenge: Challenge, result: QueryResult) -> str | None:
        """Why this validator could never audit the answer (its declared dtype or kernels;
        known without a GPU and before any draw), or None."""
        states = result.response.states if result.response is not None else None
        if states is None:
            return None
        return self.auditor.steps.unreproducible(challenge.params.model, states.compute_dtype,
                                                 states.kernels)

    async def _audit(self, challenges: list[Challenge],
                     answered: dict[int, tuple[Challenge, QueryResult]],
                     outcomes: dict[int, Outcome], neurons: list[Neuron],
                     valid_probes: list[tuple[Challenge, QueryResult]]) -> None:
        """Audit a random share of the valid answers, chosen now that all are in; a volume
        probe's answer is audited at the same rate, and failing it fails the miner (it is
        dropped from `valid_probes` either way when it fails)."""
        valid = [c.uid for c in challenges if outcomes[c.uid].status == OK]
        picked = scoring.choose_audits(self._audit_rng, valid, self.config.audit_fraction)
        picked += [c.uid for c in challenges if c.uid in valid and c.uid not in picked
                   and c.request_id in self._must_audit]
        probes = list(valid_probes)
        live = [i for i, (c, _) in enumerate(probes) if outcomes[c.uid].status == OK]
        picked_probes = scoring.choose_audits(self._audit_rng, live,
                                              self.config.audit_fraction)
        picked_probes += [i for i in live if i not in picked_probes
                          and probes[i][0].request_id in self._must_audit]
        if not picked and not picked_probes:
            return
        by_uid = {n.uid: as_target(n) for n in neurons}
        items = [(*answered[uid], by_uid[uid]) for uid in picked]
        items += [(*probes[i], by_uid[probes[i][0].uid]) for i in picked_probes]
        order = self._secret_order(len(items))  # a miner's fetches come one after another:
        try:  # the first must not say which answer is the scored one
            results = self._forgiven(_unshuffled(order, await self.auditor.audit(
                [items[i] for i in order], self._audit_rng)), [t.hotkey for _, _, t in items],
                neurons)
        except Exception as exc:  # OUR failure (e.g. out of memory): no miner pays for it
            self.metrics.failures.labels("audit").inc()
            log.error("audit failed on the validator's side, answers left unaudited this "
                      "round: %s: %s", type(exc).__name__, exc)
            results = [unaudited(f"validator error: {type(exc).__name__}")] * len(items)
        for uid, result in zip(picked, results, strict=False):
            outcomes[uid] = applied(outcomes[uid], result)
            if not result.passed:
                log.info("uid %d audit %s: %s", uid, result.verdict, result.reason)
        failed = []
        for i, result in zip(picked_probes, results[len(picked):], strict=True):
            if result.passed:
                continue
            failed.append(i)  # an unverified probe never counts toward volume
            uid = probes[i][0].uid
            if result.unavailable:  # a dodged probe costs what a dodged challenge does, or
                if outcomes[uid].audit_passed is not False:  # garbage probes would pay
                    outcomes[uid] = scoring.unavailable(outcomes[uid],
                                                        f"volume probe: {result.reason}")
                continue
            if result.unaudited or result.unverifiable:
                continue  # no verdict on the probe: it only goes uncounted
            outcomes[uid] = replace(outcomes[uid], audited=True, audit_passed=False,
                                    reason=f"{scoring.AUDIT_FAILED}: volume probe: "
                                           f"{result.reason}")
        for i in sorted(failed, reverse=True):
            del valid_probes[i]

    async def _audit_organic(self, metagraph: Metagraph, outcomes: dict[int, Outcome]) -> None:
        """Audit the gateway's queued organic answers like challenges; a failure zeroes and
        excludes the miner this round, whatever its challenge answer was."""
        if self.organic is None:
            return
        try:
            items = await asyncio.to_thread(self.organic.claim, self.config.organic_per_round,
                                            self.config.organic_max_age)
        except QueueError as exc:  # the gateway's side file: the round goes on without it
            self.metrics.failures.labels("organic_queue").inc()
            log.warning("organic audits skipped this round: %s", exc)
            return
        current = {n.hotkey: n for n in metagraph.neurons}
        auditable = []
        for item in items:
            neuron = current.get(item.target.hotkey)
            if neuron is None or neuron.uid != item.target.uid:
                self._organic_verdict(item.id, None, "miner no longer registered")
            elif item.challenge.params.model not in self.plans:
                self._organic_verdict(item.id, None, f"model {item.challenge.params.model} "
                                                   "is not served by this validator")
            else:
                auditable.append(replace(item, target=as_target(neuron)))
        if not auditable:
            return
        try:
            results = self._forgiven(await self.auditor.audit(
                [(i.challenge, i.result, i.target) for i in auditable], self._audit_rng),
                [i.target.hotkey for i in auditable], metagraph.neurons)
        except Exception as exc:  # OUR failure: no miner pays for it, the rows say why
            log.error("organic audit failed on the validator's side: %s: %s",
                      type(exc).__name__, exc)
            for item in auditable:
                self._organic_verdict(item.id, None, f"validator error: {type(exc).__name__}")
            return
        for item, result in zip(auditable, results, strict=True):
            if result.unaudited or result.unavailable or result.unverifiable:  # no fraud
                log.info("organic request %s left %s: %s", item.challenge.request_id,
                         result.verdict, result.reason)
                self._organic_verdict(item.id, None, f"{result.verdict}: {result.reason}")
                if result.unavailable or result.unverifiable:  # else serving users cheaply,
                    self._organic_unpaid(item, result, outcomes)  # then dodging, would pay
                continue
            self._organic_verdict(item.id, result.passed, result.reason,
                                  round(result.similarity, 4))
            if result.passed:  # one passed audit stands for 1/draw answers served
                self._organic_passed[item.target.uid] = \
                    self._organic_passed.get(item.target.uid, 0.0) + 1.0 / item.draw
                continue
            uid, hotkey = item.target.uid, item.target.hotkey
            base = outcomes.get(uid) or Outcome(uid, hotkey, item.challenge.params.model,
                                                status=scoring.AUDIT_FAILED)
            outcomes[uid] = replace(base, audited=True, audit_passed=False, similarity=0.0,
                                    reason=f"organic {scoring.AUDIT_FAILED}: {result.reason}")
            log.warning("uid %d failed the audit of organic request %s: %s", uid,
                        item.challenge.request_id, result.reason)

    def _organic_verdict(self, item_id: int, passed: bool | None, reason: str,
                         similarity: float | None = None) -> None:
        """A verdict for the queue, written once the round is saved (`_record_organic`)."""
        self._organic_verdicts.append((item_id, passed, reason, similarity))

    async def _record_organic(self) -> None:
        """Write this round's organic verdicts to the queue, after the round (its penalties,
        exclusions and credits) is saved: a validator killed between the two leaves the rows
        claimed, let go unaudited later, never marked failed with the penalty lost. A queue
        that fails now costs nothing but the rows' verdicts (the round is saved)."""
        verdicts, self._organic_verdicts = self._organic_verdicts, []
        if self.organic is None or not verdicts:
            return
        try:
            await asyncio.to_thread(self.organic.record_many, verdicts)
        except QueueError as exc:
            self.metrics.failures.labels("organic_queue").inc()
            log.warning("%d organic verdict(s) not written to the queue (the round's scores "
                        "are saved; the rows are let go unaudited later): %s", len(verdicts),
                        exc)

    def _secret_order(self, n: int) -> list[int]:
        """A permutation of range(n) from the audit's secret randomness."""
        return [int(i) for i in self._audit_rng.permutation(n)]

    def _forgiven(self, results: list[AuditResult], hotkeys: list[str],
                  neurons: Sequence[Neuron]) -> list[AuditResult]:
        """`audit.forgive_outage` (operators counted on the round's metagraph, `neurons`),
        then `audit.forgive_refusals` with this validator's standing on the chain now (read
        only when a miner refused it): this machine's network down during the audit, a
        permit lost since the round began, or several miners refusing at once, is the
        validator's fault, not the miners'."""
        before = results
        results = forgive_outage(results, hotkeys, **_operators(neurons))
        if results is not before:
            self.metrics.failures.labels("own_fault").inc()
        if not any(r.refused for r in results):
            return results
        try:
            metagraph = self.chain.metagraph(self.config.netuid)
        except ChainError as exc:
            log.warning("chain unreadable while miners refused this validator (%s): the "
                        "refusals are judged by their number alone", exc)
            return forgive_refusals(results, hotkeys, None)
        neuron = metagraph.by_hotkey(self.hotkey)
        problem = ("this validator's hotkey is not registered" if neuron is None
                   else permit_problem(neuron, self.config.netuid))
        return forgive_refusals(results, hotkeys, problem, **_operators(metagraph.neurons))

    def _organic_unpaid(self, item: OrganicItem, result: AuditResult,
                        outcomes: dict[int, Outcome]) -> None:
        """An organic answer whose states could not be fetched, or whose declared dtype or
        kernels this validator cannot recompute, costs the miner what an unavailable
        challenge does times audit_fraction / the gateway's draw (no exclusion; scaled so
        that a dodge never pays, however rarely organic answers are drawn), unless it
        already failed this round."""
        uid, hotkey = item.target.uid, item.target.hotkey
        base = outcomes.get(uid) or Outcome(uid, hotkey, item.challenge.params.model)
        if base.audit_passed is False:
            return
        weight = max(self.config.audit_fraction, MIN_DRAW) / item.draw
        outcomes[uid] = scoring.unavailable(base, f"organic {item.challenge.request_id} "
                                                  f"{result.verdict}: {result.reason}",
                                            answers=weight)

    def _maybe_set_weights(self, report: RoundReport, metagraph: Metagraph | None = None
                           ) -> None:
        netuid = self.config.netuid
        try:  # the round is already persisted: a chain outage here only delays the weights
            block = self.chain.current_block()
            rate_limit = self.chain.weights_rate_limit(netuid)
        except ChainError as exc:
            report.weights_message = f"weights not set, chain unreachable: {exc}"
            self.metrics.failures.labels("chain").inc()
            log.warning("round %d: %s", report.round, report.weights_message)
            return
        if not scoring.weights_due(block, self.last_weights_block, self.config.epoch_length,
                                   rate_limit):
            last = self.last_weights_block if self.last_weights_block is not None else block
            wait = max(self.config.epoch_length, rate_limit) - (block - last)
            report.weights_message = f"next weights in {wait} blocks"
            return
        weights = scoring.compute_weights(self.book.scores(), self.book.models(),
                                          self.config.scoring.model_shares, self._scored_on)
        fallback = ""
        if not weights:
            if self.registration.uid is None or self.registration.deregistered:
                report.weights_message = "no miner has earned weight yet (and no uid of ours)"
                return
            # Still a valid vector, so the validator keeps its activity: all to itself.
            weights = {self.registration.uid: 1.0}
            fallback = (f"no miner has earned weight yet: all weight to this validator's "
                        f"own uid {self.registration.uid}; ")
        try:
            result = self.chain.set_weights(netuid, self.wallet, list(weights),
                                            list(weights.values()), self.config.version_key)
        except ChainError as exc:
            report.weights_message = f"set_weights failed: {exc}"
            self.metrics.failures.labels("set_weights").inc()
            log.warning("round %d: %s", report.round, report.weights_message)
            return
        self.state.record_weights(report.round, result.block, weights, result.success,
                                  result.message)
        self.metrics.weights(result.success, result.block)
        report.weights = weights if result.success else None
        report.weights_message = fallback + result.message
        if result.success:
            self.last_weights_block = result.block
        elif metagraph is not None:
            self._adopt_chain_weights_block(metagraph)

    def _adopt_chain_weights_block(self, metagraph: Metagraph) -> None:
        """After a refused set_weights: the chain's own record of this hotkey's last update
        (its rate limit counts from it) when it is newer than the state file's. Weights that
        landed just before a kill -9, never recorded, made every later round try again and
        be refused for the whole rate-limit window."""
        neuron = metagraph.by_hotkey(self.hotkey)
        if neuron is None or neuron.last_update <= (self.last_weights_block or -1):
            return
        log.info("the chain has this validator's last update at block %d (after the state "
                 "file's record): next weights counted from there", neuron.last_update)
        self.last_weights_block = neuron.last_update

    # ------------------------------------------------------------------ logging
    def format_report(self, report: RoundReport) -> str:
        scores = report.scores
        audited = [o for o in report.outcomes if o.audited]
        lines = [
            f"round {report.round} block {report.block}: {len(report.outcomes)} miners, "
            f"{sum(o.valid for o in report.outcomes)} valid, {len(audited)} audited "
            f"({sum(bool(o.audit_passed) for o in audited)} passed), "
            f"{report.seconds:.1f}s; weights: {report.weights_message or '-'}",
            f"  {'uid':>4} {'model':<13} {'pipeline':<17} {'status':<17} {'latency':>8} "
            f"{'audit':<5} {'sim':>6} {'reward':>7} {'score':>6}  reason",
        ]
        for o in sorted(report.outcomes, key=lambda o: o.uid):
            audit = "-" if not o.audited else ("pass" if o.audit_passed else (
                "FAIL" if o.audit_passed is False else "n/a"))
            lines.append(
                f"  {o.uid:>4} {(o.model or '-'):<13} "
                f"{(o.workload[0] if o.workload else '-'):<17} {o.status[:17]:<17} "
                f"{'-' if o.latency is None else f'{o.latency:.2f}s':>8} {audit:<5} "
                f"{'-' if o.similarity is None else f'{o.similarity:.3f}':>6} "
                f"{report.rewards.get(o.uid, 0.0):>7.3f} {scores.get(o.uid, 0.0):>6.3f}  "
                f"{o.reason[:80]}")
        return "\n".join(lines)


T = TypeVar("T")


def _unshuffled(order: Sequence[int], shuffled: Sequence[T]) -> list[T]:
    """Results of `[items[i] for i in order]` back in the items' order."""
    out: list[T | None] = [None] * len(order)
    for position, index in enumerate(order):
        out[index] = shuffled[position]
    return cast("list[T]", out)


def applied(outcome: Outcome, result: AuditResult) -> Outcome:
    """`outcome` after its audit: passed, a caught cheat (zero, excluded), a fault of
    availability (earns nothing, no exclusion) or no verdict at all (the validator's own
    failure: not paid as verified, no penalty either)."""
    if result.unaudited:
        return replace(outcome, status=scoring.UNAUDITED,
                       reason=f"{scoring.UNAUDITED}: {result.reason}")
    if result.unverifiable:
        return scoring.unverifiable(outcome, result.reason)
    if result.unavailable:
        return scoring.unavailable(outcome, result.reason)
    reason = "" if result.passed else f"{scoring.AUDIT_FAILED}: {result.reason}"
    return replace(outcome, reason=reason, audited=True, audit_passed=result.passed,
                   similarity=round(result.similarity, 4))


def primaries(challenges: Sequence[Challenge]) -> tuple[list[Challenge], list[Challenge]]:
    """(each uid's first challenge: the scored one; the rest: its volume probes)."""
    first: list[Challenge] = []
    rest: list[Challenge] = []
    seen: set[int] = set()
    for c in challenges:
        (rest if c.uid in seen else first).append(c)
        seen.add(c.uid)
    return first, rest


def version_key() -> int:
    """niche's version as the integer the chain compares (0.1.0 -> 100)."""
    from niche import __version__

    parts = [int(p) if p.isdigit() else 0 for p in __version__.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0] * 10000 + parts[1] * 100 + parts[2]
