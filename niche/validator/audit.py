"""Audits: was an answer computed the way its request says?

An answer commits to its sampler states x_1..x_N. After all answers of a round are in, the
validator picks, per audited answer, step 0 and `random_steps` other steps at random, fetches
the states those steps need (x_k and x_k+1, and x_N), and

1. recomputes each picked step from the miner's own x_k (step 0 from x_0, which the
   validator draws from the seed itself) and compares with the miner's x_k+1
   (`niche.validator.steps`: honest numeric noise is a few percent of a step's update at
   most; a skipped, shortened, unguided or re-seeded computation is far off on some step);
2. decodes x_N and compares the result with the returned image (post-processing of an
   honest image, or an image that is not the decoded latent, fails here).

The steps are recomputed in the dtype and with the kernels the answer declares
(docs/step-check.md). A miner that sends something else than what it committed to fails; one
that cannot be reached for its states after retries is `unavailable` (a fault), one whose
declared dtype or kernels this validator cannot reproduce is `unverifiable`, and an answer the
validator itself failed to audit is `unaudited`: `AuditResult.verdict`. A low-rate full
regeneration (`regenerate_fraction`) stays as a backstop that does not rely on any of the
above.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from niche.models.kernels import DEFAULT_ATTENTION, KernelUnavailable
from niche.models.memory import is_out_of_memory
from niche.validator.challenges import Challenge
from niche.validator.client import MinerClient, MinerTarget, QueryResult
from niche.validator.own_faults import MIN_MINERS
from niche.validator.steps import StepChecker, choose_steps, states_needed
from niche.validator.verify import Verifier

if TYPE_CHECKING:
    from niche.models.engine import ImageEngine

log = logging.getLogger("niche.validator")


MIN_SAVING = 0.05
"""A cheat that saves at least this share of the steps must be caught often enough..."""
MIN_DETECTION = 1 / 3
"""...with at least this probability per audited answer."""


def random_steps_needed(n_steps: int, min_saving: float = MIN_SAVING,
                        min_detection: float = MIN_DETECTION) -> int:
    """The fewest random steps (besides step 0) such that a miner who fakes
    ceil(min_saving x N) of the steps 1..N-1 is caught with probability >= min_detection:
    1 - C(N-1-s, k) / C(N-1, k) (steps drawn without replacement). FLUX-schnell's 4 steps
    need 1; 8 steps need 3; 30 need 6."""
    others = n_steps - 1
    if others <= 0:
        return 0
    faked = min(others, max(1, math.ceil(min_saving * n_steps)))
    for k in range(1, others + 1):
        missed = math.comb(others - faked, k) / math.comb(others, k)
        if 1.0 - missed >= min_detection:
            return k
    return others


@dataclass(frozen=True)
class AuditConfig:
    random_steps: int | None = None
    """Steps recomputed besides step 0, drawn after the answer is in; None: as many as
    `random_steps_needed` says for the request's step count."""
    regenerate_fraction: float = 0.0
    """Share of audited answers also regenerated in full and compared (a backstop)."""
    fetch_timeout: float = 30.0
    """Seconds a miner has to send the states of all its audited answers of one round
    together (fetched one answer after another): a miner that sends them slowly delays
    the round by at most this much, however many of its answers are audited."""
    states_kept: float = 540.0
    """Seconds after the audit starts within which a fetch may still start: miners keep
    states 600 s by default (`--states.ttl`), less the round's answer time. An answer the
    audit reaches later is `unaudited` (the validator was too slow, no miner pays for it)
    instead of a 404 counted against an honest miner as unavailable."""
    states_ttl: float = 600.0
    """Seconds miners keep an answer's states (their --states.ttl default): a fetch starts
    no later than this after the answer arrived (`QueryResult.answered_at`) less
    `fetch_timeout` and a margin, so it ends before the miner drops them (an organic answer
    queued minutes before its audit is reached later, not earlier, than a challenge)."""
    parallel_fetches: int = 8
    """Answers whose states are fetched or held at once: a 28-step FLUX.1-dev audit at
    1024x1024 holds 12-14 MiB of states until its check is done, so 256 answers fetched at
    once would hold 3.5 GiB; the fetches overlap the (one at a time) checks instead."""

    def __post_init__(self) -> None:
        if self.parallel_fetches < 1:
            raise ValueError("parallel_fetches must be >= 1")
        if self.random_steps is not None and self.random_steps < 0:
            raise ValueError("random_steps must be >= 0")
        if not 0.0 <= self.regenerate_fraction <= 1.0:
            raise ValueError("regenerate_fraction must be in [0, 1]")


