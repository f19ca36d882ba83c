"""--metrics.port / --metrics.host, shared by the miner and the validator."""
from __future__ import annotations

import argparse
from typing import Any

from niche.local_server import DEFAULT_HOST


def add_metrics_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument("--metrics.port", dest="metrics_port", type=int, default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                            "(default: off; the axon port never serves them)")
    group.add_argument("--metrics.host", dest="metrics_host", default=DEFAULT_HOST,
                       help=f"interface for --metrics.port (default {DEFAULT_HOST}: this "
                            "machine only)")


def metrics_server_from_args(args: argparse.Namespace, registry: Any):
    """The started metrics server, or None when --metrics.port is not given."""
    if args.metrics_port is None:
        return None
    from niche.metrics_server import start_metrics_server

    return start_metrics_server(registry, args.metrics_port, args.metrics_host)


def check_metrics_port(args: argparse.Namespace) -> None:
    """Bind --metrics.port once and let go: a busy port is a one-line configuration error
    (exit 2) before the chain is asked and the models load (minutes on a GPU box)."""
    if getattr(args, "metrics_port", None) is None:
        return
    from niche.local_server import check_port_free

    check_port_free(args.metrics_host, args.metrics_port, "--metrics.port")
