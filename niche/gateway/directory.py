"""Which miners can serve what, and how well: the metagraph (endpoints), each miner's
/v1/info (models), and the validator's own scores and exclusions, read from its SQLite
state file read-only (the gateway never writes it and never holds its write lock).

One budget per miner: the gateway signs with the validator's hotkey, so the miner's rate
limit (its /v1/info `requests_per_minute`, scaled by our stake share when the miner shares
it by stake) covers both the validator's challenges and the users' requests. The gateway
leaves the challenges their share (the validator's rounds per minute, read from its state
file, times the challenges it sends a miner per round) and a margin, and keeps at most the
miner's advertised concurrency in flight (more would only queue behind the challenges).

Refreshed in the background; a failed refresh keeps the last good view, so a chain or
state-file hiccup never takes the gateway down. A miner whose /v1/info fails for a reason
of availability (timeout, unreachable, 429/5xx) keeps its last good view for `info_grace`
seconds: one slow answer on a busy box must not cost an honest miner its users until the
next refresh (if it is really gone, the router's attempts fail over and cool it down)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from niche.chain.base import Chain, ChainError
from niche.protocol import RATE_BURST_DIVISOR, InfoResponse
from niche.sqlite_files import connect_read_only
from niche.validator.client import InfoResult, MinerClient, MinerTarget, QueryStatus
from niche.validator.pacing import HEADROOM, caller_rate

log = logging.getLogger("niche.gateway")


DEFAULT_ROUNDS_PER_MINUTE = 5.0
"""Validator rounds per minute assumed before its state file shows them (12 s rounds)."""
CHALLENGES_PER_ROUND = 4
"""Most challenges a round sends one miner (its concurrency, up to the volume cap)."""
MINER_INFLIGHT_PER_IP = 8
"""A miner's default cap on requests in flight from one address (ours: the validator's
challenges and the gateway's requests, when both run on one machine)."""
INFO_GRACE = 90.0
"""Seconds a miner keeps its last good /v1/info view while its info fails for a reason of
availability (three refreshes at the default 30 s interval)."""


@dataclass(frozen=True)
class Candidate:
    target: MinerTarget
    models: frozenset[str]
    score: float
    """The validator's EMA score for this uid (0 when it has none yet)."""
    concurrency: int = 1
    """The most requests the gateway keeps in flight there: the miner's concurrency (its
    /v1/info; more would only queue behind the challenges), within what its per-address
    cap leaves after a round's challenges."""
    rate: float | None = None
    """Requests per minute the gateway may send it, the challenges' share taken out (None:
    the miner sets no rate limit)."""
    burst: float = math.inf
    """Requests the gateway may send it at once: the miner's bucket less a round's
    challenges (the validator's burst and ours must fit in it together)."""


@dataclass(frozen=True)
class ValidatorView:
    scores: dict[int, tuple[str, float]] = field(default_factory=dict)
    """uid -> (hotkey, score)."""
    excluded: frozenset[str] = frozenset()
    rounds_per_minute: float = DEFAULT_ROUNDS_PER_MINUTE
    """How often the validator challenges each miner, from its recent rounds."""
    measured: bool = False
    """`rounds_per_minute` comes from two recent rounds on file (else the validator's
    recorded interval, or the default): until then the gateway reads the file often."""


def read_validator_state(path: Path | None) -> ValidatorView:
    """Scores and live exclusions from a validator state file, opened read-only."""
    if path is None or not Path(path).expanduser().exists():
        return ValidatorView()
    with contextlib.closing(connect_read_only(path, timeout=2.0)) as db:
        round_row = db.execute("SELECT value FROM meta WHERE key='round'").fetchone()
        current = int(round_row[0]) if round_row else 0
        scores = {int(uid): (str(hotkey), float(score)) for uid, hotkey, score in
                  db.execute("SELECT uid, hotkey, score FROM uids")}
        excluded = frozenset(str(h) for h, until in
                             db.execute("SELECT hotkey, until_round FROM exclusions")
                             if int(until) > current)
        starts = [float(ts) for (ts,) in db.execute(
            "SELECT MIN(ts) FROM history WHERE ts > ? GROUP BY round ORDER BY 1",
            (time.time() - 300.0,))]
        interval_row = db.execute("SELECT value FROM meta WHERE key='round_interval'"
                                  ).fetchone()
    rate = configured_rate(interval_row[0] if interval_row else None)
    measured = len(starts) >= 2 and starts[-1] > starts[0]
    if measured:
        rate = 60.0 * (len(starts) - 1) / (starts[-1] - starts[0])
    return ValidatorView(scores, excluded, rate, measured)


