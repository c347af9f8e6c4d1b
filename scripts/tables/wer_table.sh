#!/usr/bin/env bash
# The dev-speaker WER table of the README: every row is one `asr eval` run on the AN4
# speakers held out from training (configs/default.yaml data.an4_dev_speakers), plus the
# held-out FSDD speaker. Usage: scripts/tables/wer_table.sh [AN4_ROOT] [FSDD_ROOT] [OUT_DIR]
set -euo pipefail
AN4=${1:-../shared/data/an4}
FSDD=${2:-../shared/data/fsdd}
OUT=${3:-runs/wer_table}
mkdir -p "$OUT"
run() { local name=$1; shift; echo "+ asr eval $*" | tee "$OUT/$name.cmd"; asr eval "$@" --worst 0 --json "$OUT/$name.json" | tail -n +2 | head -2; }
run an4_offline_greedy  "$AN4" --split dev --mode offline --decoder greedy
run an4_offline_beam    "$AN4" --split dev --mode offline --decoder beam
for point in "60 30" "150 60" "150 150" "300 150" "480 300"; do
  set -- $point
  run "an4_stream_${1}_${2}_greedy" "$AN4" --split dev --mode streaming --decoder greedy --chunk-ms "$1" --lookahead-ms "$2"
  run "an4_stream_${1}_${2}_beam"   "$AN4" --split dev --mode streaming --decoder beam   --chunk-ms "$1" --lookahead-ms "$2"
done
run fsdd_offline_beam   "$FSDD" --split dev --mode offline --decoder beam
run fsdd_stream_300_150_beam "$FSDD" --split dev --mode streaming --decoder beam --chunk-ms 300 --lookahead-ms 150
python - "$OUT" <<'PY'
import json, sys, pathlib
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text()); s = r["settings"]
    rows.append((p.stem, s["mode"], s["decoder"], s["algorithmic_latency_ms"], 100 * r["wer"], 100 * r["cer"], r["utterances"], r["real_time_factor"]))
print("| run | mode | decoder | latency (chunk+lookahead) ms | WER % | CER % | utts | RTF |")
print("|---|---|---|---|---|---|---|---|")
for name, mode, dec, lat, wer, cer, n, rtf in rows:
    print(f"| {name} | {mode} | {dec} | {'full utterance' if lat is None else f'{lat:.0f}'} | {wer:.1f} | {cer:.1f} | {n} | {rtf:.3f} |")
PY
