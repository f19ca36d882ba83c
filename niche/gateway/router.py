"""Which miner draws an image, and what happens when it fails.

Each image is one signed `GenerateRequest` (a fresh request id per attempt) to a miner drawn
among those that serve the model, with probability growing with the validator's score
(`floor` keeps new miners in the draw). A miner that times out, errs or returns a bad
answer is skipped for `cooldown` seconds and the image is asked of the next miner, until
the client's deadline; with `hedge_after`, a second miner is asked when the first is slow
and the first good answer wins.

A miner's 400 naming a request field (a prompt over the model's token limit) is unsigned
and unverifiable here, so it is that miner's answer, not the user's error: the image is
asked of the next miner. The user gets a 400 only when the miners agree (every one of at
least two, or the only one serving the model, refused the same field), worded by the
gateway, never with the miner's text; a refusal another miner contradicts by delivering
cools the refuser down like any failure.

Budgets: each miner's `Candidate.rate` (requests per minute left after the validator's
challenges, see directory.py) is a token bucket here and its `concurrency` the most
requests in flight there; the router never sends past either. When no miner serving the
model has budget left, or every one asked refused for load (429/503), the user gets 429
with Retry-After and x-ratelimit-* headers: the subnet is saturated, which is not a
failure (502 is kept for miners that failed)."""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from niche.gateway.directory import Candidate, MinerDirectory
from niche.gateway.errors import RATE_LIMIT, SERVER_ERROR, GatewayError, bad_request
from niche.gateway.metrics import GatewayMetrics
from niche.protocol import GenerateRequest, GenerationParams
from niche.validator.client import MinerClient, QueryResult, QueryStatus

USER_FIELDS = ("prompt", "negative_prompt", "image", "params.prompt", "params.negative_prompt")

REFUSED = {
    "prompt": "the usual cause is a prompt longer than the model's token limit; shorten it",
    "negative_prompt": "the usual cause is a negative_prompt longer than the model's token "
                       "limit; shorten it",
    "image": "send another PNG, WebP or JPEG (at most 4096 px a side)",
}
"""The gateway's own advice for each field a miner may blame (its text is never relayed)."""


BUSY_STATUSES = (429, 503)
"""A miner's refusals for load: it is saturated, not failing."""


@dataclass
class _Budget:
    """One miner's token bucket (requests per minute) and requests in flight."""

    tokens: float
    last: float
    inflight: int = 0
    busy_until: float = field(default=0.0)


@dataclass(frozen=True)
class Refusal:
    """A miner's 400 blaming a field the user sent."""

    candidate: Candidate
    result: QueryResult
    field: str


def _blamed_field(result: QueryResult) -> str | None:
    """The user's field a miner's 400 blames, if it blames one."""
    if result.http_status != 400 or result.error is None:
        return None
    field = result.error.field
    return field.removeprefix("params.") if field in USER_FIELDS else None


@dataclass(frozen=True)
class Delivered:
    candidate: Candidate
    request: GenerateRequest
    result: QueryResult
    attempts: int