@dataclass(frozen=True)
class AuditResult:
    passed: bool
    similarity: float
    """1 - (worst step error / its threshold) for a step check (0: failed); the image
    similarity for a regeneration."""
    reason: str = ""
    step_errors: dict[int, float] | None = None
    unavailable: bool = False
    """The states could not be fetched for availability (miner unreachable or restarted
    without them, after retries): a fault, not fraud; the answer earns nothing."""
    unaudited: bool = False
    """The validator itself failed to audit it (its own error): no verdict, so the answer
    is neither paid as verified nor held against the miner."""
    unverifiable: bool = False
    """The answer declares a dtype or kernels this validator cannot reproduce: it earns
    nothing (else declaring the unreproducible would dodge every audit), no exclusion."""
    refused: bool = False
    """With `unavailable`: the miner refused this validator itself (401 / 403 on the
    states fetch). Unavailable, unless the round finds the validator at fault
    (`forgive_refusals`)."""
    cut_off: bool = False
    """With `unavailable`: no HTTP answer to the fetch (timed out, connection failed).
    Unavailable, unless every fetch of the batch was so (`forgive_outage`)."""

    @property
    def verdict(self) -> str:
        """passed | failed | unavailable | unverifiable | unaudited (logs and metrics)."""
        if self.unaudited:
            return "unaudited"
        if self.unverifiable:
            return "unverifiable"
        if self.unavailable:
            return "unavailable"
        return "passed" if self.passed else "failed"


class FetchBudget:
    """One miner's seconds for sending states during one audit, and its turn: its fetches
    run one after another and each gets what the earlier ones left."""

    def __init__(self, seconds: float):
        self.seconds, self.spent = seconds, 0.0
        self.turn = asyncio.Lock()
        self.cut_off = False
        """The miner's last fetch got no HTTP answer (what spent the budget, if it is spent)."""

    def left(self) -> float:
        return self.seconds - self.spent

    def spend(self, seconds: float) -> None:
        self.spent += seconds


TTL_MARGIN = 5.0
"""Seconds kept between the end of a states fetch and the miner's drop of the states (clocks,
the answer's own transfer)."""


def unaudited(reason: str) -> AuditResult:
    """The verdict of an answer the validator itself failed to audit."""
    return AuditResult(False, 0.0, reason, unaudited=True)


REFUSALS_FOR_FAULT = 3
"""Miners (distinct hotkeys) of one audit batch, more than half of its miners, whose refusals
put the fault on the validator: several miners refusing it at once is about the validator
(its permit, stake or clock as the miners see them); one miner refusing it, however many of
its answers are in the batch, is that miner's unavailability."""


def count_operators(hotkeys: set[str], coldkeys: Mapping[str, str] | None,
                    hosts: Mapping[str, str] | None) -> int:
    """How many operators `hotkeys` are at least: the fewest of distinct hotkeys, coldkeys
    and hosts (several hotkeys of one coldkey or one box are one miner)."""
    return min(len(hotkeys), len({(coldkeys or {}).get(h, h) for h in hotkeys}),
               len({(hosts or {}).get(h, h) for h in hotkeys}))


