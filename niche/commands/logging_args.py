"""--logging.debug / --logging.trace / --logging.logging_dir, as bittensor spells them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--logging.debug", dest="debug", action="store_true",
                       help="DEBUG lines from niche")
    group.add_argument("--logging.trace", dest="trace", action="store_true",
                       help="everything, bittensor's transport and websocket frames included")
    group.add_argument("--logging.logging_dir", dest="logging_dir", type=Path, default=None,
                       metavar="DIR", help="also log to DIR/<process>.log (rotated at 10 MB, "
                                           "5 kept; default: stderr only)")


def setup_logging_from_args(args: argparse.Namespace, process: str) -> None:
    from niche.logging_setup import setup_logging

    # progress bars only on a terminal: under pm2 or in a pipe each redraw is a log line
    setup_logging(args.debug, trace=args.trace, logging_dir=args.logging_dir, process=process,
                  progress=sys.stderr.isatty())
