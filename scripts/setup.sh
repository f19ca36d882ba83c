#!/usr/bin/env bash
# Set up niche on a fresh machine: a virtual environment in .venv with everything installed.
# Idempotent: run it again and it only installs what is missing.
#   NICHE_TORCH=cuda bash scripts/setup.sh   keeps pip's default (CUDA) torch for GPU boxes
#                                            and pins every library to constraints/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
CONSTRAINTS=()
if [ "${NICHE_TORCH:-cpu}" != "cpu" ]; then
    CONSTRAINTS=(-c constraints/gpu.txt)  # the versions the calibration was measured on
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ "${NICHE_TORCH:-cpu}" = "cpu" ]; then
        echo "[setup] installing the CPU build of torch first (no CUDA download)"
        $PIP install --quiet "torch==2.13.0" || $PIP install --quiet torch --index-url https://download.pytorch.org/whl/cpu
    else
        echo "[setup] installing pip's default torch build"
        $PIP install --quiet "${CONSTRAINTS[@]}" torch
    fi
fi
if ! .venv/bin/python -c "import niche, diffusers, bittensor, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.niche-installed ]; then
    echo "[setup] installing niche and its dev and ray extras"
    # torch pinned to the installed build, so resolving ray[serve] never swaps it for another
    $PIP install --quiet "${CONSTRAINTS[@]}" -e ".[dev,ray]" "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
    touch .venv/.niche-installed
fi
if [ ! -x node_modules/.bin/pm2 ] && command -v npm >/dev/null 2>&1; then
    echo "[setup] installing pm2 (package-lock.json) into ./node_modules"
    # `npm ci` installs exactly the lock and never rewrites it: the checkout stays clean
    # (scripts/auto_update.sh refuses to update a dirty one)
    npm ci --silent --no-audit --no-fund >/dev/null 2>&1 \
        || echo "[setup] npm ci failed; the pm2 test will be skipped with this reason"
fi
echo "[setup] done: activate with 'source .venv/bin/activate'"
