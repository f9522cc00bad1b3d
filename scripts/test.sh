#!/usr/bin/env bash
# Set up the environment on first use, then lint (style, imports) and run the test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh ruff check src tests benchmarks
bash scripts/env.sh ruff format --check src tests benchmarks
# Imports point down the pipeline: the contract in pyproject.toml.
PYTHONPATH=src bash scripts/env.sh lint-imports --no-cache
exec bash scripts/env.sh python -m pytest "$@"
