#!/usr/bin/env bash
# Run the whole test suite; sets up .venv (and pm2) first if anything is missing.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k miner`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
