"""Prometheus metrics of one gateway app, in its own registry."""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("niche_gateway_requests", "Image requests by model and HTTP "
                                "status", ["model", "status"], registry=r)
        self.images = Counter("niche_gateway_images", "Images delivered by model", ["model"],
                              registry=r)
        self.latency = Histogram("niche_gateway_request_seconds", "Seconds per image request "
                                 "(all its images, retries included)", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.miner_latency = Histogram("niche_gateway_miner_seconds", "Seconds of the miner "
                                       "answer that was delivered", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("niche_gateway_retries", "Images asked of another miner after "
                               "a failure", ["model"], registry=r)
        self.hedges = Counter("niche_gateway_hedges", "Images also asked of a second miner "
                              "because the first was slow", ["model"], registry=r)
        self.miner_failures = Counter("niche_gateway_miner_failures", "Failed miner attempts "
                                      "by status", ["status"], registry=r)
        self.audits_queued = Counter("niche_gateway_audits_queued", "Organic answers queued "
                                     "for the validator's audit", registry=r)
        self.audits_not_queued = Counter(
            "niche_gateway_audits_not_queued", "Organic answers drawn for audit but not "
            "queued (the queue file failed, or too many writes were waiting on it)",
            registry=r)
        self.audits = Gauge("niche_gateway_audits", "Organic audit queue rows by status "
                            "(pending, claimed, passed, failed, skipped)", ["status"],
                            registry=r)
        self.miners = Gauge("niche_gateway_miners", "Miners serving each model", ["model"],
                            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
