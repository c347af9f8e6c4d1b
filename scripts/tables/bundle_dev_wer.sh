#!/usr/bin/env bash
# A candidate model's headline dev figures, beam + LM unless marked: AN4 offline and streaming (300 + 150 ms,
# endpointing), greedy, FSDD's held-out speaker, speechocean762's dev speakers offline and streaming.
# Usage: scripts/tables/bundle_dev_wer.sh BUNDLE OUT_DIR [DATA_ROOT]   (one JSON, .cmd and .log per row in OUT_DIR)
set -euo pipefail
BUNDLE=$1; OUT=$2; DATA=${3:-../shared/data}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {
  local name=$1; shift
  echo "+ asr eval $* --model $BUNDLE" | tee "$OUT/$name.cmd" >/dev/null
  asr eval "$@" --model "$BUNDLE" --worst 0 --json "$OUT/$name.json" 2>"$OUT/$name.log" | grep "^WER" | sed "s/^/$name: /"
}
run an4_offline_beam        "$DATA/an4" --split dev --decoder beam
run an4_streaming_beam      "$DATA/an4" --split dev --decoder beam --mode streaming
run an4_offline_greedy      "$DATA/an4" --split dev --decoder greedy
run an4_streaming_greedy    "$DATA/an4" --split dev --decoder greedy --mode streaming
run fsdd_offline_beam       "$DATA/fsdd" --split dev --decoder beam
run speechocean_offline_beam   "$DATA/speechocean762" --split dev --decoder beam
run speechocean_streaming_beam "$DATA/speechocean762" --split dev --decoder beam --mode streaming
