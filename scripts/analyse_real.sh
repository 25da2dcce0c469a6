#!/usr/bin/env bash
# Install (if needed), then calibrate the instrument from the real widefield bead stack shipped in
# tests/data/aovift-widefield-bead/ and analyse it with that instrument: out/real/instrument.yaml,
# out/real/WF_150ms.png (data, model, residual, profiles, fit vs phase retrieval), WF_150ms.json.
# --copy-figure: also copy the report to docs/real_data.png (the README's figure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STACK=$PWD/tests/data/aovift-widefield-bead/WF_150ms.tif
FLAGS=(--na 1.0 --immersion-index 1.33 --wavelength-um 0.515 --beam none
       --offset-adu 100 --electrons-per-adu 0.22 --read-noise-e 1.8)
mkdir -p out/real
cd out/real
../../.venv/bin/autoalign calibrate instrument "$STACK" "${FLAGS[@]}" --out instrument.yaml --force
../../.venv/bin/autoalign analyse "$STACK" "${FLAGS[@]}" --out .
cd ../..
if [ "${1:-}" = "--copy-figure" ]; then cp out/real/WF_150ms.png docs/real_data.png; fi
echo "report: out/real/WF_150ms.png, results: out/real/WF_150ms.json, instrument: out/real/instrument.yaml"