class Router:
    def __init__(self, directory: MinerDirectory, client: MinerClient, metrics: GatewayMetrics,
                 *, cooldown: float = 30.0, floor: float = 0.05, hedge_after: float | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self.directory = directory
        self.client = client
        self.metrics = metrics
        self.cooldown = cooldown
        self.floor = floor
        self.hedge_after = hedge_after
        self.rng = rng or random.Random()
        self._clock = clock
        self._cooling: dict[str, float] = {}  # hotkey -> monotonic time it may serve again
        self._budgets: dict[str, _Budget] = {}
        self.busy_cooldown = 5.0
        """Seconds a miner that refused for load (429/503) gets no new request."""
        self.http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ budgets
    def _bucket(self, c: Candidate, now: float) -> _Budget:
        capacity = max(1.0, (c.rate or 0.0) / 6.0)
        budget = self._budgets.get(c.target.hotkey)
        if budget is None:
            budget = self._budgets[c.target.hotkey] = _Budget(capacity, now)
        elif c.rate is not None:
            budget.tokens = min(capacity, budget.tokens + (now - budget.last) * c.rate / 60.0)
        budget.last = now
        return budget

    def wait_for(self, c: Candidate) -> float:
        """Seconds until `c` may be sent a request (0: now)."""
        now = self._clock()
        budget = self._bucket(c, now)
        waits = [0.0, budget.busy_until - now]
        if budget.inflight >= max(1, c.concurrency):
            waits.append(1.0)  # a generation ends: about a second on a busy miner
        if c.rate is not None and budget.tokens < 1.0:
            waits.append(math.inf if c.rate <= 0 else (1.0 - budget.tokens) * 60.0 / c.rate)
        return max(waits)

    def out_of_rate(self, c: Candidate) -> bool:
        """`c` has no rate budget left or refused for load: waiting a generation's time
        does not help, the user is told when to retry (429)."""
        now = self._clock()
        budget = self._bucket(c, now)
        return budget.busy_until > now or (c.rate is not None and budget.tokens < 1.0)

    def _take(self, c: Candidate) -> None:
        budget = self._bucket(c, self._clock())
        budget.inflight += 1
        if c.rate is not None:
            budget.tokens -= 1.0

    def _give_back(self, c: Candidate) -> None:
        budget = self._budgets.get(c.target.hotkey)
        if budget is not None:
            budget.inflight = max(0, budget.inflight - 1)

    def _releaser(self, c: Candidate) -> Callable[[asyncio.Future], None]:
        def release(_: asyncio.Future) -> None:
            self._give_back(c)

        return release

    def _busy(self, c: Candidate) -> None:
        """The miner refused for load: no new request there for busy_cooldown."""
        budget = self._bucket(c, self._clock())
        budget.busy_until = self._clock() + self.busy_cooldown
        budget.tokens = min(budget.tokens, 0.0)

    def saturated(self, model: str, pool: list[Candidate], wait: float) -> GatewayError:
        """429 for a model whose miners have no budget left, with when to retry."""
        seconds = max(1, math.ceil(min(wait, 60.0)))
        limit = sum(c.rate for c in pool if c.rate is not None)
        return GatewayError(
            429, f"every miner serving {model} is at capacity; retry in {seconds}s",
            type=RATE_LIMIT, code="capacity_exhausted",
            headers={"Retry-After": str(seconds),
                     "x-ratelimit-limit-requests": str(int(limit)),
                     "x-ratelimit-remaining-requests": "0",
                     "x-ratelimit-reset-requests": f"{seconds}s"})

    def order(self, model: str) -> list[Candidate]:
        """Miners serving `model` in the order to try: a draw weighted by score (without
        replacement), miners in cooldown last (better a doubtful miner than none)."""
        pool = self.directory.serving(model)
        now = self._clock()
        best = max((c.score for c in pool), default=0.0)
        floor = self.floor * best if best > 0 else 1.0

        def key(c: Candidate) -> tuple[bool, float]:
            weight = max(c.score, floor)
            cooling = self._cooling.get(c.target.hotkey, 0.0) > now
            return (not cooling, self.rng.random() ** (1.0 / weight))

        return sorted(pool, key=key, reverse=True)

    def _refusals_wrong(self, refusals: list[Refusal]) -> None:
        """The miners blamed the user's request, which was not shown to be at fault: each
        failed (cooled down), as for any other bad answer."""
        for refusal in refusals:
            self._failed(refusal.candidate, refusal.result)

    def _failed(self, candidate: Candidate, result: QueryResult) -> None:
        self._cooling[candidate.target.hotkey] = self._clock() + self.cooldown
        self.metrics.miner_failures.labels(result.status.value).inc()

    async def _ask(self, candidate: Candidate, params: GenerationParams, image: str | None,
                   timeout: float) -> tuple[Candidate, GenerateRequest, QueryResult]:
        request = GenerateRequest(request_id=uuid.uuid4().hex, params=params, image=image,
                                  timeout=max(1.0, min(600.0, timeout)))
        result = await self.client.query(candidate.target, request, timeout=timeout,
                                         http=self.http)
        if result.ok:
            problem = _answer_problem(params, result)
            if problem:
                result.status, result.reason = QueryStatus.INVALID_RESPONSE, problem
        return candidate, request, result

    async def generate(self, params: GenerationParams, image: str | None,
                       deadline: float) -> Delivered:
        """One image before `deadline` (monotonic seconds), or a 502/503/504 GatewayError."""
        queue = self.order(params.model)
        if not queue:
            raise GatewayError(503, f"no miner serves {params.model} right now; retry later "
                                    "(GET /v1/models lists what is served)",
                               type=SERVER_ERROR, code="no_miner_available")
        pending: set[asyncio.Task] = set()
        failures: list[str] = []
        attempts = 0
        tried = 0  # candidates considered (sent to, or skipped for having no budget)
        busy = 0  # miners that refused for load
        skipped = 0  # miners passed over for having no budget left
        soonest = math.inf  # seconds until a skipped miner has budget again

        gave_up: set[str] = set()  # hotkeys that failed this request (not for load)
        refusals: list[Refusal] = []  # miners that blamed a field of the user's
        rate_limited = False  # a skipped miner was out of rate budget (not only busy)

        def launch() -> bool:
            """Send to the next miner with budget; False when none is left."""
            nonlocal attempts, tried, soonest, skipped, rate_limited
            while tried < len(queue):
                candidate = queue[tried]
                tried += 1
                if candidate.target.hotkey in gave_up:
                    continue
                wait = self.wait_for(candidate)
                if wait > 0:
                    soonest = min(soonest, wait)
                    skipped += 1
                    rate_limited = rate_limited or self.out_of_rate(candidate)
                    continue
                self._take(candidate)
                if attempts:
                    self.metrics.retries.labels(params.model).inc()
                attempts += 1
                task = asyncio.ensure_future(
                    self._ask(candidate, params, image, deadline - self._clock()))
                # done or cancelled (even before it ran), the in-flight slot comes back
                task.add_done_callback(self._releaser(candidate))
                pending.add(task)
                return True
            return False

        try:
            while self._clock() < deadline and not _settled(refusals):
                if not pending and not launch():
                    # every miner has its concurrency in use: wait for a slot within the
                    # deadline (a user's n=4 queues on a one-miner model); out of rate
                    # budget or refusing for load: 429 below, with when to retry
                    if busy or rate_limited or not skipped \
                            or self._clock() + soonest >= deadline:
                        break
                    await asyncio.sleep(soonest)
                    queue, tried, skipped, soonest = self.order(params.model), 0, 0, math.inf
                    continue
                remaining = deadline - self._clock()
                can_hedge = self.hedge_after is not None and tried < len(queue)
                wait = min(remaining, self.hedge_after) if can_hedge and self.hedge_after \
                    else remaining
                done, pending = await asyncio.wait(pending, timeout=max(0.0, wait),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if can_hedge and self._clock() < deadline and launch():
                        self.metrics.hedges.labels(params.model).inc()
                    continue
                for task in done:
                    candidate, request, result = task.result()
                    if result.ok:
                        self._refusals_wrong(refusals)
                        return Delivered(candidate, request, result, attempts)
                    field = _blamed_field(result)
                    if field is not None:  # unverified: ask another miner
                        refusals.append(Refusal(candidate, result, field))
                        gave_up.add(candidate.target.hotkey)
                        failures.append(f"uid {candidate.target.uid}: refused the {field}")
                        continue
                    if result.http_status in BUSY_STATUSES:
                        self._busy(candidate)  # saturated, not failing: no long cooldown
                        self.metrics.miner_failures.labels(result.status.value).inc()
                        busy += 1
                        soonest = min(soonest, self.busy_cooldown)
                        continue
                    self._failed(candidate, result)
                    gave_up.add(candidate.target.hotkey)
                    failures.append(f"uid {candidate.target.uid}: {result.status.value}"
                                    + (f" ({clip(result.reason)})" if result.reason else ""))
        finally:
            await cancel_all(pending)
        agreed = _agreed(refusals, len(queue))
        if agreed:
            raise bad_request(f"{agreed}: refused by {len(refusals)} of the miners serving "
                              f"{params.model}; {REFUSED[agreed]}", agreed)
        self._refusals_wrong(refusals)
        said = "; ".join(failures[-4:]) or "no answer yet"
        if self._clock() >= deadline:
            raise GatewayError(504, f"no miner delivered an image within the deadline "
                                    f"({attempts} tried: {said}); retry, or raise 'timeout'",
                               type=SERVER_ERROR, code="deadline_exceeded")
        if busy or skipped:  # miners out of budget or refusing for load
            raise self.saturated(params.model, queue, soonest)
        raise GatewayError(502, f"every miner serving {params.model} failed ({said}); retry "
                                "later", type=SERVER_ERROR, code="all_miners_failed")


AGREEING_REFUSALS = 3
"""Refusals of one field that end a request without asking the rest of the miners."""


def _settled(refusals: list[Refusal]) -> bool:
    """Enough miners blamed the same field: a too-long prompt is not sent to every miner."""
    return len(refusals) >= AGREEING_REFUSALS and len({r.field for r in refusals}) == 1


def _agreed(refusals: list[Refusal], serving: int) -> str | None:
    """The field the miners agree is the user's fault: every refusal names it, and at least
    two miners refused (or every miner serving the model, when fewer serve it)."""
    fields = {r.field for r in refusals}
    if len(fields) != 1 or len(refusals) < min(2, serving):
        return None
    return fields.pop()


async def cancel_all(tasks: set[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until each is done: none outlives the request that made it
    (their in-flight slots come back through their done callbacks)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def clip(text: str, limit: int = 120) -> str:
    """A miner's reason cut to `limit` at a word boundary, marked with an ellipsis (never
    mid-word, so a user's message stays readable)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " …"


def _answer_problem(params: GenerationParams, result: QueryResult) -> str:
    """What makes a signed answer unusable for the user (and unauditable)."""
    if result.image is None or result.response is None:
        return "no image"
    if result.image.size != (params.width, params.height):
        return f"image is {result.image.size[0]}x{result.image.size[1]}, asked " \
               f"{params.width}x{params.height}"
    if result.response.states is None:
        return "the answer commits to no sampler states"
    return ""
