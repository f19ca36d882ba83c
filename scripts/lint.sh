#!/usr/bin/env bash
# Lint the package, its tests, benches and scripts, and type-check the package (ruff rules and mypy settings live in pyproject.toml).
# Sets up .venv first if anything is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
echo "[lint] ruff check niche tests bench scripts"
.venv/bin/ruff check niche tests bench scripts
echo "[lint] mypy (niche/)"
.venv/bin/mypy
