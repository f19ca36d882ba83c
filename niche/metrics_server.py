"""Prometheus metrics on their own port (miner and validator), bound to 127.0.0.1 unless told
otherwise: the miner's axon port is public, and what a node exposes for its dashboards
(stake, GPU memory, refusals by reason) is nobody else's business."""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from niche.errors import ConfigError

log = logging.getLogger("niche.metrics")

DEFAULT_HOST = "127.0.0.1"


@dataclass
class MetricsServer:
    """A running metrics endpoint: GET http://host:port/metrics."""

    server: Any
    thread: Any
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def check_port_free(host: str, port: int, flag: str) -> None:
    """Bind host:port once (as the server will, SO_REUSEADDR) and release it: a busy or
    unusable port is a one-line ConfigError now, not after minutes of model loading."""
    import socket

    if not 0 <= port < 65536:
        raise ConfigError(f"{flag} must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"{flag} {port} on {host} is already in use: pick another "
                                  "port") from None
            raise ConfigError(f"{flag}: cannot bind {host}:{port}: "
                              f"{exc.strerror or exc}") from None


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = DEFAULT_HOST
                         ) -> MetricsServer:
    """Serve `registry` on host:port in a daemon thread (port 0: any free port); a busy port
    is a one-line configuration error before minutes of model loading."""
    if not 0 <= port < 65536:
        raise ConfigError(f"--metrics.port must be in 0..65535, got {port}")
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--metrics.port {port} on {host} is already in use: pick "
                              "another port") from None
        raise ConfigError(f"cannot serve metrics on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    actual = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, actual)
    return MetricsServer(server, thread, host, actual)

