"""Which miner draws an image, and what happens when it fails or stalls.

Each image is one signed `GenerateRequest` (a fresh request id per attempt) to a miner drawn
among those that serve the model, with probability growing with the validator's score
(`floor` keeps new miners in the draw). A miner that times out, errs or returns a bad
answer is skipped for `cooldown` seconds and the image is asked of the next miner, until
the client's deadline. A miner in cooldown gets no request while a healthy one is merely
busy (the image waits for the healthy one's slot): only when no healthy miner can take it
in time.

A miner that hangs (no error, no answer) is not waited on: past the time the request
should take there (`Router.timing`: 3x what that miner, or the model's miners, took for
the same work, at least 5 s, at most the model's timeout scaled by the work and half the
client's deadline), a second miner is asked too and the first good answer wins
(`hedge_after` overrides the time). An attempt still unanswered past that time when the
image is settled (a faster miner won, the deadline passed, the client left) was a stalled
miner: it is cooled down like a timeout.

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
`capacity_exhausted` with Retry-After and the subnet's figures (`x-niche-capacity-*`; the
`x-ratelimit-*` headers are the caller's key's): the subnet is saturated, which is not a
failure (502 is kept for miners that failed), and not the caller's doing (not charged)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
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
from niche.protocol import RATE_BURST_DIVISOR, GenerateRequest, GenerationParams
from niche.validator.client import MinerClient, QueryResult, QueryStatus

USER_FIELDS = ("prompt", "negative_prompt", "image", "params.prompt", "params.negative_prompt")

REFUSED = {
    "prompt": "the usual cause is a prompt longer than the model's token limit; shorten it",
    "negative_prompt": "the usual cause is a negative_prompt longer than the model's token "
                       "limit; shorten it",
    "image": "send another PNG, WebP or JPEG (at most 4096 px a side)",
}
"""The gateway's own advice for each field a miner may blame (its text is never relayed)."""


CAPACITY_HEADERS = tuple(f"x-niche-capacity-{what}-requests"
                         for what in ("limit", "remaining", "reset"))
"""A `capacity_exhausted` answer's figures for the model's miners, named apart from the
`x-ratelimit-*` headers, which always describe the caller's key."""

BUSY_STATUSES = (429, 503)
"""A miner's refusals for load: it is saturated, not failing."""

log = logging.getLogger("niche.gateway")

HEDGE_FLOOR = 5.0
"""Seconds every attempt gets before it counts as late: network, a miner's queue and a
loaded GPU vary, and asking a second miner doubles the subnet's work for that image."""
HEDGE_FACTOR = 3.0
"""An attempt is late at this many times the time its miner (else the model's miners)
took for the same work."""
RETRY_ROOM = 2.0
"""A deadline holds this many attempts: the first is hedged by half of it at the latest."""
REDRAW_EVERY = 1.0
"""Seconds between looks at the directory while a hedge is due and every miner drawn was
asked: a miner listed again after a blip takes the image instead of the deadline."""
PACE_WEIGHT = 0.3
"""Weight of the newest answer in a miner's observed pace (an exponential average)."""
DEFAULT_LIMIT = 30.0
"""Seconds a request may take at a miner when the model's timeout is not known."""


def work(params: GenerationParams) -> float:
    """A request's work in pixel-steps (what its generation time grows with)."""
    return float(max(1, (params.width or 1) * (params.height or 1) * (params.steps or 1)))


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


@dataclass(frozen=True)
class _Attempt:
    candidate: Candidate
    started: float
    hedge_at: float
    """Monotonic time to ask another miner too."""
    late_at: float
    """Monotonic time past which an unanswered attempt is a stalled miner (cooled down)."""


@dataclass
class _Search:
    """One image's search for a miner: who was asked, what they said, what is running."""

    queue: list[Candidate]
    pending: dict[asyncio.Task, _Attempt] = field(default_factory=dict)
    asked: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    attempts: int = 0
    delivered: bool = False
    busy: int = 0
    """Miners that refused for load (429/503)."""
    skipped: bool = False
    """At the last pick, a miner was passed over for having no budget (rate or slot)."""
    slot_wait: bool = False
    """At the last pick, a miner passed over was only waiting for a free slot."""
    soonest: float = math.inf
    """Seconds until a miner passed over has budget again."""

    def hedge_due(self) -> float:
        """When every running attempt is overdue (-inf: none runs)."""
        return max((a.hedge_at for a in self.pending.values()), default=-math.inf)


