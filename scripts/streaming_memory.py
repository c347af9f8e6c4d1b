"""PSS of the streaming pipeline with one idle stream: the driver and every Ray process it started
(``pipeline.memory``). `asr bench` reports the same figure (``idle_stream_memory``) among its others;
this runs that part alone, in about a minute:

    OMP_NUM_THREADS=1 python scripts/streaming_memory.py ../shared/data/an4 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench import bench_idle_memory  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ray_session import shutdown_ray, start_local_ray  # noqa: E402
from pipeline.streaming import StreamingPipeline  # noqa: E402
from workers.audio import AudioError, load_audio  # noqa: E402
from workers.corpus import read_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="corpus root (the first utterance is recognised before measuring)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args()
    config = load_config(None, args.overrides)
    try:
        utterances = read_corpus(args.data).utterances
        if not utterances:
            raise ValueError(f"{args.data}: no utterances")
        wave = load_audio(utterances[0].audio, config.features.sample_rate_hz).numpy()
    except (OSError, ValueError, AudioError) as exc:  # no such corpus, a broken manifest, unreadable audio: nothing started yet
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start_local_ray(num_cpus=os.cpu_count())
    try:
        pipe = StreamingPipeline(config, args.model)
        report = bench_idle_memory(pipe, wave, config.features.sample_rate_hz)
        pipe.shutdown()
    finally:
        shutdown_ray()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
