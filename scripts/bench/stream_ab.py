"""A/B of streaming-pipeline settings at N real-time streams, the settings alternating.

One local Ray; for each round and each variant (a comma-separated list of ``--set``
overrides, "" for the defaults) a fresh ``StreamingPipeline`` runs 3 s of warm-up, then
``--seconds`` of N real-time streams of AN4 speech in 100 ms pushes (``pipeline.bench.run.bench_streams``).
Alternating the variants puts the machine's drift into every variant alike. Prints one JSON
line per run: push -> partial p50 / p95, late pushes and the per-span breakdown (p50, p95 ms).

    OMP_NUM_THREADS=1 python scripts/bench/stream_ab.py 32 3 inference.quantize=none inference.quantize=bf16
"""

from __future__ import annotations

import argparse
import json
import os

from pipeline.bench.run import bench_streams
from pipeline.cluster.session import shutdown_ray, start_local_ray
from pipeline.config import load_config
from pipeline.streaming import StreamingPipeline
from workers.audio.reader import load_audio
from workers.data.corpus import read_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("streams", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("variants", nargs="+", help='comma-separated SECTION.KEY=VALUE overrides per variant ("" = defaults)')
    parser.add_argument("--data", default="../shared/data/an4")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio seconds per stream per run")
    args = parser.parse_args()
    configs = {v: load_config(overrides=[s for s in v.split(",") if s]) for v in args.variants}  # bad settings fail here
    rate = next(iter(configs.values())).features.sample_rate_hz
    waves = [load_audio(u.audio, rate).numpy() for u in read_corpus(args.data).utterances[:40]]
    start_local_ray(num_cpus=os.cpu_count())
    try:
        for r in range(args.rounds):
            for variant, config in configs.items():
                with StreamingPipeline(config) as pipe:
                    bench_streams(pipe, waves, args.streams, 3, rate)  # warm-up
                    res = bench_streams(pipe, waves, args.streams, args.seconds, rate)
                spans = {k: (round(x["p50_ms"]), round(x["p95_ms"])) for k, x in res["latency_breakdown"].items()}
                print(json.dumps({"round": r, "variant": variant, "p50_ms": res["p50_ms"], "p95_ms": res["p95_ms"],
                                  "late_pushes": res["late_pushes"], "drain_s": res["drain_after_audio_s"], "spans_ms": spans}), flush=True)
    finally:
        shutdown_ray()


if __name__ == "__main__":
    main()
