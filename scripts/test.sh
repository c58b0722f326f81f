#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on a CPU-only machine.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q -c constraints.txt -e ".[dev,bench,integrations]"
ruff check src tests benchmarks examples
ruff format --check src tests benchmarks examples
python -m pytest -q "$@"
