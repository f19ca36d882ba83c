"""`niche`: one command line for every job. Flags follow bittensor's dotted convention.

Each subcommand lives in niche/commands/<name>.py with `register(subparsers)`; they are
imported lazily so `niche --help` starts fast and a broken optional piece names itself.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from niche import __version__

COMMAND_MODULES = ("models", "generate", "verify", "bench", "chain", "miner", "validator",
                   "localnet", "gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="niche",
        description="Node for an image-generation subnet: run a miner, a validator, "
        "or the whole subnet on one machine (`niche localnet`).",
        epilog="examples:\n"
        "  niche localnet --miners 3 --rounds 2          the whole subnet on this machine\n"
        "  niche generate --tiny --model kolors --prompt 'a red circle' --seed 7 --out a.png\n"
        "  niche miner --netuid NETUID --wallet.name miner --subtensor.network finney "
        "--axon.port 8091 --axon.external_ip 203.0.113.7 --model flux-schnell\n"
        "  niche validator --netuid NETUID --wallet.name validator --subtensor.network finney "
        "--dashboard.port 8095\n"
        "  (NETUID: a subnet whose validators run niche; a niche miner earns only from them)\n"
        "\n`niche COMMAND --help` lists every flag of a command; docs/ has the guides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"niche {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"niche.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from niche.errors import NicheError

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a closed pipe (`| head`) is handled below
        return code
    except BrokenPipeError:
        # the reader went away (`niche validator status --json | head`): not an error of
        # ours; point stdout at /dev/null so the interpreter's final flush stays quiet too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    except NicheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