def forgive_refusals(results: list[AuditResult], hotkeys: list[str],
                     own_problem: str | None, *, coldkeys: Mapping[str, str] | None = None,
                     hosts: Mapping[str, str] | None = None) -> list[AuditResult]:
    """`results` (of the answers of miners `hotkeys`, in order) with the refused fetches
    left unaudited (no verdict, no charge) when the fault is this validator's: the chain
    says it cannot validate now (`own_problem`), or most of the batch's miners refused it,
    counted as operators: the fewest of distinct hotkeys, coldkeys and hosts among the
    refusing (several hotkeys of one coldkey or one box are one miner that dodges), over
    every hotkey of the batch; otherwise as they are (unavailable)."""
    if len(hotkeys) != len(results):
        raise ValueError(f"{len(hotkeys)} hotkeys for {len(results)} results")
    refused = [r for r in results if r.refused]
    if not refused:
        return results
    refusing = {h for h, r in zip(hotkeys, results, strict=True) if r.refused}
    operators = count_operators(refusing, coldkeys, hosts)
    miners = set(hotkeys)
    if own_problem is None and not (operators >= REFUSALS_FOR_FAULT
                                    and 2 * operators > len(miners)):
        return results
    why = own_problem or (f"{operators} of {len(miners)} miners refused this "
                          "validator's states fetch")
    log.warning("states fetches refused by %d miner(s) left unaudited, not charged: %s "
                "(check this validator's permit, stake and clock)", len(refused), why[:200])
    return [unaudited(f"{r.reason} (the validator's fault: {why[:120]})") if r.refused else r
            for r in results]


def forgive_outage(results: list[AuditResult], hotkeys: list[str], *,
                   coldkeys: Mapping[str, str] | None = None,
                   hosts: Mapping[str, str] | None = None) -> list[AuditResult]:
    """`results` (of the answers of miners `hotkeys`, in order) with the fetches that got no
    HTTP answer left unaudited (no verdict, no charge) when every fetch of the batch failed
    so and they span at least `own_faults.MIN_MINERS` operators (the fewest of distinct
    hotkeys, coldkeys and hosts): this validator's network was down, as the round's queries
    judge it (`own_faults.round_fault`). One fetch answered, or one HTTP refusal, and the
    network worked: the cut-off ones stay unavailable. A miner cannot make the others'
    fetches fail, so no dodge is forgiven for its doing."""
    if len(hotkeys) != len(results):
        raise ValueError(f"{len(hotkeys)} hotkeys for {len(results)} results")
    fetched = [(h, r) for h, r in zip(hotkeys, results, strict=True)
               if not (r.unaudited or r.unverifiable)]  # those never reached the wire
    if not fetched or not all(r.unavailable and r.cut_off for _, r in fetched):
        return results
    operators = count_operators({h for h, _ in fetched}, coldkeys, hosts)
    if operators < MIN_MINERS:
        return results
    why = (f"all {len(fetched)} states fetches of {operators} miners got no answer: this "
           "validator's network")
    log.warning("%s; left unaudited, not charged (check this machine's connection)", why)
    return [unaudited(f"{r.reason} ({why})") if r.unavailable and r.cut_off else r
            for r in results]