class Router:
    def __init__(self, directory: MinerDirectory, client: MinerClient, metrics: GatewayMetrics,
                 *, cooldown: float = 30.0, floor: float = 0.05, hedge_after: float | None = None,
                 limit: Callable[[GenerationParams], float] | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self.directory = directory
        self.client = client
        self.metrics = metrics
        self.cooldown = cooldown
        self.floor = floor
        self.hedge_after = hedge_after
        """Seconds before another miner is asked too (None: derived per attempt, `timing`)."""
        self.limit = limit or (lambda params: DEFAULT_LIMIT)
        """Seconds an honest miner may take for a request (the model's timeout, scaled)."""
        self.rng = rng or random.Random()
        self._clock = clock
        self._cooling: dict[str, float] = {}  # hotkey -> monotonic time it may serve again
        self._budgets: dict[str, _Budget] = {}
        self._pace: dict[tuple[str, str], float] = {}  # (hotkey or "", model) -> s per work
        self._freed: asyncio.Event | None = None
        self._freed_loop: asyncio.AbstractEventLoop | None = None
        self.busy_cooldown = 5.0
        """Seconds a miner that refused for load (429/503) gets no new request."""
        self.http: aiohttp.ClientSession | None = None
        self._watching: set[asyncio.Task] = set()
        """Beaten attempts of miners whose pace is unknown, left to finish (see `_watch`)."""
        self._closed = False

    async def close(self) -> None:
        """Cancel the attempts still watched, and watch no more (the gateway is stopping)."""
        self._closed = True
        await cancel_all(set(self._watching))

    # ------------------------------------------------------------------ budgets
    def _bucket(self, c: Candidate, now: float) -> _Budget:
        capacity = max(1.0, min((c.rate or 0.0) / RATE_BURST_DIVISOR, c.burst))
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
        if self._freed is not None:  # images waiting for a slot look again
            self._freed.set()
            self._freed = None

    def _slot_freed(self) -> asyncio.Event:
        """Set when any in-flight slot comes back (one event per loop: tests run several)."""
        loop = asyncio.get_running_loop()
        if self._freed is None or self._freed_loop is not loop:
            self._freed, self._freed_loop = asyncio.Event(), loop
        return self._freed

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
        """429 for a model whose miners have no budget left, with when to retry and, when
        the miners advertise rates, the requests per minute they take from this gateway."""
        seconds = max(1, math.ceil(min(wait, 60.0)))
        rates = [c.rate for c in pool if c.rate is not None and math.isfinite(c.rate)]
        limit, remaining, reset = CAPACITY_HEADERS
        figures = {limit: f"{round(sum(rates), 1):g}"} if rates else {}
        return GatewayError(
            429, f"every miner serving {model} is at capacity; retry in {seconds}s",
            type=RATE_LIMIT, code="capacity_exhausted",
            headers={"Retry-After": str(seconds), **figures, remaining: "0",
                     reset: f"{seconds}s"})

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
            self._failed(refusal.candidate, refusal.result.status.value)

    def _failed(self, candidate: Candidate, status: str) -> None:
        self._cooling[candidate.target.hotkey] = self._clock() + self.cooldown
        self.metrics.miner_failures.labels(status).inc()

    def cooling(self, c: Candidate) -> bool:
        """`c` failed lately and is skipped while a healthy miner can take the image."""
        return self._cooling.get(c.target.hotkey, 0.0) > self._clock()

    # ------------------------------------------------------------------ timing
    def observe(self, c: Candidate, params: GenerationParams, latency: float | None) -> None:
        """A delivered answer's time, as that miner's and the model's pace (s per work)."""
        if not latency or latency <= 0:
            return
        pace = latency / work(params)
        for key in ((c.target.hotkey, params.model), ("", params.model)):
            old = self._pace.get(key)
            self._pace[key] = pace if old is None else old + PACE_WEIGHT * (pace - old)

    def usual(self, c: Candidate, params: GenerationParams, *, own: bool = False
              ) -> float | None:
        """Seconds `c` usually takes for `params` (else, unless `own`, the model's miners';
        None: unseen)."""
        pace = self._pace.get((c.target.hotkey, params.model))
        if pace is None and not own:
            pace = self._pace.get(("", params.model))
        return pace * work(params) if pace else None

    def stalled(self, c: Candidate, params: GenerationParams) -> float:
        """Seconds past which `c`, unanswered, is a stalled miner (cooled down as a
        timeout): HEDGE_FACTOR x its OWN usual time, at least HEDGE_FLOOR, at most the
        model's scaled timeout; the timeout itself while its own pace is unknown. Never
        the model's pace: the fastest miners set that (maybe with fewer steps than asked),
        and an honest slower miner whose attempts a faster one always ends first would
        be cooled on every request and its own pace never learnt."""
        slow = self.slow(c, params, own=True)
        return slow if self.usual(c, params, own=True) is None else max(HEDGE_FLOOR, slow)

    def slow(self, c: Candidate, params: GenerationParams, *, own: bool = False) -> float:
        """Seconds past which `c` is slow for `params`: HEDGE_FACTOR x its usual time (see
        `usual`), at most the model's scaled timeout (also the guess for an unseen one)."""
        limit = self.limit(params)
        usual = self.usual(c, params, own=own)
        return min(limit, HEDGE_FACTOR * usual) if usual else limit

    def timing(self, c: Candidate, params: GenerationParams, cap: float
               ) -> tuple[float, float]:
        """(hedge, late): seconds after sending to `c` to ask another miner too, and past
        which an unanswered attempt is a stalled miner (`stalled`). The hedge comes at
        `slow` (at least HEDGE_FLOOR; the model's pace stands in for an unseen miner's: a
        second miner asked costs nobody anything) or `cap` (a share of the client's
        deadline), whichever is first, unless `hedge_after` says."""
        slow = max(HEDGE_FLOOR, self.slow(c, params))
        hedge = self.hedge_after if self.hedge_after is not None else min(slow, cap)
        return hedge, self.stalled(c, params)

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
        """One image before `deadline` (monotonic seconds), or a 4xx/5xx GatewayError."""
        queue = self.order(params.model)
        if not queue:
            raise GatewayError(503, f"no miner serves {params.model} right now; retry later "
                                    "(GET /v1/models lists what is served)",
                               type=SERVER_ERROR, code="no_miner_available")
        s = _Search(queue)
        try:
            while self._clock() < deadline and not _settled(s.refusals):
                due = not s.pending or self._clock() >= s.hedge_due()
                if due and self._launch(s, params, image, deadline):
                    continue
                if not s.pending and not s.slot_wait:
                    break  # nobody left to ask, nor a slot to wait for
                for task in await self._next(s, deadline, wake_on_slot=due and s.slot_wait):
                    delivered = self._settle(s, task, params)
                    if delivered is not None:
                        return delivered
        finally:
            await self._abandon(s, params)
        raise self._outcome(s, params, deadline)

    def _pick(self, s: _Search, params: GenerationParams, deadline: float
              ) -> Candidate | None:
        """The next miner to ask: the first in the drawn order with budget now that is not
        cooling down; a cooling one only when no healthy miner frees a slot in time (about
        two of its generations before the deadline). Once every miner drawn was asked, the
        miners the directory listed since are drawn too (one back from a blip)."""
        now = self._clock()
        if all(c.target.hotkey in s.asked for c in s.queue):
            known = {c.target.hotkey for c in s.queue}  # miners listed since the image began
            s.queue += [c for c in self.order(params.model) if c.target.hotkey not in known]
        s.skipped, s.slot_wait, s.soonest = False, False, math.inf
        fallback: Candidate | None = None
        healthy_soon = False
        for c in s.queue:
            if c.target.hotkey in s.asked:
                continue
            wait, cooling = self.wait_for(c), self.cooling(c)
            if wait <= 0:
                if not cooling:
                    return c
                fallback = fallback or c
                continue
            s.skipped, s.soonest = True, min(s.soonest, wait)
            if self.out_of_rate(c):
                continue
            s.slot_wait = True
            expected = self.usual(c, params) or self.limit(params)
            healthy_soon = healthy_soon or (not cooling and deadline - now >= 2 * expected)
        return None if healthy_soon else fallback

    def _launch(self, s: _Search, params: GenerationParams, image: str | None,
                deadline: float) -> bool:
        """Send the image to the next miner (a hedge when another attempt runs)."""
        candidate = self._pick(s, params, deadline)
        if candidate is None:
            return False
        now = self._clock()
        # at most half the time left: an image queued late still has room for a hedge
        hedge, late = self.timing(candidate, params, (deadline - now) / RETRY_ROOM)
        self._take(candidate)
        if s.attempts:
            self.metrics.retries.labels(params.model).inc()
        if s.pending:
            self.metrics.hedges.labels(params.model).inc()
        s.attempts += 1
        s.asked.add(candidate.target.hotkey)
        # the image ends at the client's deadline, the attempt not before its late time:
        # a beaten or cut-short attempt may still teach the miner's pace or its stall
        task = asyncio.ensure_future(self._ask(candidate, params, image,
                                               max(deadline - now, late)))
        # done or cancelled (even before it ran), the in-flight slot comes back
        task.add_done_callback(self._releaser(candidate))
        s.pending[task] = _Attempt(candidate, now, now + hedge, now + late)
        return True

    async def _next(self, s: _Search, deadline: float, *, wake_on_slot: bool
                    ) -> set[asyncio.Task]:
        """Attempts that ended, waiting at most until the next hedge or the deadline (or,
        with `wake_on_slot`, until a miner's slot comes back; with a hedge overdue and no
        one to ask, REDRAW_EVERY: empty then)."""
        now = self._clock()
        due = s.hedge_due()
        if wake_on_slot:
            until = deadline
        else:
            until = min(deadline, due if now < due else now + REDRAW_EVERY)
        waiters: set[asyncio.Future] = set(s.pending)
        freed = asyncio.ensure_future(self._slot_freed().wait()) if wake_on_slot else None
        if freed is not None:
            waiters.add(freed)
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(0.0, until - now),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if freed is not None:
                freed.cancel()
        return {task for task in s.pending if task in done}

    def _settle(self, s: _Search, task: asyncio.Task, params: GenerationParams
                ) -> Delivered | None:
        """One ended attempt: the image, or why not (and what that costs the miner)."""
        attempt = s.pending.pop(task)
        candidate, request, result = task.result()
        uid = candidate.target.uid
        verdict = self._judge(attempt, params, result)
        if verdict == "delivered":
            self._refusals_wrong(s.refusals)
            s.delivered = True
            return Delivered(candidate, request, result, s.attempts)
        if verdict == "refused":  # unverified: ask another miner
            field = _blamed_field(result)
            s.refusals.append(Refusal(candidate, result, str(field)))
            s.failures.append(f"uid {uid}: refused the {field}")
        elif verdict == "busy":
            self.metrics.miner_failures.labels(result.status.value).inc()
            s.busy += 1
        else:
            s.failures.append(f"uid {uid}: {result.status.value}"
                              + (f" ({clip(result.reason)})" if result.reason else ""))
        return None

    def _judge(self, attempt: _Attempt, params: GenerationParams, result: QueryResult
               ) -> str:
        """What an ended attempt says of its miner, and what that costs it: "delivered" (its
        time teaches its pace), "refused" (a field of the user's blamed: no fault of the
        miner's yet), "busy" (refused for load: a short pause, not a cooldown), "failed"
        (cooled down), "cut" (a timeout before its late time: the client's short
        deadline, not the miner's fair time, so nobody is blamed) or "own" (the gateway's
        own failure, e.g. out of file descriptors: the miner was never fairly asked)."""
        candidate = attempt.candidate
        if result.ok:  # `_ask` made an unusable answer INVALID_RESPONSE
            self.observe(candidate, params, result.latency)
            return "delivered"
        if result.status is QueryStatus.VALIDATOR_ERROR:
            return "own"
        if _blamed_field(result) is not None:
            return "refused"
        if result.http_status in BUSY_STATUSES:
            self._busy(candidate)
            return "busy"
        if result.status is QueryStatus.TIMEOUT and self._clock() < attempt.late_at:
            return "cut"
        self._failed(candidate, result.status.value)
        return "failed"

    async def _abandon(self, s: _Search, params: GenerationParams) -> None:
        """Cancel the attempts still running; one that ran too long is a stalled miner,
        cooled down as a timeout whatever ended the search (a faster miner, the deadline,
        the client hanging up), so the next image is not drawn to it again."""
        now = self._clock()
        cancel = set()
        for task, attempt in s.pending.items():
            if task.done():  # answered in the same moment as the winner: judged as late
                if not task.cancelled() and task.exception() is None:
                    self._judge(attempt, params, task.result()[2])
                continue
            if now >= self._too_long(s, attempt, params):
                self._failed(attempt.candidate, QueryStatus.TIMEOUT.value)
                s.failures.append(f"uid {attempt.candidate.target.uid}: timeout (no answer "
                                  f"in {now - attempt.started:.1f}s)")
            elif s.delivered and self.usual(attempt.candidate, params, own=True) is None:
                self._watch(task, attempt, params)  # learn its pace, or that it stalled
                continue
            cancel.add(task)
        await cancel_all(cancel | {t for t in s.pending if t.done()})

    def _watch(self, task: asyncio.Task, attempt: _Attempt, params: GenerationParams
               ) -> None:
        """A faster miner won, but this miner's own pace is unknown: whether it is slower
        or stalled cannot be told yet, so its attempt (the miner computes the image anyway;
        its in-flight slot stays taken until then) may finish until its late time: an
        answer teaches its pace, none by then cools it down as a stalled miner. Neither
        cancelling it (its pace never learnt) nor cooling it (an honest slower miner cooled
        on every image) would be fair."""
        if self._closed:
            task.cancel()
            return

        async def watch() -> None:
            try:
                left = max(0.0, attempt.late_at - self._clock())
                _, _, result = await asyncio.wait_for(asyncio.shield(task), left)
            except asyncio.TimeoutError:
                self._failed(attempt.candidate, QueryStatus.TIMEOUT.value)
                await cancel_all({task})
                return
            except asyncio.CancelledError:  # the gateway stops: the attempt goes too
                task.cancel()
                raise
            except Exception as exc:  # the attempt's own bug: nothing learnt, nobody blamed
                log.warning("watching uid %d's attempt failed on the gateway's side: %s: %s",
                            attempt.candidate.target.uid, type(exc).__name__, exc)
                return
            self._judge(attempt, params, result)

        watcher = asyncio.ensure_future(watch())
        self._watching.add(watcher)
        watcher.add_done_callback(self._watching.discard)

    def _too_long(self, s: _Search, attempt: _Attempt, params: GenerationParams) -> float:
        """When an unanswered attempt counts as stalled: its late time; or, when another
        miner delivered, its hedge time once it is also slow by its OWN pace (no floor);
        a miner whose pace is unknown keeps its late time (the model's scaled timeout)."""
        if not s.delivered or self.usual(attempt.candidate, params, own=True) is None:
            return attempt.late_at
        return max(attempt.hedge_at,
                   attempt.started + self.slow(attempt.candidate, params, own=True))

    def _outcome(self, s: _Search, params: GenerationParams, deadline: float
                 ) -> GatewayError:
        """The error for an image no miner delivered."""
        agreed = _agreed(s.refusals, len(s.queue))
        if agreed:
            return bad_request(f"{agreed}: refused by {len(s.refusals)} of the miners serving "
                               f"{params.model}; {REFUSED[agreed]}", agreed)
        self._refusals_wrong(s.refusals)
        said = "; ".join(s.failures[-4:]) or "no answer yet"
        if self._clock() >= deadline:
            return GatewayError(504, f"no miner delivered an image within the deadline "
                                     f"({s.attempts} tried: {said}); retry, or raise 'timeout'",
                                type=SERVER_ERROR, code="deadline_exceeded")
        if s.busy or s.skipped:  # miners out of budget or refusing for load
            soonest = min(s.soonest, self.busy_cooldown if s.busy else math.inf)
            return self.saturated(params.model, s.queue, soonest)
        return GatewayError(502, f"every miner serving {params.model} failed ({said}); retry "
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
