"""Prometheus metrics of one validator, in its own registry, served on `--metrics.port`
(niche/metrics_server.py): rounds, answers by status, audits by outcome, failures on the
validator's side by kind, weight settings by result."""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from niche.validator.scoring import UNAUDITED, UNAVAILABLE, UNVERIFIABLE, Outcome


class ValidatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rounds = Counter("niche_validator_rounds", "Rounds completed",
                              registry=self.registry)
        self.last_round = Gauge("niche_validator_last_round", "Index of the last round run",
                                registry=self.registry)
        self.answers = Counter("niche_validator_answers", "Miner outcomes by status",
                               ["status"], registry=self.registry)
        self.audits = Counter("niche_validator_audits", "Audited answers by outcome",
                              ["outcome"], registry=self.registry)
        self.failures = Counter("niche_validator_failures", "Failures on the validator's side "
                                "(chain unreachable, set_weights refused, audit crashed, "
                                "permit lost, a round no miner could be asked in)",
                                ["kind"], registry=self.registry)
        self.weights_set = Counter("niche_validator_weights_set", "set_weights calls by result",
                                   ["result"], registry=self.registry)
        self.last_weights_block = Gauge("niche_validator_last_weights_block",
                                        "Block of the last successful set_weights",
                                        registry=self.registry)
        self.round_seconds = Gauge("niche_validator_round_seconds", "Duration of the last round",
                                   registry=self.registry)

    def round_done(self, round_index: int, outcomes: Iterable[Outcome], seconds: float) -> None:
        self.rounds.inc()
        self.last_round.set(round_index)
        self.round_seconds.set(seconds)
        for o in outcomes:
            self.answers.labels(o.status).inc()
            if o.status in (UNAVAILABLE, UNAUDITED, UNVERIFIABLE):  # no verdict: a fault or ours
                self.audits.labels(o.status).inc()
            elif o.audited:
                self.audits.labels("pass" if o.audit_passed else "fail").inc()

    def weights(self, success: bool, block: int) -> None:
        self.weights_set.labels("ok" if success else "failed").inc()
        if success:
            self.last_weights_block.set(block)

    def render(self) -> bytes:
        return generate_latest(self.registry)
