#!/usr/bin/env bash
# Create .venv and install autoalign with its test tools. torch is pinned to the CPU wheel
# that is fast to install here; on a CUDA machine install your torch first and this keeps it.
# One line per step; pip's output is shown only when it fails (without its 'WARNING: Location' noise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
# pip's output goes to a log, shown (without the 'WARNING: Location ... is ignored' lines) only on failure
pip_step() { if ! .venv/bin/python -m pip install -q "$@" >"$LOG" 2>&1; then
  grep -v '^WARNING: Location' "$LOG" >&2; echo "autoalign setup: pip install $* FAILED (output above)" >&2; exit 1; fi; }
step() { echo "autoalign setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then step "creating the virtual environment .venv ..."; "$PY" -m venv .venv; fi
step "updating pip ..."
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  step "installing torch (CPU) ... (a few minutes)"
  pip_step "torch==2.13.0"
fi
step "installing autoalign and test tools ..."
pip_step -e ".[test]"
step "done: run 'source .venv/bin/activate' (then 'autoalign --help'), or call .venv/bin/autoalign directly"
