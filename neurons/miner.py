"""Thin entry point (pm2, bittensor habits): `python neurons/miner.py --netuid ...`.

Same flags as `niche miner`; everything lives in niche.miner.
"""
from __future__ import annotations

import sys

from niche.cli import main

if __name__ == "__main__":
    sys.exit(main(["miner", *sys.argv[1:]]))
