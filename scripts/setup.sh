#!/usr/bin/env bash
# Set up niche on a fresh machine: a virtual environment in .venv with everything installed.
# Idempotent: run it again and it only installs what is missing.
#   NICHE_TORCH=cuda bash scripts/setup.sh   keeps pip's default (CUDA) torch for GPU boxes
#                                            and pins every library to constraints/gpu.txt;
#                                            after a CPU set-up it replaces the CPU build of
#                                            torch and reinstalls with those pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
WANT="${NICHE_TORCH:-cpu}"
CONSTRAINTS=()
if [ "$WANT" != "cpu" ]; then
    CONSTRAINTS=(-c constraints/gpu.txt)  # the versions the calibration was measured on
fi
# the torch in .venv: none, cpu (torch.version.cuda is None) or cuda
INSTALLED="$(.venv/bin/python -c 'import torch; print("cpu" if torch.version.cuda is None else "cuda")' 2>/dev/null || echo none)"
REINSTALL_NICHE=0
if [ "$INSTALLED" = "none" ]; then
    if [ "$WANT" = "cpu" ]; then
        echo "[setup] installing the CPU build of torch first (no CUDA download)"
        $PIP install --quiet "torch==2.13.0" || $PIP install --quiet torch --index-url https://download.pytorch.org/whl/cpu
    else
        echo "[setup] installing pip's default torch build"
        $PIP install --quiet "${CONSTRAINTS[@]}" torch
    fi
elif [ "$WANT" != "cpu" ] && [ "$INSTALLED" = "cpu" ]; then
    # a CPU set-up run again for a GPU: pip would keep the CPU build (same version number)
    echo "[setup] NICHE_TORCH=$WANT: replacing the CPU build of torch" \
         "($(.venv/bin/python -c 'import torch; print(torch.__version__)')) with pip's default" \
         "(CUDA) build, pinned to constraints/gpu.txt"
    $PIP uninstall --quiet --yes torch
    $PIP install --quiet "${CONSTRAINTS[@]}" torch
    REINSTALL_NICHE=1  # and every library pinned to the same constraints
elif [ "$WANT" = "cpu" ] && [ "$INSTALLED" = "cuda" ]; then
    echo "[setup] keeping the CUDA build of torch already in .venv"
fi
# the marker records the constraints of the last install (gpu or none): a GPU run after a
# CPU set-up reinstalls niche's libraries with constraints/gpu.txt
MARKER=.venv/.niche-installed
PINNED="none"
if [ "$WANT" != "cpu" ]; then
    PINNED="gpu"
fi
if [ "$PINNED" = "gpu" ] && [ "$(cat "$MARKER" 2>/dev/null || true)" != "gpu" ] \
   && [ "$REINSTALL_NICHE" = 0 ] && [ -e "$MARKER" ]; then
    echo "[setup] NICHE_TORCH=$WANT: reinstalling niche's libraries pinned to constraints/gpu.txt"
    REINSTALL_NICHE=1
fi
if [ "$REINSTALL_NICHE" = 1 ] \
   || ! .venv/bin/python -c "import niche, diffusers, bittensor, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$MARKER" ]; then
    echo "[setup] installing niche and its dev and ray extras"
    # torch pinned to the installed build, so resolving ray[serve] never swaps it for another
    $PIP install --quiet "${CONSTRAINTS[@]}" -e ".[dev,ray]" "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
    echo "$PINNED" > "$MARKER"
fi
if [ ! -x node_modules/.bin/pm2 ] && command -v npm >/dev/null 2>&1; then
    echo "[setup] installing pm2 (package-lock.json) into ./node_modules"
    # `npm ci` installs exactly the lock and never rewrites it: the checkout stays clean
    # (scripts/auto_update.sh refuses to update a dirty one)
    npm ci --silent --no-audit --no-fund >/dev/null 2>&1 \
        || echo "[setup] npm ci failed; the pm2 test will be skipped with this reason"
fi
echo "[setup] done: activate with 'source .venv/bin/activate'"
