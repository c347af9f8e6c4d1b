#!/usr/bin/env bash
# The default recipe (configs/default.yaml) for $EPOCHS epochs in-process and with `--workers 2`
# (Ray Train, CPU, gloo), one after the other, then a table of dev WER (greedy, offline and
# 300 + 150 ms chunks, the 8 held-out AN4 speakers) after each epoch and the wall time of each run.
#
# Usage:  scripts/tables/train_recipe_compare.sh [AN4_ROOT] [FSDD_ROOT]     (defaults ../shared/data/an4, ../shared/data/fsdd)
# Env:    EPOCHS (20)  OUT (runs/recipe_compare)  PYTHON (python3)  MODES ("single workers2": the runs, in this order)
# A run that was cut off resumes (`--resume`) when the script is started again; its wall time is
# then the sum of its parts (each part's seconds are appended to OUT/MODE.wall_s).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
AN4=${1:-../shared/data/an4}
FSDD=${2:-../shared/data/fsdd}
EPOCHS=${EPOCHS:-20}
OUT=${OUT:-runs/recipe_compare}
mkdir -p "$OUT"

for mode in ${MODES:-single workers2}; do
    run="$OUT/$mode"
    if [ -f "$OUT/$mode.done" ]; then
        echo "$mode: already finished"
        continue
    fi
    extra=()
    [ "$mode" = workers2 ] && extra+=(--workers 2)
    [ -d "$run" ] && extra+=(--resume)
    echo "$mode: training $EPOCHS epochs into $run (log $OUT/$mode.log)"
    start=$(date +%s)
    "$PY" -m pipeline.cli train --config configs/default.yaml --run-dir "$run" \
        --set "train.epochs=$EPOCHS" --set "data.an4_root=$AN4" --set "data.fsdd_root=$FSDD" "${extra[@]}" \
        >> "$OUT/$mode.log" 2>&1
    echo $(( $(date +%s) - start )) >> "$OUT/$mode.wall_s"
    touch "$OUT/$mode.done"
done

"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {}
for mode in ("single", "workers2"):
    history = json.loads((out / mode / "history.json").read_text())
    wall_s = sum(int(x) for x in (out / f"{mode}.wall_s").read_text().split())
    runs[mode] = (history, wall_s)
print("| epoch | in-process: offline / 300+150 ms WER % | --workers 2: offline / 300+150 ms WER % |")
print("|---|---|---|")
epochs = max(len(h) for h, _ in runs.values())
for e in range(epochs):
    cells = []
    for mode in ("single", "workers2"):
        h = runs[mode][0]
        cells.append(f"{100 * h[e]['dev_wer_greedy']:.1f} / {100 * h[e]['dev_wer_greedy_streaming']:.1f}" if e < len(h) else "-")
    print(f"| {e + 1} | {cells[0]} | {cells[1]} |")
for mode, (h, wall_s) in runs.items():
    best = min(h, key=lambda r: r["dev_wer_greedy_streaming"])
    print(f"{mode}: wall {wall_s / 60:.1f} min, best 300+150 ms dev WER {100 * best['dev_wer_greedy_streaming']:.2f} % "
          f"(epoch {best['epoch']}, offline {100 * best['dev_wer_greedy']:.2f} %)")
summary = {m: {"wall_s": w, "history": h} for m, (h, w) in runs.items()}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
