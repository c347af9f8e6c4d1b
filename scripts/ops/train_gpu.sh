#!/usr/bin/env bash
# Train the default model's recipe on a GPU machine in one command, within a time limit, so a GPU
# is used the minute one is at hand (issue 26). Leaves in OUT_DIR:
#   bundle/     the best epoch's bundle (exported after every epoch that improves dev WER, so a run cut
#               by the time limit still leaves one), with the English lexicon and the 4-gram LM
#   run/        Ray Train checkpoints (continue with RESUME=1), history.json, the split's manifests
#   train.log   everything the run printed; summary.txt: the epoch records and the time taken
#
# Usage:  scripts/ops/train_gpu.sh OUT_DIR
# Env:    PYTHON (python3)  LIMIT_S (540: stops cleanly before 9 minutes)  EPOCHS (30)  LAYERS (4)  HIDDEN (320)
#         BATCH_FRAMES (9600: 4x the CPU batch)  LR (3e-3)  WORKERS (1: GPUs to use)  DEVICE (cuda)
#         RESUME (0)  MAX_STEPS (unset: whole epochs; a number makes a smoke run)  EXTRA (more asr train args)
# Exit:   0 trained (or cut by the limit with a bundle exported); 1 the run failed; 77 DEVICE=cuda but no GPU.
# Smoke run on a CPU machine: DEVICE=cpu EPOCHS=1 MAX_STEPS=2 LAYERS=1 HIDDEN=32 scripts/ops/train_gpu.sh /tmp/t
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT_DIR=${1:?usage: scripts/ops/train_gpu.sh OUT_DIR}
PY=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-540}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "train_gpu: no CUDA GPU visible to torch: nothing was run"
    exit 77
fi

args=(--run-dir "$OUT_DIR/run" --export "$OUT_DIR/bundle" --workers "${WORKERS:-1}"
      --set data.use_speechocean=true --set data.dictionary=cmudict
      --set "model.num_layers=${LAYERS:-4}" --set "model.hidden_size=${HIDDEN:-320}"
      --set "train.epochs=${EPOCHS:-30}" --set "train.learning_rate=${LR:-3e-3}" --set train.warmup_steps=300
      --set "train.max_batch_frames=${BATCH_FRAMES:-9600}" --set train.max_batch_utterances=64
      --set train.augment_prob=0.6 --set train.augment_pad_prob=0.5 --set train.data_feed=ray_data
      --set "train.device=$DEVICE")
[ "$DEVICE" = cuda ] && args+=(--use-gpu --set train.bf16=true)
[ "${RESUME:-0}" = 1 ] && args+=(--resume)
[ -n "${MAX_STEPS:-}" ] && args+=(--max-steps-per-epoch "$MAX_STEPS")
# shellcheck disable=SC2206  # EXTRA is a list of words
[ -n "${EXTRA:-}" ] && args+=($EXTRA)

echo "train_gpu: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'), $(nproc) cores, limit ${LIMIT_S} s, out $OUT_DIR"
start=$(date +%s)
# SIGINT at the limit: the epoch in progress is lost, every finished one is checkpointed and the best exported.
timeout --signal=INT --kill-after=60 "$LIMIT_S" "$PY" -m pipeline.cli train "${args[@]}" > "$OUT_DIR/train.log" 2>&1
rc=$?
elapsed=$(( $(date +%s) - start ))
{
    echo "exit $rc after ${elapsed} s (124: cut by the ${LIMIT_S} s limit)"
    grep '^{"epoch"' "$OUT_DIR/train.log" || echo "no epoch finished"
} | tee "$OUT_DIR/summary.txt"
if [ -f "$OUT_DIR/bundle/config.json" ]; then
    echo "bundle: $OUT_DIR/bundle"
    [ "$rc" = 0 ] || [ "$rc" = 124 ] && exit 0
fi
tail -n 30 "$OUT_DIR/train.log"
exit 1