class Auditor:
    def __init__(self, engine: ImageEngine, verifier: Verifier, steps: StepChecker,
                 client: MinerClient, config: AuditConfig | None = None):
        self.engine = engine
        self.verifier = verifier
        self.steps = steps
        self.client = client
        self.config = config or AuditConfig()

    def plan(self, draw: random.Random, n_steps: int) -> list[int]:
        """Steps to recompute for an answer of `n_steps` steps (drawn after it arrived)."""
        if n_steps < 1:
            return []
        k = (self.config.random_steps if self.config.random_steps is not None
             else random_steps_needed(n_steps))
        return choose_steps(draw, n_steps, k=k)

    async def audit(self, items: Sequence[tuple[Challenge, QueryResult, MinerTarget]],
                    rng: np.random.Generator) -> list[AuditResult]:
        """One result per item, in order; one item's failure never touches another's. Each
        answer's states are fetched (in as many requests as the protocol bounds need) and
        checked while it holds one of `parallel_fetches` slots, so fetches overlap the
        checks and the states in memory stay bounded; the recomputation runs in a worker
        thread, one answer after another (the engine is one GPU)."""
        draw = random.Random(int(rng.integers(2**63)))  # the audit's secret randomness
        plans = [self.plan(draw, int(challenge.params.steps or 0)) for challenge, _, _ in items]
        slots = asyncio.Semaphore(self.config.parallel_fetches)
        engine_turn = asyncio.Lock()
        budgets = {target.hotkey: FetchBudget(self.config.fetch_timeout)
                   for _, _, target in items}
        too_late = time.monotonic() + self.config.states_kept

        async def one(challenge: Challenge, result: QueryResult, target: MinerTarget,
                      plan: list[int]) -> AuditResult:
            budget = budgets[target.hotkey]
            async with budget.turn:  # a miner's fetches one after another, on its budget
                await slots.acquire()  # held until the check is done: bounds the memory
                try:
                    fetched = await self._fetch_within(challenge, result, target, plan,
                                                       budget, too_late)
                except BaseException:
                    slots.release()
                    raise
            try:
                if isinstance(fetched, AuditResult):
                    return fetched
                async with engine_turn:
                    return await self._check_safely(challenge, result, fetched, plan)
            finally:
                slots.release()

        results = list(await asyncio.gather(*[
            one(challenge, result, target, plan)
            for (challenge, result, target), plan in zip(items, plans, strict=True)]))
        regenerate = [i for i, r in enumerate(results)
                      if r.passed and rng.random() < self.config.regenerate_fraction]
        if regenerate:
            try:
                await asyncio.to_thread(self._regenerate, items, results, regenerate)
            except Exception as exc:  # the backstop is ours: the step verdicts stand
                log.error("regeneration backstop failed on the validator's side: %s: %s",
                          type(exc).__name__, exc)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        log.info("audited %d answers: %s", len(results),
                 ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
        return results

    async def _fetch_within(self, challenge: Challenge, result: QueryResult,
                            target: MinerTarget, plan: list[int], budget: FetchBudget,
                            too_late: float) -> dict[int, torch.Tensor] | AuditResult:
        """`_fetch` on what is left of the miner's budget for this audit, unless it would
        start after `too_late` (monotonic), when the miner may no longer keep the states."""
        if time.monotonic() > too_late:
            return unaudited(f"the audit reached this answer {self.config.states_kept:.0f}s "
                             "after it began, past the miners' states keep time (audit fewer "
                             "answers per round: --neuron.sample_size, --neuron.audit_fraction)")
        if result.answered_at is not None:
            age = time.time() - result.answered_at
            if age > self.config.states_ttl - self.config.fetch_timeout - TTL_MARGIN:
                return unaudited(f"the audit reached this answer {age:.0f}s after it was "
                                 f"given: too close to the miners' {self.config.states_ttl:.0f}s "
                                 "states keep time to fetch them (audit fewer answers per "
                                 "round, or queue organic answers for less long)")
        left = budget.left()
        if left <= 0:
            return AuditResult(False, 0.0, f"states: not sent: this miner's other audited "
                               f"answers used the round's {budget.seconds:.0f}s for states",
                               unavailable=True, cut_off=budget.cut_off)
        started = time.monotonic()
        try:
            fetched = await self._fetch(challenge, result, target, plan, timeout=left)
        except Exception as exc:  # noqa: BLE001 - ours: no miner pays for it
            return unaudited(f"validator error while fetching: "
                             f"{type(exc).__name__}: {exc}"[:300])
        finally:
            budget.spend(time.monotonic() - started)
        budget.cut_off = isinstance(fetched, AuditResult) and fetched.cut_off
        return fetched

    async def _fetch(self, challenge: Challenge, result: QueryResult, target: MinerTarget,
                     plan: list[int], timeout: float | None = None
                     ) -> dict[int, torch.Tensor] | AuditResult:
        answer = result.response
        if answer is None or answer.states is None or result.image is None:
            return AuditResult(False, 0.0, "answer committed to no states")
        problem = self.steps.unreproducible(challenge.params.model, answer.states.compute_dtype,
                                            answer.states.kernels)
        if problem:  # known before fetching anything
            return AuditResult(False, 0.0, problem, unverifiable=True)
        fetch = await self.client.fetch_states(
            target, challenge.request_id, answer.states,
            states_needed(plan, len(answer.states.sha256)),
            timeout=self.config.fetch_timeout if timeout is None else timeout)
        if fetch.validator_error:
            return unaudited(f"states: {fetch.reason}")
        if fetch.unavailable:
            return AuditResult(False, 0.0, f"states: {fetch.reason}", unavailable=True,
                               refused=fetch.refused, cut_off=fetch.cut_off)
        if not fetch.ok:
            return AuditResult(False, 0.0, f"states: {fetch.reason}")
        return fetch.states

    async def _check_safely(self, challenge: Challenge, result: QueryResult,
                            states: dict[int, torch.Tensor], plan: list[int]) -> AuditResult:
        try:
            return await asyncio.to_thread(self._check, challenge, result, states, plan)
        except Exception as exc:
            declared = result.response.states.kernels if result.response is not None and \
                result.response.states is not None else {}
            attention = declared.get("attention", DEFAULT_ATTENTION)
            if attention != DEFAULT_ATTENTION and not is_out_of_memory(exc) and (
                    isinstance(exc, KernelUnavailable) or await asyncio.to_thread(
                        self._runs_on_default, challenge, result, states, plan)):
                # the backend the miner chose does not run this recomputation here, while
                # the default one does: its choice, not our failure (else declaring one
                # would freeze its score)
                return AuditResult(False, 0.0, f"cannot reproduce the declared attention "
                                   f"backend {attention}: {type(exc).__name__}: "
                                   f"{str(exc)[:160]}", unverifiable=True)
            # OUR failure (out of memory, a bug, the device failing on any backend): no
            # miner pays for it
            log.error("audit of %s failed on the validator's side: %s: %s",
                      challenge.request_id, type(exc).__name__, exc)
            return unaudited(f"validator error: {type(exc).__name__}: {exc}"[:300])

    def _runs_on_default(self, challenge: Challenge, answer: QueryResult,
                         states: dict[int, torch.Tensor], plan: list[int]) -> bool:
        """Whether the same recomputation runs here on the default attention backend (its
        verdict aside): when it does not either, the failure was this validator's."""
        try:
            self._check(challenge, answer, states, plan, kernels={})
        except Exception as exc:  # noqa: BLE001 - the question is whether it raises
            log.warning("the audit of %s fails here on the default attention backend too "
                        "(%s): the validator's failure", challenge.request_id,
                        type(exc).__name__)
            return False
        return True

    def _check(self, challenge: Challenge, answer: QueryResult,
               states: dict[int, torch.Tensor], plan: list[int],
               kernels: Mapping[str, str] | None = None) -> AuditResult:
        """The step check of `answer` on its declared kernels (`kernels`: others instead)."""
        assert answer.response is not None and answer.response.states is not None
        commitment = answer.response.states
        verdict = self.steps.check(challenge.params, challenge.image, states, plan,
                                   dtype=commitment.compute_dtype, answer=answer.image,
                                   kernels=commitment.kernels if kernels is None else kernels)
        if not verdict.passed:
            return AuditResult(False, 0.0, f"step check: {verdict.reason}", verdict.errors)
        worst = max((verdict.errors[k] / verdict.thresholds[k] for k in verdict.errors
                     if verdict.thresholds[k] > 0), default=0.0)
        return AuditResult(True, round(1.0 - min(1.0, worst), 4), "", verdict.errors)

    def _regenerate(self, items: Sequence[tuple[Challenge, QueryResult, MinerTarget]],
                    results: list[AuditResult], indices: list[int]) -> None:
        batch, kept = [], []
        for i in indices:
            challenge, result, _ = items[i]
            if result.image is not None:  # always so: only answers with an image passed
                batch.append((challenge.params, challenge.image, result.image))
                kept.append(i)
        for i, verdict in zip(kept, self.verifier.verify(batch), strict=True):
            if not verdict.passed:
                results[i] = AuditResult(False, verdict.similarity,
                                         f"regeneration: {verdict.reason or verdict.error}",
                                         results[i].step_errors)
