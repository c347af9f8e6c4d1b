#!/usr/bin/env bash
# The README's robustness table: the held-out AN4 dev speakers (configs/default.yaml
# data.an4_dev_speakers) under each degradation of `asr eval --perturb`, offline and
# streaming at 300 + 150 ms, beam search + LM. Every cell is one `asr eval` command,
# written beside its JSON report in OUT_DIR; the table goes to OUT_DIR/table.md.
#
# Usage: scripts/tables/robustness_table.sh [MODEL_DIR] [OUT_DIR] [AN4_ROOT] [extra asr eval options...]
#   e.g. scripts/tables/robustness_table.sh models/default runs/robustness/new
#        scripts/tables/robustness_table.sh runs/prev_model runs/robustness/prev ../shared/data/an4 --no-vad
set -euo pipefail
MODEL=${1:-models/default}
OUT=${2:-runs/robustness/$(basename "$MODEL")}
AN4=${3:-../shared/data/an4}
shift $(( $# < 3 ? $# : 3 ))
EXTRA=("$@")
mkdir -p "$OUT"

CONDITIONS=(
  "clean|"
  "gain_-20dB|--perturb gain_db=-20"
  "gain_-35dB|--perturb gain_db=-35"
  "gain_+10dB_clipped|--perturb gain_db=10"
  "telephone_8kHz|--perturb rate_hz=8000"
  "white_noise_20dB|--perturb noise_snr_db=20"
  "white_noise_10dB|--perturb noise_snr_db=10"
  "babble_10dB|--perturb babble_snr_db=10"
  "reverb_rt60_0.5s|--perturb reverb_rt60_s=0.5"
  "silence_5s|--perturb silence_s=5 --limit 20"
  "faint_noise_5s|--perturb silence_s=5 --perturb noise_dbfs=-60 --limit 20"
)
MODES=("offline|--mode offline" "stream_300_150|--mode streaming --chunk-ms 300 --lookahead-ms 150")

: > "$OUT/conditions.txt"
for cond in "${CONDITIONS[@]}"; do
  name=${cond%%|*}; args=${cond#*|}
  echo "$name" >> "$OUT/conditions.txt"
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then continue; fi  # ONLY=regex: run a subset (e.g. two halves in parallel)
  for mode in "${MODES[@]}"; do
    mname=${mode%%|*}; margs=${mode#*|}
    # shellcheck disable=SC2086
    cmd=(asr eval "$AN4" --split dev --decoder beam --model "$MODEL" $margs $args "${EXTRA[@]}" --worst 0 --json "$OUT/${name}__${mname}.json")
    if [ -s "$OUT/${name}__${mname}.json" ] && [ -z "${FORCE:-}" ]; then
      echo "= $OUT/${name}__${mname}.json exists (FORCE=1 reruns it)"; continue
    fi
    echo "+ ${cmd[*]}" | tee "$OUT/${name}__${mname}.cmd"
    "${cmd[@]}" 2>/dev/null | sed -n 2p
  done
done

[ -n "${ONLY:-}" ] && exit 0  # a subset run: the table needs every cell
python - "$OUT" "$MODEL" <<'PY'
import json, math, pathlib, sys
out, model = pathlib.Path(sys.argv[1]), sys.argv[2]
def cell(name, mode):
    r = json.loads((out / f"{name}__{mode}.json").read_text())
    return r
conds = (out / "conditions.txt").read_text().split()
lines = [f"Model `{model}`; WER % (x clean) on the AN4 dev speakers, beam + LM. Silence rows: words recognised in 20 files.", "",
         "| condition | offline | streaming 300 + 150 ms |", "|---|---|---|"]
clean = {m: cell("clean", m)["wer"] for m in ("offline", "stream_300_150")}
for name in conds:
    row = [name.replace("_", " ")]
    for m in ("offline", "stream_300_150"):
        r = cell(name, m)
        if r["reference_words"]:
            row.append(f"{100 * r['wer']:.1f} ({r['wer'] / clean[m]:.2f}x)")
        else:
            row.append(f"{r['hypothesis_words']} words in {r['files_with_words']} of {r['utterances']} files")
    lines.append("| " + " | ".join(row) + " |")
table = "\n".join(lines)
(out / "table.md").write_text(table + "\n")
print(table)
PY
