"""Prometheus metrics of one miner app, in its own registry (two apps in a process never mix)."""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class MinerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("niche_miner_requests", "Generate requests by HTTP status",
                                ["status"], registry=self.registry)
        self.refusals = Counter("niche_miner_refusals", "Refused requests by reason",
                                ["reason"], registry=self.registry)
        self.state_fetches = Counter("niche_miner_state_fetches",
                                     "Sampler-state fetches (audits) by HTTP status", ["status"],
                                     registry=self.registry)
        self.states_bytes = Gauge("niche_miner_states_bytes",
                                  "Bytes of sampler states kept for audits",
                                  registry=self.registry)
        self.queue_depth = Gauge("niche_miner_queue_depth", "Requests waiting for the GPU",
                                 registry=self.registry)
        self.busy = Gauge("niche_miner_busy", "Generations running (1 at most per replica)",
                          registry=self.registry)
        self.replicas = Gauge("niche_miner_replicas", "Engine replicas (ray backend) by state: "
                              "configured, up, busy", ["state"], registry=self.registry)
        self.replicas_restarted = Gauge(
            "niche_miner_replicas_restarted", "Engine replica failures seen (Ray replaced "
            "each)", registry=self.registry)
        self.generation_seconds = Histogram(
            "niche_miner_generation_seconds", "Seconds per generation (engine only)",
            ["model"], buckets=GENERATION_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram(
            "niche_miner_queue_seconds", "Seconds a request waited for the GPU",
            buckets=GENERATION_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
