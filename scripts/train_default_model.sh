#!/usr/bin/env bash
# Reproduce the shipped aberration model: data generation + training, resumable.
# Re-running after an interruption continues where it stopped: finished data shards are kept
# (each shard is written atomically), training resumes from RUN/last.pt (model, optimizer,
# schedule, epoch; exactly as an uninterrupted run).
#   scripts/train_default_model.sh [COUNT] [EPOCHS] [SHARDS]   (defaults 100000 8 8)
# Environment: DATA (data/train100k.h5), RUN (runs/default), WORKERS (2 shard processes at a
# time), THREADS (1 torch thread: a shared 2-core machine), WARM (models/weights/default.pt;
# empty for none), TORCHRUN_NPROC (unset: one process; N: torchrun DDP with N ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-100000}; EPOCHS=${2:-8}; SHARDS=${3:-8}
DATA=${DATA:-data/train100k.h5}; RUN=${RUN:-runs/default}
WORKERS=${WORKERS:-2}; THREADS=${THREADS:-1}; WARM=${WARM-models/weights/default.pt}
AA=${AA:-.venv/bin/autoalign}
if [ ! -f "$DATA" ]; then
  stem="${DATA%.h5}"
  for i in $(seq 0 $((SHARDS - 1))); do
    shard=$(printf "%s.shard-%04d-of-%04d.h5" "$stem" "$i" "$SHARDS")
    if [ ! -f "$shard" ]; then
      echo "$AA simulate --count $COUNT --seed 1 --shard $i/$SHARDS --out $DATA --quiet --force"
    fi
  done | xargs -P "$WORKERS" -I{} sh -c '{}'
  "$AA" simulate --combine "$SHARDS" --out "$DATA"
fi
args=(train --data "$DATA" --out "$RUN" --arch ResNet --epochs "$EPOCHS" --batch 64 --lr 1e-3 --seed 0
      --threads "$THREADS" --no-tensorboard --offset)
if [ -f "$RUN/last.pt" ]; then
  args+=(--resume "$RUN/last.pt")
elif [ -n "$WARM" ]; then
  args+=(--warm-start "$WARM")
fi
if [ -n "${TORCHRUN_NPROC:-}" ]; then
  exec .venv/bin/torchrun --standalone --nproc_per_node "$TORCHRUN_NPROC" "$AA" "${args[@]}"
fi
exec "$AA" "${args[@]}"