def configured_rate(interval: str | None) -> float:
    """Rounds per minute before two rounds are on file: the validator's configured round
    interval (a validator at 4 s rounds challenges 15 times a minute, not the 5 assumed
    of the default 12 s: users took the challenges' share of miners' rates and honest
    miners' challenges got 429), else DEFAULT_ROUNDS_PER_MINUTE."""
    try:
        seconds = float(interval) if interval is not None else 0.0
    except ValueError:
        return DEFAULT_ROUNDS_PER_MINUTE
    if not math.isfinite(seconds) or seconds <= 0:
        return DEFAULT_ROUNDS_PER_MINUTE
    return max(DEFAULT_ROUNDS_PER_MINUTE, 60.0 / seconds)


def transient(result: InfoResult) -> bool:
    """An info failure of availability (timeout, unreachable, 429 or 5xx): it says nothing
    about what the miner serves, so its last good view still holds. A refusal (401/403) or a
    bad answer is the miner's word and drops it."""
    if result.status in (QueryStatus.TIMEOUT, QueryStatus.UNREACHABLE):
        return True
    status = result.http_status or 0
    return result.status is QueryStatus.HTTP_ERROR and (status == 429 or status >= 500)


def inflight_share(concurrency: int) -> int:
    """Requests in flight the gateway may keep at a miner serving `concurrency` at once."""
    challenges = min(concurrency, CHALLENGES_PER_ROUND)
    return max(1, min(concurrency, MINER_INFLIGHT_PER_IP - challenges))


def organic_rate(info: InfoResponse, stake_share: float, rounds_per_minute: float
                 ) -> float | None:
    """Requests per minute the gateway may send a miner: its rate for our hotkey (scaled by
    our stake share when it shares by stake) less the validator's challenges and a margin;
    None when the miner sets no limit."""
    rpm = caller_rate(info, stake_share)
    if rpm is None:
        return None
    challenges = rounds_per_minute * min(info.concurrency, CHALLENGES_PER_ROUND)
    return max(0.0, HEADROOM * rpm - challenges)


def organic_burst(info: InfoResponse, stake_share: float) -> float:
    """Requests the gateway may send a miner at once: the miner's bucket for our hotkey
    (rate / RATE_BURST_DIVISOR, as the miner holds it) less the challenges a round sends at
    once."""
    rpm = caller_rate(info, stake_share)
    if rpm is None:
        return math.inf
    return max(1.0, HEADROOM * rpm / RATE_BURST_DIVISOR
               - min(info.concurrency, CHALLENGES_PER_ROUND))


