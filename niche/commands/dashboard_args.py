"""--dashboard.port / --dashboard.host of `niche validator` (niche/validator/dashboard.py)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from niche.validator.dashboard import DEFAULT_HOST


def add_dashboard_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dashboard")
    group.add_argument("--dashboard.port", dest="dashboard_port", type=int, default=None,
                       help="serve the subnet dashboard (miners, verified rates, latencies, "
                            "scores, weights, failures, rounds) at http://HOST:PORT/ "
                            "(default: off)")
    group.add_argument("--dashboard.host", dest="dashboard_host", default=DEFAULT_HOST,
                       help=f"interface for --dashboard.port (default {DEFAULT_HOST}: this "
                            "machine only)")


def dashboard_from_args(args: argparse.Namespace, state_path: Path) -> Any:
    """The started dashboard, or None when --dashboard.port is not given."""
    if getattr(args, "dashboard_port", None) is None:
        return None
    from niche.validator.dashboard import start_dashboard

    return start_dashboard(state_path, args.dashboard_port, args.dashboard_host)
