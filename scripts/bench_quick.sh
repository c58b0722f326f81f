#!/usr/bin/env bash
# The README's main job: set up (idempotent), make sure Fashion-MNIST is present, then compare
# arturo, adam and sgd on a Fashion-MNIST subset (about 2 minutes on a 2-core CPU).
# Usage: bash scripts/bench_quick.sh [extra `arturo-bench run` flags, e.g. --device cuda]
# Re-running resumes (a finished run just prints its table); delete runs/fmnist_cnn-quick to redo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q -c constraints.txt -e ".[bench]"

have_data() { arturo-bench data info fmnist >/dev/null 2>&1; }
if ! have_data; then
  # Debian/Ubuntu ship the original files (no download); elsewhere fetch the official ones.
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q dataset-fashion-mnist \
      || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; } \
      || echo "apt-get could not install dataset-fashion-mnist; downloading instead"
  fi
  have_data || arturo-bench data fetch fashion-mnist
fi

arturo-bench run --quick --out runs "$@"
arturo-bench report runs/fmnist_cnn-quick --out runs/report-quick
