#!/usr/bin/env bash
# FSDD leave-one-speaker-out: for each of the five speakers, train on the other four
# (FSDD only, `data.use_an4=false`), then evaluate the held-out one offline and streaming
# at 300 + 150 ms (beam + LM). No epoch is picked on the held-out speaker: with no AN4
# dev set the exported epoch is the one with the lowest training loss.
#
# Usage: scripts/tables/fsdd_loso.sh [OUT_DIR] [FSDD_ROOT] [asr train --set overrides...]
#   e.g. scripts/tables/fsdd_loso.sh runs/fsdd_loso ../shared/data/fsdd train.epochs=12 model.hidden_size=128
set -euo pipefail
OUT=${1:-runs/fsdd_loso}
FSDD=${2:-../shared/data/fsdd}
shift $(( $# < 2 ? $# : 2 ))
SETS=()
for s in "$@"; do SETS+=(--set "$s"); done
mkdir -p "$OUT"
for spk in george jackson nicolas theo yweweler; do
  run="$OUT/$spk"
  if [ ! -s "$run/bundle/config.json" ] || [ ! -s "$run/history.json" ]; then
    cmd=(asr train --run-dir "$run" --set data.use_an4=false --set "data.fsdd_root=$FSDD" --set "data.fsdd_dev_speakers=[$spk]" "${SETS[@]}")
    echo "+ ${cmd[*]}" | tee "$OUT/$spk.train.cmd"
    "${cmd[@]}" > "$OUT/$spk.train.log" 2>&1 || { tail -5 "$OUT/$spk.train.log"; exit 1; }
  fi
  for mode in offline streaming; do
    cmd=(asr eval "$FSDD" --speakers "$spk" --model "$run/bundle" --decoder beam --mode "$mode" --worst 0 --json "$OUT/$spk.$mode.json")
    [ "$mode" = streaming ] && cmd+=(--chunk-ms 300 --lookahead-ms 150)
    echo "+ ${cmd[*]}" | tee "$OUT/$spk.$mode.cmd"
    "${cmd[@]}" 2>/dev/null | sed -n 2p
  done
done
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| held-out FSDD speaker | offline WER % | streaming 300 + 150 ms WER % | utterances |")
print("|---|---|---|---|")
rows = []
for spk in ("george", "jackson", "nicolas", "theo", "yweweler"):
    off, st = (json.loads((out / f"{spk}.{m}.json").read_text()) for m in ("offline", "streaming"))
    rows.append((off["wer"], st["wer"]))
    print(f"| {spk} | {100 * off['wer']:.1f} | {100 * st['wer']:.1f} | {off['utterances']} |")
print(f"| mean | {100 * sum(r[0] for r in rows) / 5:.1f} | {100 * sum(r[1] for r in rows) / 5:.1f} | |")
PY
