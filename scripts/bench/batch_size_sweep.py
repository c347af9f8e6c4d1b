"""The batch job's batch size against its speed: the same files ``--local`` and through a fresh
local Ray, end to end, for each (files, padded seconds) bound. Prints one JSON line per setting.

    OMP_NUM_THREADS=1 python scripts/bench/batch_size_sweep.py ../shared/data/an4 2374 [ROUNDS] [SETTINGS_JSON]

SETTINGS_JSON default: [[16, 120], [32, 240], [64, 480], [128, 960]] (``--batch-size``,
``--batch-seconds``). Figures of 2026-12-05: docs/RESULTS.md, "Batches of 64 files / 480 s".
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from pipeline.batch.job import transcribe_inputs
from pipeline.bench.batch import first_files
from pipeline.cluster.session import shutdown_ray, start_local_ray
from pipeline.config import load_config
from workers.data.corpus import read_corpus


def main() -> None:
    corpus, seconds = sys.argv[1], float(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    settings = json.loads(sys.argv[4]) if len(sys.argv) > 4 else [[16, 120], [32, 240], [64, 480], [128, 960]]
    config = load_config()
    files, total = first_files(read_corpus(corpus).utterances, seconds)

    def run(backend: str, files_per_batch: int, batch_seconds: float) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            summary = transcribe_inputs(files, out, None, config.decoder, vad=config.vad, backend=backend,
                                        batch_size=files_per_batch, batch_seconds=batch_seconds, progress=False)
            return time.perf_counter() - t0, summary

    for round_ in range(rounds):
        for files_per_batch, batch_seconds in settings:
            local_s, _ = run("local", files_per_batch, batch_seconds)
            start_local_ray(num_cpus=os.cpu_count())
            try:
                ray_s, summary = run("ray", files_per_batch, batch_seconds)
            finally:
                shutdown_ray()
            print(json.dumps({"round": round_, "batch_size": files_per_batch, "batch_seconds": batch_seconds,
                              "audio_s": round(total, 1), "local_s": round(local_s, 2), "ray_s": round(ray_s, 2),
                              "ray_vs_local": round(local_s / ray_s, 3), "ray_first_row_s": summary["first_row_s"]}), flush=True)


if __name__ == "__main__":
    main()
