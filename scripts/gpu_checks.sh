#!/usr/bin/env bash
# Short checks on a lent GPU machine (16 idle cores + one CUDA GPU), each step time-limited:
#   1. the simulator on CUDA: throughput, error against brute-force quadrature, difference to the CPU;
#   2. against psf-generator (benchmarks/peer_psf_generator.py) on CUDA and on 2 idle CPU threads;
#   3. sharded generation, 1 vs 2 worker processes on idle cores.
# Usage, from the repo root: bash scripts/gpu_checks.sh   (the wheels of autoalign, psf-generator and
# zernikepy in .device/ are installed into /tmp/site when autoalign is not importable; no network there)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
. scripts/device_env.sh
T0=$SECONDS
say() { echo "[$((SECONDS - T0)) s] $*"; }
say "1. simulator on ${DEV:-cuda}"
timeout 45 "$PY" -m autoalign.app.cli benchmark --device "${DEV:-cuda}" --batch 4096 --repeats 3 --threads 1 --skip-model
say "2a. psf-generator comparison on ${DEV:-cuda}"
timeout 75 "$PY" benchmarks/peer_psf_generator.py --device "${DEV:-cuda}" --batch 1024
say "2b. psf-generator comparison on 2 CPU threads"
timeout 75 "$PY" benchmarks/peer_psf_generator.py --device cpu --threads 2
say "3. sharded generation"
timeout 70 "$PY" -m autoalign.models.benchmark --sharding 2048 --workers 2
say "done"
