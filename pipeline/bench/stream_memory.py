"""PSS of the streaming pipeline with one idle stream, measured from a torch-free driver.

`asr stream` and `asr serve` drive the stage actors from a process that does not import torch
(the model runs in the acoustic and feature actors), so the pipeline's memory is that driver plus
every Ray process it started. This module is such a driver: it starts a local Ray, the stage
actors, recognises one utterance on one stream, then reports the memory of its process tree
(``pipeline.bench.memory``) with the stream open and idle. `asr bench` runs it in a subprocess (its own
driver holds torch for the batch benchmark); alone:

    OMP_NUM_THREADS=1 python -m pipeline.bench.stream_memory ../shared/data/an4 [--model DIR] [--config F] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np


def idle_stream_memory(pipe: Any, samples: np.ndarray, rate_hz: int) -> dict:
    """The memory of this process and every process it started (the Ray ones) with one stream open
    and idle, after it recognised ``samples`` (so every stage has loaded what it needs)."""
    from pipeline.bench.memory import memory_report, process_tree_memory

    sid = pipe.open_stream()
    block = int(rate_hz * 0.1)
    for start in range(0, len(samples), block):
        pipe.push(sid, samples[start : start + block], rate_hz)
    pipe.results(sid, wait=True)
    time.sleep(1.0)  # let the pushes' objects be freed
    report = memory_report(process_tree_memory())
    pipe.close(sid)
    return report


def run_in_subprocess(data: str, model: str | None, config_path: str | None, overrides: list[str],
                      timeout_s: float = 600.0) -> dict:
    """``main`` in a fresh interpreter: the report, or ``{"error": ...}`` if it failed."""
    import subprocess

    cmd = [sys.executable, "-m", "pipeline.bench.stream_memory", data]
    cmd += ["--model", str(model)] if model else []
    cmd += ["--config", str(config_path)] if config_path else []
    for item in overrides:
        cmd += ["--set", item]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    from pipeline.cluster.session import shutdown_ray, start_local_ray
    from pipeline.config import ConfigError, load_config
    from pipeline.streaming import StreamingPipeline
    from workers.audio.checks import AudioError
    from workers.audio.reader import read_audio
    from workers.data.corpus import read_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="corpus root or manifest (its first utterance is recognised before measuring)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        utterances = read_corpus(args.data).utterances
        if not utterances:
            raise ValueError(f"{args.data}: no utterances")
        samples, rate_hz = read_audio(utterances[0].audio)
    except (OSError, ValueError, AudioError, ConfigError) as exc:  # nothing started yet
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start_local_ray(num_cpus=os.cpu_count())
    try:
        pipe = StreamingPipeline(config, args.model)
        report = idle_stream_memory(pipe, samples, rate_hz)
        report["driver_imports_torch"] = "torch" in sys.modules
        pipe.shutdown()
    finally:
        shutdown_ray()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
