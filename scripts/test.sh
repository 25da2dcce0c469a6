#!/usr/bin/env bash
# Install (if needed) and run the default test suite (slow tests excluded: run with -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_QPA_PLATFORM=offscreen
.venv/bin/python -m pytest -q "$@"
