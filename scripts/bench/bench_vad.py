"""Cost of voice activity detection per stream: CPU time of the feature stage per second of
audio with and without the detector, fed in 100 ms pushes as a stream is (one thread).

Usage: python scripts/bench/bench_vad.py [AN4_ROOT] [SECONDS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from workers.audio.reader import load_audio
from workers.audio.vad import SpeechDetector
from workers.features.mfcc import MfccExtractor
from workers.model.bundle import load_bundle
from workers.stages import FeatureStage


def cpu_ms_per_audio_s(stage: FeatureStage, wave: torch.Tensor, push_samples: int) -> float:
    t0 = time.process_time()
    for start in range(0, wave.numel(), push_samples):
        stage.push("s", wave[start : start + push_samples])
    stage.finish("s")
    return 1000 * (time.process_time() - t0) / (wave.numel() / 16000)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/an4")
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    torch.set_num_threads(1)
    files = sorted((root / "wav" / "an4_clstk").rglob("*.raw"))
    wave = torch.cat([load_audio(f) for f in files[: int(seconds / 2) + 1]])[: int(seconds * 16000)]
    bundle = load_bundle()
    extractor = MfccExtractor(bundle.features, bundle.normalizer)
    plain = cpu_ms_per_audio_s(FeatureStage(extractor), wave, 1600)
    with_vad = cpu_ms_per_audio_s(FeatureStage(extractor, SpeechDetector()), wave, 1600)
    print(f"{wave.numel() / 16000:.0f} s of AN4 speech in 100 ms pushes, one thread:")
    print(f"  feature stage without VAD: {plain:.1f} ms CPU per second of audio")
    print(f"  feature stage with VAD:    {with_vad:.1f} ms CPU per second of audio")
    print(f"  VAD cost per stream: {with_vad - plain:.1f} ms CPU per second ({(with_vad - plain) / 10:.2f} % of a core)")


if __name__ == "__main__":
    main()
