"""The feature actor's work per round: N streams' pushes through ``FeatureStage.push_many``
(MFCC, causal running mean and, unless --no-vad, voice activity), in process, one thread.

Each round pushes 100 ms of AN4 speech for every stream (each stream its own offset into
the corpus); prints the best and the median over --repeats of the mean milliseconds per round.

    OMP_NUM_THREADS=1 python scripts/bench/bench_feature_stage.py [--streams 32] [--no-vad]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from workers.audio.reader import load_audio
from workers.audio.vad import SpeechDetector
from workers.data.corpus import read_corpus
from workers.features.mfcc import MfccExtractor
from workers.model.bundle import load_bundle
from workers.stages import FeatureStage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/an4")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=50, help="rounds per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-vad", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle()
    stage = FeatureStage(MfccExtractor(bundle.features, bundle.normalizer), None if args.no_vad else SpeechDetector())
    corpus = torch.cat([load_audio(u.audio, 16000) for u in read_corpus(args.data).utterances[:40]])
    push = 1600  # 100 ms
    round_no = 0

    def one_round() -> None:
        nonlocal round_no
        stage.push_many([(f"s{i}", corpus[(round_no * push + i * 7919) % (corpus.numel() - push):][:push]) for i in range(args.streams)])
        round_no += 1

    for _ in range(10):  # warm-up
        one_round()
    means = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            one_round()
        means.append(1000 * (time.perf_counter() - t0) / args.rounds)
    print(json.dumps({"streams": args.streams, "vad": not args.no_vad, "ms_per_round_best": round(min(means), 2),
                      "ms_per_round_median": round(statistics.median(means), 2)}))


if __name__ == "__main__":
    main()
