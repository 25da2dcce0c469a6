#!/usr/bin/env bash
# One time-boxed session on a lent GPU machine (16 cores + one CUDA GPU), end to end:
#   1. simulator throughput on CUDA (and on one CPU thread with CPU_BENCH=1; autoalign benchmark --device);
#   2. sharded generation speed-up, 1 vs 2 worker processes on idle cores (issue 14's >= 1.8x);
#   3. a fresh data set, as many samples as the CPU cores make in GEN_S seconds (one shard per
#      core, reproducible from SEED, combined without copying);
#   4. training on the GPU (data and noise on the device, bf16 autocast), warm-started from WARM,
#      under a wall-clock budget (the cosine schedule ends when the budget does);
#   5. the new and the warm-start model on the same noisy test split (full range and <= 0.5 rad).
# Usage, from the repo root:  BUDGET=480 OUT=/tmp/gpu bash scripts/gpu_session.sh
# Environment: BUDGET (s, whole script), GEN_S (s of data generation), SEED, WARM, DEV (cuda),
# WORKERS (shard processes, default: cores), PY (python3). The package must be importable: when it
# is not, the wheel in .device/ is installed into /tmp/site (the device machine has torch, h5py,
# scipy, yaml, tqdm, matplotlib; no network). Outputs in OUT: log.txt, results.txt (JSON lines),
# model.pt (the exported best model), log.csv, training_curve.png.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-480}; GEN_S=${GEN_S:-230}; SEED=${SEED:-3}; DEV=${DEV:-cuda}
WARM=${WARM:-models/weights/modes5-22_offset.pt}; PY=${PY:-python3}
OUT=${OUT:-/tmp/autoalign-gpu}; WORK=${WORK:-/tmp/autoalign-gpu-work}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$SECONDS
say() { echo "[$((SECONDS - T0)) s] $*"; }
RES=$OUT/results.txt
. scripts/device_env.sh
AA=("$PY" -m autoalign.app.cli)
CORES=$(nproc); WORKERS=${WORKERS:-$CORES}
say "machine: $CORES cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

say "1. simulator throughput on $DEV${CPU_BENCH:+ and on 1 CPU thread}"
for spec in "$DEV ${GPU_BATCH:-4096}" ${CPU_BENCH:+"cpu 256"}; do
  set -- $spec
  if "${AA[@]}" benchmark --device "$1" --batch "$2" --repeats 3 --threads 1 --skip-model --json > "$WORK/bench.json"; then
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1]))['simulator']; d['what']='simulator'; print(json.dumps(d))" \
      "$WORK/bench.json" | tee -a "$RES"
  fi
done

say "2. sharded generation speed-up, 1 vs 2 workers"
"$PY" - <<'PY' | tee -a "$RES"
import json
from autoalign.models.benchmark import sharding_benchmark
r = sharding_benchmark(1024, 2)
r["what"] = "sharding"
print(json.dumps(r))
PY
RATE=$("$PY" -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if '\"sharding\"' in l][-1]['samples_per_s_one'])" "$RES" 2>/dev/null || echo 60)

# 3. data: WORKERS shards, COUNT from the measured one-worker rate (80 % of what GEN_S allows, whole chunks)
COUNT=$("$PY" -c "import sys; r,w,g=map(float,sys.argv[1:]); n=int(0.8*r*w*g)//(128*int(w))*128*int(w); print(max(n,128*int(w)))" \
  "$RATE" "$WORKERS" "$GEN_S")
DATA=$WORK/gpu_seed$SEED.h5
say "3. generating $COUNT samples (seed $SEED) in $WORKERS shards (one-worker rate $RATE samples/s)"
t_gen=$SECONDS
for i in $(seq 0 $((WORKERS - 1))); do
  echo "$i/$WORKERS"
done | OMP_NUM_THREADS=1 xargs -P "$WORKERS" -I{} "${AA[@]}" simulate --count "$COUNT" --seed "$SEED" --shard {} --out "$DATA" --quiet --force \
  > "$WORK/simulate.log" 2>&1 || { tail -20 "$WORK/simulate.log"; say "generation failed"; exit 4; }
"${AA[@]}" simulate --combine "$WORKERS" --out "$DATA" || exit 4
GEN_WALL=$((SECONDS - t_gen))
echo "{\"what\": \"generation\", \"count\": $COUNT, \"workers\": $WORKERS, \"seconds\": $GEN_WALL}" | tee -a "$RES"

LEFT=$((BUDGET - (SECONDS - T0) - 70))
MIN=$("$PY" -c "print(max(0.5, $LEFT / 60))")
say "4. training on $DEV for $MIN min (warm start $WARM)"
"${AA[@]}" train --data "$DATA" --out "$WORK/run" --arch ResNet --epochs 200 --batch 256 --lr 1e-3 --seed 0 \
  --offset --warm-start "$WARM" --max-minutes "$MIN" --data-on-device --device "$DEV" --no-tensorboard --quiet \
  --export "$OUT/model.pt" || say "training failed"
cp "$WORK/run/log.csv" "$WORK/run/training_curve.png" "$OUT/" 2>/dev/null

say "5. evaluation on the test split ($((COUNT / 10)) samples), new vs warm start"
for ck in "$OUT/model.pt" "$WARM"; do
  for cap in "" "--max-true-rms 0.5"; do
    # shellcheck disable=SC2086
    "${AA[@]}" evaluate --checkpoint "$ck" --data "$DATA" --resimulate 0 --json $cap > "$WORK/eval.json" 2>"$WORK/eval.err" \
      && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop('targets', None); d['what']='evaluate'; d['checkpoint']=sys.argv[2]; d['cap']=sys.argv[3]; print(json.dumps(d))" \
        "$WORK/eval.json" "$ck" "${cap:-none}" | tee -a "$RES" || tail -5 "$WORK/eval.err"
  done
done
say "done"
