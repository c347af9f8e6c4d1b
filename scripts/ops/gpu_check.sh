#!/usr/bin/env bash
# The GPU path in one command, for anyone with a CUDA GPU (a few minutes):
#   1. the CUDA tests (tests/integration/test_cuda.py): the shipped model on the GPU gives the CPU's
#      transcripts in-process, chunked streaming, through the streaming actors and the Ray Data job;
#   2. `asr bench` with the acoustic model on the GPU: batch in-process and through Ray Data
#      (RTFx, and RTFx per stage so the limiting stage shows) and real-time streams at $STREAMS;
#   3. a summary of the figures. The whole JSON: $OUT_DIR/gpu_bench.json, logs beside it.
#
# Usage:  scripts/ops/gpu_check.sh [CORPUS]        (default ../shared/data/an4)
# Env:    PYTHON (python3)  BATCH_SECONDS (2400)  BATCH_ACTORS (cores / 2)  STREAMS ("32 64 128")
#         STREAM_SECONDS (10)  DECODER_ACTORS (cores / 2)  MAX_P95_MS (100)  OUT_DIR (runs/gpu_check)
# Exit:   0 all ran and passed; 1 a CUDA test or the bench failed; 77 no CUDA GPU visible (nothing run).
set -uo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
CORPUS=${1:-../shared/data/an4}
OUT_DIR=${OUT_DIR:-runs/gpu_check}
CORES=$(nproc)
HALF=$(( CORES / 2 > 1 ? CORES / 2 : 1 ))
BATCH_SECONDS=${BATCH_SECONDS:-2400}
BATCH_ACTORS=${BATCH_ACTORS:-$HALF}
STREAMS=${STREAMS:-32 64 128}
STREAM_SECONDS=${STREAM_SECONDS:-10}
DECODER_ACTORS=${DECODER_ACTORS:-$HALF}
MAX_P95_MS=${MAX_P95_MS:-100}

gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
if [ -z "$gpu" ]; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing was run"
    exit 77
fi
mkdir -p "$OUT_DIR"
echo "gpu_check: $gpu, $CORES CPU cores, torch $("$PY" -c 'import torch; print(torch.__version__)'), corpus $CORPUS"

status=0
echo "== 1/2 CUDA tests (tests/integration/test_cuda.py)"
"$PY" -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py 2>&1 | tee "$OUT_DIR/cuda_tests.log" || status=1

echo "== 2/2 asr bench on the GPU: batch ${BATCH_SECONDS} s x ${BATCH_ACTORS} actors, streams: ${STREAMS}"
# shellcheck disable=SC2086  # STREAMS is a list
"$PY" -m pipeline.cli bench --data "$CORPUS" --seconds "$BATCH_SECONDS" --batch-actors "$BATCH_ACTORS" \
    --streams $STREAMS --stream-seconds "$STREAM_SECONDS" --max-p95-ms "$MAX_P95_MS" --long-minutes 0 \
    --set "streaming.decoder_actors=$DECODER_ACTORS" --set streaming.max_batch_streams=1024 \
    --json "$OUT_DIR/gpu_bench.json" > "$OUT_DIR/bench.log" 2>&1 || { status=1; tail -n 30 "$OUT_DIR/bench.log"; }

if [ -s "$OUT_DIR/gpu_bench.json" ]; then
    "$PY" - "$OUT_DIR/gpu_bench.json" <<'EOF'
import json
import sys

r = json.load(open(sys.argv[1]))
b = r["batch"]
print(f"device: {r['device']}  decoder: {r['decoder']['kind']}")
print(f"batch, {b['files']} files, {b['audio_s']} s of audio:")
print(f"  in-process ({b['in_process_device']}): RTFx {b['in_process_rtfx']}")
print(f"  host CPU {b['host_cpu_ms_per_audio_s']} ms per audio s (one thread;",
      ", ".join(f"{k} {v}" for k, v in b["host_cpu_ms_per_audio_s_by_stage"].items()) + ")")
print(f"  acoustic {b['acoustic_ms_per_audio_s']} ms per audio s on {b['acoustic_device']} "
      f"({b['acoustic_batch_files_mean']} files per batch): {1000 / b['acoustic_ms_per_audio_s']:.0f}x on one device")
print(f"  Ray Data ({b['ray_acoustic_actors']} acoustic actors): RTFx {b['ray_rtfx']} end to end, first row after {b['ray_first_row_s']} s,"
      f" {b['ray_vs_in_process_speed_after_first_row']}x in-process after it; errors {b['ray_errors']}")
# the cost model (pipeline/bench/cost.py) from those per-second costs, beside what this node measured
from pipeline.bench import cost  # noqa: E402

cpus = r["cpu_count"]
predicted = cost.node_rtfx(b["host_cpu_ms_per_audio_s"], b["acoustic_ms_per_audio_s"], cpus, accelerators=1)
print(f"  cost model for this node ({cpus} cores, 1 GPU): RTFx {predicted:.0f} predicted, {b['ray_rtfx']} measured "
      f"(after the first row: {b['audio_s'] / max(1e-9, b['ray_after_first_row_s']):.0f}); "
      f"{cpus} cores alone carry {cost.host_capacity_rtfx(b['host_cpu_ms_per_audio_s'], cpus):.0f}x of host work")
print(f"streaming ({r['streaming_settings']['chunk_ms']:.0f} + {r['streaming_settings']['lookahead_ms']:.0f} ms, 100 ms pushes):")
for s in r["streaming"]:
    worst = max(s["latency_breakdown"].items(), key=lambda kv: kv[1]["p95_ms"] or 0)
    print(f"  {s['streams']:4d} streams: push->partial p50 {s['p50_ms']} / p95 {s['p95_ms']} ms, late pushes {s['late_pushes']},"
          f" drain {s['drain_after_audio_s']} s, kept real time: {s['kept_real_time']}; largest p95 span: {worst[0]} {worst[1]['p95_ms']} ms;"
          f" {s['stream_cpu_ms_per_stream_s']} ms CPU per stream-second outside the acoustic stage:"
          f" {cost.streams_sustained(s['stream_cpu_ms_per_stream_s'], cpus)} streams predicted on {cpus} cores")
print(f"max real-time streams: {r['max_realtime_streams']['streams']} ({r['max_realtime_streams']['criterion']})")
print(f"peak RSS (driver + Ray workers, summed): {r['peak_rss_mb']} MB")
EOF
fi
echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED); logs and JSON in $OUT_DIR"
exit $status
