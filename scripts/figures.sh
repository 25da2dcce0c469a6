#!/usr/bin/env bash
# Regenerate every figure and table that README.md shows, with the commands the README names.
#   bash scripts/figures.sh quick   # the PNGs (donuts, GUI screenshot): ~2 min
#   bash scripts/figures.sh loop    # + the loop tables of the shipped model (corrector "model"): ~25 min
#   bash scripts/figures.sh refined # + the same rows with the default corrector (refined): ~45 min
#   bash scripts/figures.sh all     # + the refined rows, baselines, refinement, model evaluation: hours on 2 cores
# Outputs: docs/*.png, and the tables as text in out/figures/ (copy the numbers into README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/autoalign
PY=.venv/bin/python
mkdir -p out/figures
$A report --out docs/donuts.png --force
QT_QPA_PLATFORM=offscreen $A gui --sim --screenshot docs/screenshot.png --auto-align 3
[ "${1:-quick}" = "quick" ] && exit 0
# the closed loop with hidden errors (README "The closed loop"), shipped model (and refined: all)
ROWS=("--aberration-rms 0.7:1.0" "--mask-offset 0.06 --aberration-rms 0.5" "--mask-offset 0.10 --aberration-rms 0.5"
      "--aberration-rms 1.6:2.0" "--higher-order-rms 0.25 --higher-order-max-noll 22 --aberration-rms 0.6"
      "--higher-order-rms 0.25 --aberration-rms 0.6" "--bead-offset 1.2"
      "--bead-offset 0.8 --bead-offset-z 1.2" "--photons 200 --drift 0.05"
      "--wrong-hand 0.005 --aberration-rms 0.7:1.0" "--wrong-hand 0.02 --aberration-rms 0.7:1.0"
      "--slm-stroke 0.8 --aberration-rms 0.8" "--camera-orientation rot180 --aberration-rms 0.6"
      "--true-instrument 1.02,1.01,1.05 --aberration-rms 0.7:1.0" "--true-instrument 0.98,0.99,0.95 --aberration-rms 0.7:1.0")
if [ "$1" = "refined" ]; then  # the default corrector's rows (README "The closed loop"): ~45 min
  for flags in "${ROWS[@]}"; do
    case "$flags" in --slm-stroke*) flags="--settings scripts/fit_slm_scale_settings.yaml $flags";; esac
    echo "=== refined $flags"
    # shellcheck disable=SC2086
    $A align --backend sim --trials 6 --seed 1000 --corrector refined $flags
  done > out/figures/loop_tables_refined.txt 2>/dev/null
  $PY benchmarks/higher_order_split.py --trials 6 --corrector refined > out/figures/higher_order_split_refined.txt 2>/dev/null
  for flags in "--true-instrument 1.0,1.0,1.02" "--true-instrument 1.01,1.0,1.0"; do  # one factor at a time
    echo "=== refined $flags"
    # shellcheck disable=SC2086
    $A align --backend sim --trials 6 --seed 1000 --corrector refined $flags --aberration-rms 0.7:1.0
  done > out/figures/true_instrument_single.txt 2>/dev/null
  exit 0
fi
if [ "$1" = "loop" ]; then
  for flags in "${ROWS[@]}"; do
    echo "=== model $flags"
    # shellcheck disable=SC2086
    $A align --backend sim --trials 6 --seed 1000 --corrector model $flags
  done > out/figures/loop_tables_model.txt 2>/dev/null
  $PY benchmarks/higher_order_split.py --trials 6 --corrector model > out/figures/higher_order_split.txt 2>/dev/null
  exit 0
fi
for flags in "${ROWS[@]}"; do
  for corrector in model refined; do
    echo "=== $corrector $flags"
    # shellcheck disable=SC2086
    $A align --backend sim --trials 6 --seed 1000 --corrector $corrector $flags
  done
done > out/figures/loop_tables.txt
$PY benchmarks/refine_benchmark.py --trials 8 > out/figures/refine_benchmark.txt
$PY benchmarks/refined_loop.py --trials 4 --iterations 3 --seed 100 > out/figures/refined_loop.txt
$PY benchmarks/loop_vs_baseline.py --trials 8 --seed 200 --baseline-rounds 12 --json out/loop_vs_baseline_s200.json
$PY benchmarks/loop_vs_baseline.py --trials 8 --seed 208 --baseline-rounds 12 --json out/loop_vs_baseline_s208.json
$PY benchmarks/loop_vs_baseline.py --combine out/loop_vs_baseline_s200.json out/loop_vs_baseline_s208.json \
  > out/figures/loop_vs_baseline.txt
$A benchmark --threads 1 --repeats 5 > out/figures/benchmark.txt
$A simulate --count 2400 --seed 2 --workers 2 --out data/fresh_eval.h5 --force
for ckpt in models/weights/default.pt models/weights/modes5-22_offset.pt; do
  $A evaluate --checkpoint "$ckpt" --data data/fresh_eval.h5 --split train
done > out/figures/evaluate.txt
