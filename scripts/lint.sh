#!/usr/bin/env bash
# Lint and type-check the package (ruff rules and mypy settings live in pyproject.toml).
# Sets up .venv first if anything is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
echo "[lint] ruff check niche"
.venv/bin/ruff check niche
echo "[lint] mypy (niche/)"
.venv/bin/mypy