class MinerDirectory:
    def __init__(self, chain: Chain, netuid: int, client: MinerClient, *,
                 own_hotkey: str, validator_state: Path | None = None,
                 info_timeout: float = 5.0, info_grace: float = INFO_GRACE,
                 clock: Callable[[], float] = time.monotonic):
        self.chain = chain
        self.netuid = netuid
        self.client = client
        self.own_hotkey = own_hotkey
        self.validator_state = validator_state
        self.info_timeout = info_timeout
        self.info_grace = info_grace
        self._clock = clock
        self.candidates: list[Candidate] = []
        self.pace_measured = False
        """The validator's round rate was measured from its file (`ValidatorView.measured`)."""
        self.refreshed_at: float | None = None
        self.last_error = ""
        self._good: dict[str, tuple[str | None, InfoResponse, float]] = {}
        """hotkey -> (endpoint, its last good info, when that info was fetched)."""
        self._state_missing: bool | None = None
        """Whether the configured validator state file was missing at the last read (None:
        not read yet): its absence is said once, and again only when it changes."""
        self._started = 0
        self._installed = 0
        """Refreshes are numbered as they start; one that ends after a later one installed
        its view is dropped (a slow refresh must not bring back an older world)."""

    async def refresh(self) -> None:
        """One refresh; keeps the previous view on any failure (and says why in the log)."""
        self._started += 1
        ticket = self._started
        try:
            metagraph = await asyncio.to_thread(self.chain.metagraph, self.netuid)
        except ChainError as exc:
            self.last_error = f"metagraph: {exc}"
            log.warning("directory refresh: %s (keeping the last view)", self.last_error)
            return
        try:
            view = await asyncio.to_thread(self._read_state)
        except sqlite3.Error as exc:
            self.last_error = f"validator state {self.validator_state}: {exc}"
            log.warning("directory refresh: %s (keeping the last scores)", self.last_error)
            previous = {c.target.uid: (c.target.hotkey, c.score) for c in self.candidates}
            view = ValidatorView(previous)
        neurons = [n for n in metagraph.neurons
                   if n.endpoint is not None and n.hotkey != self.own_hotkey
                   and n.hotkey not in view.excluded]
        infos = await self.client.info_many(neurons, timeout=self.info_timeout)
        share = metagraph.stake_share(self.own_hotkey, missing=0.0)
        candidates = []
        unusable = {hotkey: "excluded by the validator" for hotkey in view.excluded}
        now = self._clock()
        for neuron, result in zip(neurons, infos, strict=True):
            url = neuron.endpoint.url if neuron.endpoint else None
            info = self._view(neuron.uid, neuron.hotkey, url, result, now)
            if isinstance(info, str):
                unusable[neuron.hotkey] = info
                continue
            hotkey, score = view.scores.get(neuron.uid, (neuron.hotkey, 0.0))
            candidates.append(Candidate(
                MinerTarget(neuron.uid, neuron.hotkey, url),
                frozenset(m.model for m in info.models),
                score if hotkey == neuron.hotkey else 0.0,
                concurrency=inflight_share(info.concurrency),
                rate=organic_rate(info, share, view.rounds_per_minute),
                burst=organic_burst(info, share)))
        if ticket < self._installed:
            return  # a refresh started later has installed a newer view
        self._installed = ticket
        listed = {n.hotkey for n in neurons}
        for hotkey in [h for h in self._good if h not in listed]:
            del self._good[hotkey]  # deregistered, endpoint gone or excluded
        self._log_changes(candidates, unusable)
        self.candidates = candidates
        self.pace_measured = view.measured
        self.refreshed_at = self._clock()
        self.last_error = ""

    def _read_state(self) -> ValidatorView:
        """read_validator_state, saying in one WARNING when the configured file is missing
        (routing then ignores the validator's exclusions: its cheats get users) at the
        first read and whenever it goes missing again, one INFO line when it appears; never
        at every refresh."""
        path = self.validator_state
        if path is not None:
            missing = not Path(path).expanduser().exists()
            if missing != bool(self._state_missing):
                if missing:
                    log.warning("validator state %s does not exist: no scores or exclusions: "
                                "routing to every miner; pass the validator's "
                                "--neuron.state_path as --gateway.validator_state", path)
                elif self._state_missing is not None:
                    log.info("validator state %s is there now: routing by the validator's "
                             "scores and exclusions", path)
            self._state_missing = missing
        return read_validator_state(path)

    def serving(self, model: str) -> list[Candidate]:
        return [c for c in self.candidates if model in c.models]

    def counts(self) -> dict[str, int]:
        return _counts(self.candidates)

    def _view(self, uid: int, hotkey: str, url: str | None, result: InfoResult, now: float
              ) -> InfoResponse | str:
        """The info to route `hotkey` by: this refresh's, or (after a failure of availability
        at the same endpoint) the last good one for `info_grace` seconds; else why not."""
        if result.ok and result.info is not None:
            self._good[hotkey] = (url, result.info, now)
            return result.info
        last = self._good.get(hotkey)
        if last is not None and transient(result) and last[0] == url \
                and now - last[2] <= self.info_grace:
            log.info("miner uid %d: /v1/info failed (%s: %s); routing by its view of %.0fs ago "
                     "(kept up to %.0fs)", uid, result.status, result.reason, now - last[2],
                     self.info_grace)
            return last[1]
        self._good.pop(hotkey, None)
        return f"/v1/info: {result.status}" + (f": {result.reason}" if result.reason else "")

    def _log_changes(self, candidates: list[Candidate], unusable: dict[str, str]) -> None:
        """One line per miner that joined or left the routing view (why users' requests
        moved is then in the log, not guessed)."""
        before = {c.target.hotkey: c for c in self.candidates}
        after = {c.target.hotkey: c for c in candidates}
        if not before and after:
            log.info("directory: %d miners serve (%s)", len(after), ", ".join(
                f"{model}: {count}" for model, count in sorted(_counts(candidates).items())))
            return
        for hotkey, c in after.items():
            if hotkey not in before:
                log.info("directory: uid %d joined (%s)", c.target.uid,
                         ", ".join(sorted(c.models)) or "no model")
        for hotkey, c in before.items():
            if hotkey not in after:
                log.warning("directory: uid %d left the routing view (%s)", c.target.uid,
                            unusable.get(hotkey, "no longer on chain with an endpoint"))


def _counts(candidates: list[Candidate]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in candidates:
        for model in c.models:
            out[model] = out.get(model, 0) + 1
    return out
