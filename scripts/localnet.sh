#!/usr/bin/env bash
# Run the whole subnet on this machine (local chain, miners, a validator); sets up .venv first.
# Extra arguments go to `niche localnet`, e.g. `bash scripts/localnet.sh --miners 3 --rounds 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/niche localnet "$@"
