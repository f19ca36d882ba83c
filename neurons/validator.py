"""Thin entry point (pm2, bittensor habits): `python neurons/validator.py --netuid ... `.

Same flags as `niche validator`; everything lives in niche.validator.
"""
from __future__ import annotations

import sys

from niche.cli import main

if __name__ == "__main__":
    sys.exit(main(["validator", *sys.argv[1:]]))
