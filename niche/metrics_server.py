"""Prometheus metrics on their own port (miner and validator), bound to 127.0.0.1 unless told
otherwise: the miner's axon port is public, and what a node exposes for its dashboards
(stake, GPU memory, refusals by reason) is nobody else's business."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

from niche.local_server import DEFAULT_HOST, LocalServer, binding

log = logging.getLogger("niche.metrics")


class MetricsServer(LocalServer):
    """A running metrics endpoint: GET http://host:port/metrics."""


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = DEFAULT_HOST
                         ) -> MetricsServer:
    """Serve `registry` on host:port in a daemon thread (port 0: any free port); a busy port
    is a one-line configuration error before minutes of model loading."""
    with binding(host, port, "--metrics.port", "cannot serve metrics on"):
        server, thread = start_http_server(port, addr=host, registry=registry)
    actual = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, actual)
    return MetricsServer(server, thread, host, actual, path="/metrics")

