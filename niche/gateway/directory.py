"""Which miners can serve what, and how well: the metagraph (endpoints), each miner's
/v1/info (models), and the validator's own scores and exclusions, read from its SQLite
state file read-only (the gateway never writes it and never holds its write lock).

Refreshed in the background; a failed refresh keeps the last good view, so a chain or
state-file hiccup never takes the gateway down."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from niche.chain.base import Chain, ChainError
from niche.validator.client import MinerClient, MinerTarget

log = logging.getLogger("niche.gateway")


@dataclass(frozen=True)
class Candidate:
    target: MinerTarget
    models: frozenset[str]
    score: float
    """The validator's EMA score for this uid (0 when it has none yet)."""


@dataclass(frozen=True)
class ValidatorView:
    scores: dict[int, tuple[str, float]] = field(default_factory=dict)
    """uid -> (hotkey, score)."""
    excluded: frozenset[str] = frozenset()


def read_validator_state(path: Path | None) -> ValidatorView:
    """Scores and live exclusions from a validator state file, opened read-only."""
    if path is None or not Path(path).exists():
        return ValidatorView()
    uri = f"file:{Path(path).expanduser()}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=2.0) as db:
        round_row = db.execute("SELECT value FROM meta WHERE key='round'").fetchone()
        current = int(round_row[0]) if round_row else 0
        scores = {int(uid): (str(hotkey), float(score)) for uid, hotkey, score in
                  db.execute("SELECT uid, hotkey, score FROM uids")}
        excluded = frozenset(str(h) for h, until in
                             db.execute("SELECT hotkey, until_round FROM exclusions")
                             if int(until) > current)
    return ValidatorView(scores, excluded)


class MinerDirectory:
    def __init__(self, chain: Chain, netuid: int, client: MinerClient, *,
                 own_hotkey: str, validator_state: Path | None = None,
                 info_timeout: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.chain = chain
        self.netuid = netuid
        self.client = client
        self.own_hotkey = own_hotkey
        self.validator_state = validator_state
        self.info_timeout = info_timeout
        self._clock = clock
        self.candidates: list[Candidate] = []
        self.refreshed_at: float | None = None
        self.last_error = ""

    async def refresh(self) -> None:
        """One refresh; keeps the previous view on any failure (and says why in the log)."""
        try:
            metagraph = await asyncio.to_thread(self.chain.metagraph, self.netuid)
        except ChainError as exc:
            self.last_error = f"metagraph: {exc}"
            log.warning("directory refresh: %s (keeping the last view)", self.last_error)
            return
        try:
            view = await asyncio.to_thread(read_validator_state, self.validator_state)
        except sqlite3.Error as exc:
            self.last_error = f"validator state {self.validator_state}: {exc}"
            log.warning("directory refresh: %s (keeping the last scores)", self.last_error)
            previous = {c.target.uid: (c.target.hotkey, c.score) for c in self.candidates}
            view = ValidatorView(previous)
        neurons = [n for n in metagraph.neurons
                   if n.endpoint is not None and n.hotkey != self.own_hotkey
                   and n.hotkey not in view.excluded]
        infos = await self.client.info_many(neurons, timeout=self.info_timeout)
        candidates = []
        for neuron, info in zip(neurons, infos, strict=True):
            if not info.ok or info.info is None:
                continue
            hotkey, score = view.scores.get(neuron.uid, (neuron.hotkey, 0.0))
            candidates.append(Candidate(
                MinerTarget(neuron.uid, neuron.hotkey, neuron.endpoint.url
                            if neuron.endpoint else None),
                frozenset(m.model for m in info.info.models),
                score if hotkey == neuron.hotkey else 0.0))
        self.candidates = candidates
        self.refreshed_at = self._clock()
        self.last_error = ""

    def serving(self, model: str) -> list[Candidate]:
        return [c for c in self.candidates if model in c.models]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.candidates:
            for model in c.models:
                out[model] = out.get(model, 0) + 1
        return out
