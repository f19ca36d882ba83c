"""Prometheus metrics of one miner, in its own registry (two miners in a process never mix).
Served on their own port (`--metrics.port`, niche/metrics_server.py), never on the axon's."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from niche.chain.base import Neuron

GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ReplicaCollector(Collector):
    """niche_miner_replicas{state} and niche_miner_replicas_restarted, read from the engine
    at scrape time (ray backend only: a local engine has no replicas to report)."""

    def __init__(self, stats: Callable[[], dict[str, int]]):
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.stats()
        replicas = GaugeMetricFamily("niche_miner_replicas", "Engine replicas (ray backend) "
                                     "by state: configured, up, busy", labels=["state"])
        for state in ("configured", "up", "busy"):
            replicas.add_metric([state], s[state])
        yield replicas
        yield GaugeMetricFamily("niche_miner_replicas_restarted", "Engine replica failures "
                                "seen (Ray replaced each)", value=s["restarted"])


class GpuMemoryCollector(Collector):
    """niche_miner_gpu_memory_{allocated,reserved}_bytes per CUDA device, read at scrape
    time; absent when torch sees no CUDA device (a CPU miner has no GPU memory to report)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily("niche_miner_gpu_memory_allocated_bytes",
                                      "Bytes held by tensors on the GPU", labels=["device"])
        reserved = GaugeMetricFamily("niche_miner_gpu_memory_reserved_bytes",
                                     "Bytes reserved by torch's caching allocator",
                                     labels=["device"])
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], float(torch.cuda.memory_allocated(index)))
            reserved.add_metric([str(index)], float(torch.cuda.memory_reserved(index)))
        yield allocated
        yield reserved


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
        self.generation_seconds = Histogram(
            "niche_miner_generation_seconds", "Seconds per generation (engine only)",
            ["model"], buckets=GENERATION_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram(
            "niche_miner_queue_seconds", "Seconds a request waited for the GPU",
            buckets=GENERATION_BUCKETS, registry=self.registry)
        self.registered = Gauge("niche_miner_registered",
                                "1 while this hotkey is registered on the subnet (last "
                                "metagraph read), else 0", registry=self.registry)
        self.uid = Gauge("niche_miner_uid", "This miner's uid (-1 when not registered)",
                         registry=self.registry)
        self.stake = Gauge("niche_miner_stake", "This hotkey's stake (TAO/alpha, as the chain "
                           "reports it)", registry=self.registry)
        self.incentive = Gauge("niche_miner_incentive", "This miner's incentive in [0, 1] "
                               "(last metagraph read)", registry=self.registry)
        self.metagraph_block = Gauge("niche_miner_metagraph_block",
                                     "Block of the last metagraph read", registry=self.registry)
        self.registry.register(GpuMemoryCollector())

    def track(self, queue_depth: Callable[[], float], states_bytes: Callable[[], float]) -> None:
        """Gauges read at scrape time from the live service."""
        self.queue_depth.set_function(queue_depth)
        self.states_bytes.set_function(states_bytes)

    def track_replicas(self, stats: Callable[[], dict[str, int]]) -> None:
        """Replica gauges read at scrape time from the engine (ray backend)."""
        self.registry.register(ReplicaCollector(stats))

    def set_neuron(self, neuron: Neuron | None, block: int) -> None:
        """This miner's own row of the metagraph (None: not registered)."""
        self.metagraph_block.set(block)
        self.registered.set(1 if neuron is not None else 0)
        self.uid.set(neuron.uid if neuron is not None else -1)
        self.stake.set(neuron.stake if neuron is not None else 0.0)
        self.incentive.set(neuron.incentive if neuron is not None else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
