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

A miner that cannot send what it committed to fails. A low-rate full regeneration
(`regenerate_fraction`) stays as a backstop that does not rely on any of the above.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from niche.validator.challenges import Challenge
from niche.validator.client import MinerClient, MinerTarget, QueryResult
from niche.validator.steps import StepChecker, choose_steps, looser_dtype, states_needed
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
    """Seconds a miner has to send the states an audit asks for."""

    def __post_init__(self) -> None:
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


class Auditor:
    def __init__(self, engine: ImageEngine, verifier: Verifier, steps: StepChecker,
                 client: MinerClient, config: AuditConfig | None = None):
        self.engine = engine
        self.verifier = verifier
        self.steps = steps
        self.client = client
        self.config = config or AuditConfig()

    async def audit(self, items: Sequence[tuple[Challenge, QueryResult, MinerTarget]],
                    rng: np.random.Generator) -> list[AuditResult]:
        """One result per item, in order. States are fetched concurrently; the recomputation
        runs in a worker thread, one answer after another (the engine is one GPU)."""
        draw = random.Random(int(rng.integers(2**63)))  # the audit's secret randomness
        plans = []
        for challenge, _, _ in items:
            n = int(challenge.params.steps or 0)
            k = (self.config.random_steps if self.config.random_steps is not None
                 else random_steps_needed(n))
            plans.append(choose_steps(draw, n, k=k) if n else [])
        fetches = await asyncio.gather(*[
            self.client.fetch_states(target, challenge.request_id, result.response.states,
                                     states_needed(plan, len(result.response.states.sha256)),
                                     timeout=self.config.fetch_timeout)
            for (challenge, result, target), plan in zip(items, plans, strict=True)
            if result.response is not None and result.response.states is not None])
        fetched = iter(fetches)
        results: list[AuditResult] = []
        for (challenge, result, _), plan in zip(items, plans, strict=True):
            answer = result.response
            if answer is None or answer.states is None or result.image is None:
                results.append(AuditResult(False, 0.0, "answer committed to no states"))
                continue
            fetch = next(fetched)
            if not fetch.ok:
                results.append(AuditResult(False, 0.0, f"states: {fetch.reason}"))
                continue
            results.append(await asyncio.to_thread(
                self._check, challenge, result, fetch.states, plan))
        regenerate = [i for i, r in enumerate(results)
                      if r.passed and rng.random() < self.config.regenerate_fraction]
        if regenerate:
            await asyncio.to_thread(self._regenerate, items, results, regenerate)
        return results

    def _check(self, challenge: Challenge, answer: QueryResult,
               states: dict[int, torch.Tensor], plan: list[int]) -> AuditResult:
        assert answer.response is not None and answer.response.states is not None
        dtype = looser_dtype(answer.response.states.compute_dtype,
                             self.engine.compute_dtype(challenge.params.model))
        verdict = self.steps.check(challenge.params, challenge.image, states, plan,
                                   dtype=dtype, answer=answer.image)
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
