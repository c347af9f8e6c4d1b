"""Acoustic-model speed, float vs int8 vs bfloat16 (``inference.quantize``), on the held-out AN4 features.

Times only the model's forward pass (no features, no decoding), one torch thread by default:

    offline        whole utterances, batches of 16 sorted by length (what ``asr eval`` does)
    stream x1      one stream, 300 ms chunks + 150 ms lookahead, window by window
    stream x16     16 streams batched per window (a loaded acoustic actor)

Prints JSON: frames per second and RTFx (audio seconds per compute second) per case.

    OMP_NUM_THREADS=1 python scripts/bench/bench_quantize.py [--an4 DIR] [--threads 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.config import load_config
from workers.data.corpus import read_an4
from workers.features.mfcc import MfccExtractor
from workers.model.bundle import load_bundle
from workers.recognizer import frames_for_ms
from workers.stages import AcousticStage


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--an4", default="../shared/data/an4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speakers = load_config().data.an4_dev_speakers
    utts = [u for u in read_an4(args.an4).utterances if u.speaker in speakers]
    float_bundle = load_bundle()
    extractor = MfccExtractor(float_bundle.features, float_bundle.normalizer)
    from workers.audio.reader import load_audio

    feats = sorted((extractor(load_audio(u.audio, float_bundle.features.sample_rate_hz)) for u in utts), key=len)
    frames = sum(len(f) for f in feats)
    frame_ms = float_bundle.features.frame_ms
    audio_s = frames * frame_ms / 1000
    chunk, rc = frames_for_ms(300, frame_ms), frames_for_ms(150, frame_ms)
    report = {"utterances": len(feats), "frames": frames, "audio_s": round(audio_s, 1), "threads": args.threads}
    for mode in ("none", "int8", "bf16"):
        model = load_bundle(quantize=mode).model

        def offline(model=model):
            stage = AcousticStage(model, 1, 0)
            for s in range(0, len(feats), 16):
                stage.offline(feats[s : s + 16])

        def streams(n: int, model=model):
            for s in range(0, len(feats), n):
                group = feats[s : s + n]
                x = torch.nn.utils.rnn.pad_sequence(group, batch_first=True)
                with torch.no_grad():
                    model.forward_windows_sequential(x, torch.tensor([len(f) for f in group]), chunk, rc)

        for case, fn in (("offline", offline), ("stream_x1", lambda: streams(1)), ("stream_x16", lambda: streams(16))):
            seconds = _time(fn, args.repeat)
            report[f"{mode}_{case}"] = {"s": round(seconds, 2), "frames_per_s": round(frames / seconds), "rtfx": round(audio_s / seconds, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
